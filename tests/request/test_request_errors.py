"""Bad input fails before any write, with a message naming the parameter, its value and a fix.

Each case goes through the Python door (``ZarrParallelAssembler(...).cache(...)``, which runs the
flow) and checks that nothing was created on disk. A separate test shows that an existing,
complete cache is left exactly as it was by runs that fail validation or planning.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from zarr_parallel import PlanError, RecommendationsPending, RequestError, ZarrParallelAssembler
from zarr_parallel.request.model import build_request
from zarr_parallel.units import parse_duration, parse_memory

# (id, assembler keywords, cache() keywords, error, parameter, message pattern)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], type[Exception], str, str]] = [
    (
        "missing-source",
        {"data_uri": "{tmp}/missing.nc"},
        {},
        RequestError,
        "data_uri",
        r"data_uri='.*missing\.nc': does not exist",
    ),
    (
        "glob-matches-nothing",
        {"data_uri": "{tmp}/era5_*.nc"},
        {},
        RequestError,
        "data_uri",
        r"data_uri='.*era5_\*\.nc': matches no files",
    ),
    (
        "unknown-engine",
        {"engine": "grib"},
        {},
        RequestError,
        "engine",
        r"engine='grib': must be one of h5netcdf, netcdf4, kerchunk, zarr",
    ),
    (
        "unknown-variable",
        {"variables": {"sp": {}, "t2m": {}}},
        {},
        RequestError,
        "variables",
        r"variables=\['sp'\]: are not variables of the source\. Use names from \['d2m', 't2m'\]",
    ),
    (
        "unknown-preprocessor",
        {"preprocessors": [{"type": "resample", "time": "1D"}]},
        {},
        RequestError,
        "preprocessors[0].type",
        r"preprocessors\[0\]\.type='resample': is not a known transform\. Use one of \[.*'sel'",
    ),
    (
        "unknown-variable-transform",
        {"variables": {"t2m": [{"type": "regrid"}]}},
        {},
        RequestError,
        "variables['t2m'][0].type",
        r"variables\['t2m'\]\[0\]\.type='regrid': is not a known transform",
    ),
    (
        "selection-outside-data",
        {"preprocessors": [{"type": "sel", "time": ["2021-01-01", "2021-01-31"]}]},
        {},
        RequestError,
        "preprocessors[0].time",
        r"preprocessors\[0\]\.time=\['2021-01-01', '2021-01-31'\]: selects nothing \(outside "
        r"the data\)\. Use labels within 2020-01-01T00:00:00 \.\. 2020-01-03T11:00:00",
    ),
    (
        "selection-label-missing",
        {"preprocessors": [{"type": "sel", "latitude": 91.0}]},
        {},
        RequestError,
        "preprocessors[0].latitude",
        r"preprocessors\[0\]\.latitude=91\.0: selects labels not in the data",
    ),
    (
        "selection-unknown-dimension",
        {"preprocessors": [{"type": "isel", "level": [0, 1]}]},
        {},
        RequestError,
        "preprocessors[0].level",
        r"preprocessors\[0\]\.level='level': is not a dimension of the data",
    ),
    (
        "chunks-zero",
        {"chunks": {"time": 0}},
        {},
        RequestError,
        "chunks['time']",
        r"chunks\['time'\]=0: must be a positive integer or -1",
    ),
    (
        "chunks-negative",
        {"chunks": {"latitude": -3}},
        {},
        RequestError,
        "chunks['latitude']",
        r"chunks\['latitude'\]=-3: must be a positive integer or -1",
    ),
    (
        "chunks-unknown-dimension",
        {"chunks": {"level": 4}},
        {},
        RequestError,
        "chunks['level']",
        r"chunks\['level'\]=4: names no dimension of the target\. Use dimensions of the "
        r"target: \['latitude', 'longitude', 'time'\]",
    ),
    (
        "chunks-not-a-size",
        {"chunks": {"time": "big"}},
        {},
        RequestError,
        "chunks['time']",
        r"chunks\['time'\]='big': Input should be a valid integer",
    ),
    (
        "memory-below-one-chunk",
        {"chunks": {"time": 1}},
        {"memory_limit": 356_000, "memory_reserve": 256_000},
        PlanError,
        "memory_limit",
        # One target step (1 x 40 x 72 floats) touches a source chunk of 6 steps: 69 kB read +
        # 5 x 11.5 kB of region copies = 127 kB, above the 100 kB budget.
        r"memory_limit='356\.00 kB': one write chunk of \['d2m', 't2m'\] \(\{time: 1, "
        r"latitude: 40, longitude: 72\}\) with the source chunks it touches \(\{time: 6, "
        r"latitude: 40, longitude: 72\}\) needs about 126\.72 kB, more than the 100\.00 kB "
        r"a job may use \(memory_limit minus the 256\.00 kB reserve\)\. Raise memory_limit to "
        r"at least 390\.00 kB",
    ),
    (
        "memory-unparsable",
        {},
        {"memory_limit": "lots"},
        RequestError,
        "memory_limit",
        r"memory_limit='lots': is not a memory size\. Use a number with a unit such as '2GB'",
    ),
    (
        "memory-reserve-above-limit",
        {},
        {"memory_limit": "200MB"},
        RequestError,
        "memory_limit",
        r"memory_limit='200MB': leaves nothing for jobs after the 256MB interpreter reserve",
    ),
    (
        "timeout-unparsable",
        {},
        {"worker_timeout": "soon"},
        RequestError,
        "worker_timeout",
        r"worker_timeout='soon': is not a duration\. Use 'MM:SS', 'HH:MM:SS'",
    ),
    (
        "timeout-too-many-fields",
        {},
        {"worker_timeout": "1:2:3:4"},
        RequestError,
        "worker_timeout",
        r"worker_timeout='1:2:3:4': is not a duration",
    ),
    (
        "cache-dir-under-a-file",
        {},
        {"cache_dir": "{tmp}/afile/caches"},
        RequestError,
        "cache_dir",
        r"cache_dir='.*afile/caches': cannot be created: .*afile is a file",
    ),
    (
        # Root ignores permission bits; a read-only file system refuses everyone.
        "cache-dir-read-only",
        {},
        {"cache_dir": "/proc/zarr-parallel-test/caches"},
        RequestError,
        "cache_dir",
        r"cache_dir='/proc/zarr-parallel-test/caches': is not writable \(/proc: ",
    ),
    (
        "cache-store-and-dir",
        {},
        {"cache_store": "{tmp}/caches/x.zarr"},
        RequestError,
        "cache_store",
        r"exactly one of cache_store and cache_dir must be given",
    ),
    # -- values the request's JSON form cannot carry, or that mean nothing ([safety]) --
    (
        "timeout-nan",
        {},
        {"worker_timeout": float("nan")},
        RequestError,
        "worker_timeout",
        r"worker_timeout=nan: is not a finite number",
    ),
    (
        "timeout-inf",
        {},
        {"worker_timeout": float("inf")},
        RequestError,
        "worker_timeout",
        r"worker_timeout=inf: is not a finite number",
    ),
    (
        "timeout-negative",
        {},
        {"worker_timeout": -5},
        RequestError,
        "worker_timeout",
        r"worker_timeout=-5: must be a positive, finite duration",
    ),
    (
        "timeout-zero",
        {},
        {"worker_timeout": 0},
        RequestError,
        "worker_timeout",
        r"worker_timeout=0: must be a positive, finite duration",
    ),
    (
        "selection-nan",
        {"preprocessors": [{"type": "sel", "latitude": [float("nan"), 10]}]},
        {},
        RequestError,
        "preprocessors[0].latitude[0]",
        r"preprocessors\[0\]\.latitude\[0\]=nan: is not a finite number",
    ),
    (
        "chunks-boolean",
        {"chunks": {"time": True}},
        {},
        RequestError,
        "chunks",
        r"chunks=\{'time': True\}: the size of 'time' is True, not a number of elements",
    ),
    (
        "num-jobs-boolean",
        {},
        {"num_jobs": True},
        RequestError,
        "num_jobs",
        r"num_jobs=True: is True \(true/false\), not a whole number",
    ),
    # -- tile dimension names become folders of the cache --
    (
        "tiles-within-separator",
        {"tiles": {"size": {"latitude": 8}, "within": {"latitude": "a/b"}}},
        {},
        RequestError,
        "tiles.within.latitude",
        r"tiles\.within\.latitude='a/b': contains a path separator",
    ),
    (
        "tiles-within-parent",
        {"tiles": {"size": {"latitude": 8}, "within": {"latitude": ".."}}},
        {},
        RequestError,
        "tiles.within.latitude",
        r"tiles\.within\.latitude='\.\.': is a relative path",
    ),
    (
        "tiles-dim-escape",
        {"tiles": {"latitude": 8, "dim": "../../x"}},
        {},
        RequestError,
        "tiles.dim",
        r"tiles\.dim='\.\./\.\./x': contains a path separator",
    ),
    # -- URL cache paths: no object-store targets yet (a folder named 's3:' was written) --
    (
        "cache-store-url",
        {},
        {"cache_dir": None, "cache_store": "s3://bucket/x.zarr"},
        RequestError,
        "cache_store",
        r"cache_store='s3://bucket/x\.zarr': is a URL",
    ),
    (
        "cache-dir-url",
        {},
        {"cache_dir": "gs://bucket/caches"},
        RequestError,
        "cache_dir",
        r"cache_dir='gs://bucket/caches': is a URL",
    ),
    (
        "cache-store-file-url",
        {},
        {"cache_dir": None, "cache_store": "file:///x.zarr"},
        RequestError,
        "cache_store",
        r"cache_store='file:///x\.zarr': is a URL.*without 'file://'",
    ),
]


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    return value


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file, folder and link under ``root``: content hash (or link target) and mtime."""
    out: dict[str, tuple[str, int]] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                digest = "link:" + os.readlink(path)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = "dir"
            out[str(path.relative_to(root))] = (digest, st.st_mtime_ns)
    return out


@pytest.mark.parametrize(
    ("init", "cache_kw", "error", "parameter", "pattern"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_input(
    era5_files: list[Path],
    tmp_path: Path,
    init: dict[str, Any],
    cache_kw: dict[str, Any],
    error: type[Exception],
    parameter: str,
    pattern: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The memory figures in the messages are the xarray path's model (the fast read path has
    # its own, zarr_parallel.planning.memory.fast_job_memory).
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake lands where it is seen
    (tmp_path / "afile").write_text("not a folder")
    before = _tree(tmp_path)
    fields = {"data_uri": [str(p) for p in era5_files], **init}
    fields = {k: _fill(v, tmp_path) for k, v in fields.items()}
    options = {"cache_dir": str(tmp_path / "caches"), **cache_kw}
    options = {k: _fill(v, tmp_path) for k, v in options.items()}
    with pytest.raises(error, match=pattern) as info:
        zp = ZarrParallelAssembler(**fields)
        zp.cache(deploy_mode="series", **options)
    assert getattr(info.value, "parameter", None) == parameter
    assert info.value.fix  # type: ignore[attr-defined]
    assert isinstance(info.value, ValueError)
    # Nothing was created: no cache folder, no versions, no lock, no stray probe file.
    assert _tree(tmp_path) == before
    assert not (tmp_path / "caches").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2_000_000_000),
        ("2GiB", 2 * 2**30),
        ("2gb", 2_000_000_000),
        ("2 GB", 2_000_000_000),
        ("512MB", 512_000_000),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("300kB", 300_000),
        (4_000_000_000, 4_000_000_000),
        ("4000000000", 4_000_000_000),
    ],
)
def test_memory_strings(text: str | int, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "2 GB RAM", "GB", "-1GB", "0", 0, True, "2XB", ""])
def test_bad_memory_strings(text: Any) -> None:
    with pytest.raises(RequestError, match="memory_limit=") as info:
        parse_memory(text)
    assert info.value.value == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30:00", 1800), ("1:30:00", 5400), ("30min", 1800), ("2h", 7200), (90, 90), ("45", 45)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_memory_limit_in_request(era5_files: list[Path], tmp_path: Path) -> None:
    req = build_request(
        data_uri=str(era5_files[0]), cache_store=str(tmp_path / "c.zarr"), memory_limit="2GiB"
    )
    assert req.memory_bytes == 2 * 2**30 and req.reserve_bytes == 256_000_000


# ------------------------------------------------------------------------------------------
# An existing cache is never touched by a run that fails


@pytest.fixture(scope="module")
def complete_cache(
    era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ZarrParallelAssembler, Path]:
    """One complete cache shared by the failing runs below (each checks it is unchanged)."""
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files], chunks={"time": 12}, variables=["t2m"], cache_label="_v1"
    )
    caches = tmp_path_factory.mktemp("existing") / "caches"
    result = zp.cache(cache_dir=str(caches), deploy_mode="series")
    assert result.path.is_symlink()
    return zp, result.path


FAILING_RUNS: list[tuple[str, dict[str, Any], dict[str, Any], type[Exception]]] = [
    ("unknown-variable", {"variables": ["sp"]}, {}, RequestError),
    (
        "selection-outside",
        {"preprocessors": [{"type": "sel", "time": ["2030-01-01", "2030-01-02"]}]},
        {},
        RequestError,
    ),
    (
        "plan-refused",
        {"chunks": {"time": 1}},
        {"memory_limit": 356_000, "memory_reserve": 256_000},
        PlanError,
    ),
    (
        "halted-on-recommendations",
        {"preprocessors": [{"type": "isel", "time": [3, 40]}]},
        {},
        RecommendationsPending,
    ),
    (
        "different-request-without-overwrite",
        {"chunks": {"time": 24}},
        {"overwrite": False},
        RequestError,
    ),
    ("unparsable-timeout", {}, {"worker_timeout": "soon"}, RequestError),
]


@pytest.mark.parametrize(
    ("changes", "cache_kw", "error"),
    [r[1:] for r in FAILING_RUNS],
    ids=[r[0] for r in FAILING_RUNS],
)
def test_existing_cache_untouched(
    complete_cache: tuple[ZarrParallelAssembler, Path],
    era5_files: list[Path],
    changes: dict[str, Any],
    cache_kw: dict[str, Any],
    error: type[Exception],
) -> None:
    _, final = complete_cache
    caches = final.parent
    before = _tree(caches)
    link = os.readlink(final)
    fields = {
        "data_uri": [str(p) for p in era5_files],
        "chunks": {"time": 12},
        "variables": ["t2m"],
        "cache_label": "_v1",
        **changes,
    }
    with pytest.raises(error):
        ZarrParallelAssembler(**fields).cache(
            cache_dir=str(caches), deploy_mode="series", **cache_kw
        )
    assert os.readlink(final) == link
    assert _tree(caches) == before


# ------------------------------------------------------------------------------------------
# Request files and --set through the command line: exit 2, a clear message, nothing written

BASE_FILE = "data_uri: {src}\ncache_store: out/x.zarr\ndeploy_mode: series\n"

# (id, more YAML lines, --set overrides, message pattern)
FILE_CASES: list[tuple[str, str, list[str], str]] = [
    (
        "set-into-a-string",
        "",
        ["data_uri.x=1"],
        r"--set data_uri\.x='1': reaches into data_uri, which is a str .*, not a mapping\. "
        r"Set data_uri itself",
    ),
    ("set-nan", "", ["worker_timeout=.nan"], r"worker_timeout=nan: is not a finite number"),
    ("set-url-cache", "", ["cache_store=s3://bucket/x.zarr"], r"cache_store='s3://.*is a URL"),
    (
        "repeated-key",
        "deploy_mode: SLURM\n",
        [],
        r"repeats the key 'deploy_mode' on line 4 \(first on line 3\)\. Keep one of them",
    ),
    (
        "repeated-nested-key",
        "chunks:\n  time: 12\n  time: 24\n",
        [],
        r"repeats the key 'time' on line 6 \(first on line 5\)",
    ),
    ("alias", "add_attrs: {a: &x [1, 2], b: *x}\n", [], r"uses the YAML alias \*x on line 4"),
    ("merge-key", "add_attrs:\n  <<: {a: 1}\n", [], r"uses a YAML merge key \(<<\) on line 5"),
    ("timeout-nan", "worker_timeout: .nan\n", [], r"worker_timeout=nan: is not a finite"),
    ("timeout-inf", "worker_timeout: .inf\n", [], r"worker_timeout=inf: is not a finite"),
    ("timeout-negative", "worker_timeout: -60\n", [], r"worker_timeout=-60: must be a positive"),
    ("timeout-zero", "worker_timeout: 0\n", [], r"worker_timeout=0: must be a positive"),
    (
        "selection-nan",
        "preprocessors: [{type: sel, latitude: [.nan, 10]}]\n",
        [],
        r"preprocessors\[0\]\.latitude\[0\]=nan: is not a finite number",
    ),
    ("chunks-true", "chunks: {time: true}\n", [], r"the size of 'time' is True"),
    ("yes-key", "variables: {on: {}}\n", [], r"variables=True: has a key that is not a string"),
    ("binary", "add_attrs: {x: !!binary aGVsbG8=}\n", [], r"add_attrs\['x'\]=.*is a bytes"),
    (
        "tiles-within-separator",
        "tiles: {size: {latitude: 8}, within: {latitude: a/b}}\n",
        [],
        r"tiles\.within\.latitude='a/b': contains a path separator",
    ),
    ("tiles-dim-parent", "tiles: {latitude: 8, dim: '..'}\n", [], r"tiles\.dim='\.\.': is a"),
]


@pytest.mark.parametrize(
    ("more", "overrides", "pattern"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_bad_request_file(
    era5_files: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    more: str,
    overrides: list[str],
    pattern: str,
) -> None:
    from zarr_parallel.orchestration.cache import main

    monkeypatch.chdir(tmp_path)  # a relative path written by mistake lands where it is seen
    path = tmp_path / "request.yaml"
    path.write_text(BASE_FILE.format(src=era5_files[0]) + more)
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["run", str(path), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid request: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["request.yaml"], "nothing written"


# ------------------------------------------------------------------------------------------
# Memory and worker figures name what works


def test_memory_message_names_a_minimum_that_works(era5_files: list[Path], tmp_path: Path) -> None:
    """dask_distributed: the message shows the user's memory_limit, and its minimum plans.

    Before, it showed the limit without the worker process's allowance ('270.00 MB' for 520MB)
    and suggested 280 MB, which was then refused.
    """
    from zarr_parallel.run.steps import make_plan

    fields = {
        "data_uri": [str(p) for p in era5_files],
        "cache_store": str(tmp_path / "m.zarr"),
        "deploy_mode": "dask_distributed",
        "chunks": {"time": 60},
    }
    with pytest.raises(PlanError) as info:
        make_plan(build_request(**fields, memory_limit="520MB"))
    text = str(info.value)
    assert text.startswith("memory_limit='520.00 MB': ")
    assert "memory_limit minus the 256.00 MB reserve and the 250.00 MB dask worker" in text
    minimum = re.search(r"Raise memory_limit to at least ([\d.]+ MB)", text)
    assert minimum is not None
    _, plan = make_plan(build_request(**fields, memory_limit=minimum.group(1).replace(" ", "")))
    assert plan.jobs


def test_local_workers_capped_by_memory(
    era5_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """simultaneous_worker_limit=5000 on a small machine: as many workers as memory holds."""
    import psutil

    from zarr_parallel.orchestration.runners import worker_sizing
    from zarr_parallel.run.steps import make_plan, worker_count

    total = psutil.virtual_memory().total
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        cache_store=str(tmp_path / "w.zarr"),
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=5000,
        memory_limit=total // 3 + 1,  # three such workers do not fit: two do
        chunks={"time": 6, "latitude": 40, "longitude": 72},
    )
    _, plan = make_plan(req)
    assert len(plan.jobs) > 2
    assert worker_sizing(req, plan.max_job_memory, len(plan.jobs)).workers == 2
    assert "simultaneous_worker_limit=5000 local workers of" in caplog.text
    assert "running 2 at once" in caplog.text
    # Above the core count (and within memory): a warning, not a refusal.
    cores = os.cpu_count() or 1
    caplog.clear()
    many = req.model_copy(update={"simultaneous_worker_limit": cores + 1, "memory_limit": "1GB"})
    if total // 10**9 > cores + 1:
        assert worker_count(many) == cores + 1
        assert f"more local workers than this machine's {cores} cores" in caplog.text
