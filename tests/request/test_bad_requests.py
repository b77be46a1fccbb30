"""The catalogue of bad requests: each fails with a clear error naming what is wrong (the
parameter, its value and a fix), and nothing that exists changes.

- ``CASES`` run against one published cache. Cases that fail before writing must leave the cache
  location exactly as it was (link target, every file's bytes, no staging version); cases that
  can only fail while writing must leave the published version untouched and readable. New cases
  are one line: request fields over ``BASE`` (``"@name"`` values and ``{name}`` in strings are
  filled from the context below), or a request file for the YAML door.
- ``FRESH_CASES`` go through the Python door (``ZarrParallelAssembler(...).cache(...)``, which
  runs the flow) on an empty folder: the whole message matches ``matches`` and nothing is created
  on disk. ``fields`` are the assembler's keywords, ``options`` those of ``cache()``.
- ``FAILING_RUNS``: an existing, complete cache is left exactly as it was by runs that fail
  validation or planning.
- ``FILE_CASES``: request files and ``--set`` through the command line: exit 2, a clear message,
  nothing written.

Then the memory and duration parsers, the memory figures that name what works, and a disk that
fills up while the cache is written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import xarray as xr
import yaml

from core_support import frozen_run
from zarr_parallel import RecommendationsPending, ZarrParallelAssembler
from zarr_parallel.api import run_request
from zarr_parallel.errors import PlanError, RequestError, RunFailed
from zarr_parallel.examples import make_era5_like
from zarr_parallel.orchestration.command import main
from zarr_parallel.request.model import build_request
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.verify import cache_files, location_snapshot, verify_cache
from zarr_parallel.store.manifest import iter_job_records
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.transforms import registry as transforms
from zarr_parallel.units import parse_duration, parse_memory

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}
OTHER = {"time": 24, "latitude": 40, "longitude": 72}
BASE: dict[str, Any] = {
    "data_uri": "@src",
    "chunks": CHUNKS,
    "cache_store": "{cache}",
    "deploy_mode": "series",
    "memory_limit": "300MB",
    "retries": 0,
}
REQUEST_FILE = "data_uri: {src0}\ncache_store: {cache}\ndeploy_mode: series\n"


@dataclass(frozen=True)
class Bad:
    """One bad input: what to run, and what the error must say."""

    id: str
    fields: dict[str, Any] = field(default_factory=dict)  # over BASE (Python door)
    parameter: str | None = None  # the error's .parameter
    shows: str = ""  # text the message must contain
    error: type[Exception] = RequestError
    yaml: str | None = None  # YAML door: this request file instead of fields
    sets: tuple[str, ...] = ()  # --set overrides (YAML door)
    during: bool = False  # can only fail while writing
    options: dict[str, Any] = field(default_factory=dict)  # cache() keywords (FRESH_CASES)
    matches: str = ""  # a pattern the whole message must match (FRESH_CASES)


# One line per case: the tables is easier to read and extend than formatted calls.
# fmt: off
CASES = [
    # Request fields
    Bad("chunks-zero", {"chunks": {"time": 0}}, "chunks['time']", "must be a positive integer"),
    Bad("chunks-not-a-number", {"chunks": {"time": "big"}}, "chunks['time']", "'big'"),
    Bad("chunks-unknown-dim", {"chunks": {"level": 4}}, "chunks['level']", "names no dimension"),
    Bad("memory-not-a-size", {"memory_limit": "lots"}, "memory_limit", "'lots': is not a memory"),
    Bad("memory-under-reserve", {"memory_limit": "100MB"}, "memory_limit", "256MB interpreter"),
    Bad("memory-no-plan-fits", {"memory_reserve": "299.99MB"}, "memory_limit", "more than", PlanError),
    Bad("timeout-not-a-duration", {"worker_timeout": "soon"}, "worker_timeout", "'soon'"),
    Bad("deploy-mode-unknown", {"deploy_mode": "cloud"}, "deploy_mode", "'cloud'"),
    Bad("engine-unknown", {"engine": "grib"}, "engine", "'grib'"),
    Bad("field-unknown", {"chunk": {"time": 12}}, "chunk", "is not a request field"),
    Bad("num-jobs-zero", {"num_jobs": 0}, "num_jobs", "greater than or equal to 1"),
    Bad("zarr-format-4", {"zarr_format": 4}, "zarr_format", "=4: Input should be 2 or 3"),
    Bad("compression-unknown", {"compression": "brotli"}, "compression", "compression='brotli': names no codec this tool writes ('brotli'). Use 'zstd' or 'zstd:LEVEL'"),
    Bad("compression-level", {"compression": "zstd:30"}, "compression", "outside 0-22 (30). Use 'zstd'"),
    Bad("compression-per-variable", {"variables": {"t2m": [{"type": "encoding", "compression": "zlib:12"}]}}, "variables['t2m'][0].compression", "'zlib:12': has a zlib level outside 0-9 (12)"),
    Bad("keep-versions-zero", {"keep_versions": 0}, "keep_versions", "=0"),
    Bad("policy-unknown", {"recommend_changes": "maybe"}, "recommend_changes", "'maybe'"),
    Bad("resume-not-bool", {"resume": "maybe"}, "resume", "'maybe'"),
    Bad("shards-need-v3", {"shards": {"time": 24}, "zarr_format": 2}, "shards", "zarr_format=3"),
    Bad("shards-not-multiple", {"shards": {"time": 18}}, "shards['time']", "multiple of the chunk"),
    Bad("overwrite-refused", {"chunks": OTHER, "overwrite": False}, "overwrite", "chunks: "),
    Bad("resume-nothing-to-resume", {"chunks": OTHER, "resume": True}, "resume", "interrupted run"),
    # Sources
    Bad("source-missing", {"data_uri": "{tmp}/nope.nc"}, "data_uri", "does not exist"),
    Bad("source-glob-empty", {"data_uri": "{tmp}/none_*.nc"}, "data_uri", "matches no files"),
    Bad("source-truncated", {"data_uri": "@truncated"}, "data_uri", "truncated file"),
    Bad("source-truncated-in-set", {"data_uri": "@truncated_in_set"}, "data_uri", "truncated"),
    Bad("source-not-netcdf", {"data_uri": "@not_netcdf"}, "data_uri", "signature not found"),
    Bad("source-mixed-grids", {"data_uri": "@mixed_grid"}, "data_uri", "do not combine"),
    Bad("source-mixed-variables", {"data_uri": "@mixed_vars"}, "data_uri", "different variables"),
    Bad("variable-unknown", {"variables": {"t2m_typo": {}}}, "variables", "t2m_typo"),
    # Transforms
    Bad("transform-unknown", {"preprocessors": [{"type": "smooth"}]}, "preprocessors[0].type", "'smooth'"),
    Bad("transform-raises", {"preprocessors": [{"type": "transpose", "dims": ["time"]}]}, "preprocessors[0]", "ValueError"),
    Bad("transform-bad-dtype", {"preprocessors": [{"type": "astype", "dtype": "floaty"}]}, "preprocessors[0]", "floaty"),
    Bad("plugin-raises", {"preprocessors": [{"type": "explode"}]}, "preprocessors[0]", "RuntimeError: boom"),
    Bad("selection-empty", {"preprocessors": [{"type": "sel", "time": ["2031-01-01", "2031-02-01"]}]}, "preprocessors[0].time", "selects nothing"),
    Bad("variables-disagree", {"variables": {"t2m": [{"type": "isel", "time": [0, 12]}], "d2m": {}}}, "variables", "different coordinates"),
    Bad("plugin-raises-while-writing", {"preprocessors": [{"type": "explode_later"}], "chunks": OTHER}, None, "boom while writing", RunFailed, during=True),
    # Where the cache goes, and names that become paths
    Bad("cache-both-places", {"cache_dir": "{tmp}"}, "cache_store", "exactly one of"),
    Bad("cache-nowhere", {"cache_store": None}, "cache_store", "exactly one of"),
    Bad("cache-path-is-a-file", {"cache_store": "{file}"}, "cache_store", "points at a file"),
    Bad("cache-parent-is-a-file", {"cache_store": "{file}/c.zarr"}, "cache_store", "is a file"),
    Bad("label-climbs-up", {"cache_store": None, "cache_dir": "{tmp}", "cache_label": "/../up"}, "cache_label", "'/../up'"),
    Bad("label-dotdot", {"cache_store": None, "cache_dir": "{tmp}", "cache_label": ".."}, "cache_label", "'..'"),
    Bad("name-absolute", {"cache_store": None, "cache_dir": "{tmp}", "cache_name": "/etc/x"}, "cache_name", "'/etc/x'"),
    Bad("rename-var-escapes", {"preprocessors": [{"type": "rename", "t2m": "../evil"}]}, "preprocessors", "'../evil'"),
    Bad("rename-var-absolute", {"preprocessors": [{"type": "rename", "t2m": "/tmp/evil"}]}, "preprocessors", "path separator"),
    Bad("rename-per-variable-slash", {"variables": {"t2m": [{"type": "rename", "new_name_or_name_dict": "a/b"}]}}, "variables", "'a/b'"),
    Bad("rename-dim-dotdot", {"preprocessors": [{"type": "rename", "latitude": ".."}]}, "preprocessors", "'..', which is a relative"),
    Bad("rename-onto-manifest", {"preprocessors": [{"type": "rename", "t2m": ".zarr-parallel"}]}, "preprocessors", "manifest"),
    Bad("rename-onto-metadata", {"preprocessors": [{"type": "rename", "d2m": "zarr.json"}]}, "preprocessors", "metadata document"),
    # The request file and the command line
    Bad("yaml-malformed", yaml="data_uri: [unclosed\n", parameter="request", shows="is not valid YAML"),
    Bad("yaml-not-a-mapping", yaml="- a\n- b\n", parameter="request", shows="must be a mapping"),
    Bad("yaml-unknown-key", yaml=REQUEST_FILE + "bogus: 1\n", parameter="bogus", shows="is not a request field"),
    Bad("yaml-missing-file", yaml="<missing>", parameter="request", shows="is not a file"),
    Bad("set-without-value", yaml=REQUEST_FILE, sets=("num_jobs",), parameter="--set", shows="key=value"),
    Bad("set-bad-yaml", yaml=REQUEST_FILE, sets=("num_jobs=[",), parameter="--set num_jobs", shows="not a YAML"),
    Bad("set-nested-zero", yaml=REQUEST_FILE, sets=("chunks.time=0",), parameter="chunks['time']", shows="positive"),
]
# fmt: on


def _explode(ds: xr.Dataset, ctx: Any, **kwargs: Any) -> xr.Dataset:
    raise RuntimeError("boom")


def _explode_later(ds: xr.Dataset, ctx: Any, **kwargs: Any) -> xr.Dataset:
    """A transform that fails only when the data is computed (in the write jobs)."""

    def boom(block: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom while writing")

    out = ds.copy()
    out["t2m"] = out["t2m"].copy(data=out["t2m"].data.map_blocks(boom, dtype="float32"))
    return out


@pytest.fixture(scope="module")
def context(
    era5_files: list[Path], era5_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Bad files, a published cache, and two plug-in transforms that raise."""
    tmp = tmp_path_factory.mktemp("bad")
    src = [str(p) for p in era5_files]
    truncated = tmp / "truncated.nc"
    data = Path(src[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_netcdf = tmp / "notes.nc"
    not_netcdf.write_text("this is not netCDF\n")
    grid = make_era5_like(tmp / "grid", n_files=1, nlat=37, start="2020-01-03T12:00")
    other_vars = make_era5_like(
        tmp / "vars", n_files=1, variables=("t2m", "u10"), start="2020-01-03T12:00"
    )
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a cache")
    cache = tmp / "cache" / "era5.zarr"
    ctx: dict[str, Any] = {
        "src": src,
        "src0": src[0],
        "truncated": str(truncated),
        "truncated_in_set": [*src[:2], str(truncated)],
        "not_netcdf": str(not_netcdf),
        "mixed_grid": [*src[:2], str(grid[0])],
        "mixed_vars": [*src[:2], str(other_vars[0])],
        "file": str(a_file),
        "tmp": str(tmp),
        "cache": str(cache),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(transforms._BUILTIN, "explode", _explode)
        mp.setitem(transforms._BUILTIN, "explode_later", _explode_later)
        run_request(build_request(**_fill(BASE, ctx)))
        yield ctx


def _fill(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ctx) for v in value]
    if isinstance(value, str):
        return ctx[value[1:]] if value.startswith("@") else value.format(**ctx)
    return value


def _run(case: Bad, ctx: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    if case.yaml is None:
        fields = _fill({**BASE, **case.fields}, ctx)
        run_request(build_request(**fields))
        return
    path = tmp_path / "request.yaml"
    if case.yaml != "<missing>":
        path.write_text(_fill(case.yaml, ctx))
    argv = ["plan", str(path)] + [a for s in case.sets for a in ("--set", s)]
    assert main(argv) == 2  # the command line's code for an invalid request
    assert case.shows in capsys.readouterr().err
    run_request(load_request_file(path, list(case.sets)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Bad, context: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    cache = Path(context["cache"])
    before = location_snapshot(cache)
    published, files = cache.resolve(), cache_files(cache)
    with pytest.raises(case.error) as info:
        _run(case, context, tmp_path, capsys)
    message = str(info.value)
    assert case.shows in message
    if case.parameter is not None:
        assert getattr(info.value, "parameter", None) == case.parameter, message
        assert message.startswith(f"{case.parameter}=")
        assert getattr(info.value, "fix", ""), "every parameter error says how to fix it"
    if not case.during:
        assert location_snapshot(cache) == before, "a failed run changed the cache location"
        return
    # Failed while writing: the published version is untouched and readable.
    assert cache.resolve() == published and cache_files(cache) == files
    assert not CachePaths(cache).lock.exists()
    with xr.open_zarr(cache) as ds, xr.open_mfdataset(context["src"], engine="h5netcdf") as src:
        np.testing.assert_array_equal(ds.t2m.values, src.t2m.values)
    for stale in CachePaths(cache).all_versions():
        if stale != published:
            shutil.rmtree(stale)  # leave the next case a clean location


def test_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.id for c in FRESH_CASES}) == len(FRESH_CASES)
    assert all(c.matches for c in FRESH_CASES), "each case on an empty folder names its message"


# ---------------------------------------------------------------------------------------------
# Bad input on an empty folder, through the assembler: nothing is created

# fmt: off
FRESH_CASES = [
    Bad("missing-source", {"data_uri": "{tmp}/missing.nc"}, "data_uri", matches=r"data_uri='.*missing\.nc': does not exist"),
    Bad("glob-matches-nothing", {"data_uri": "{tmp}/era5_*.nc"}, "data_uri", matches=r"data_uri='.*era5_\*\.nc': matches no files"),
    Bad("unknown-engine", {"engine": "grib"}, "engine", matches="engine='grib': must be one of h5netcdf, netcdf4, kerchunk, zarr"),
    Bad("unknown-variable", {"variables": {"sp": {}, "t2m": {}}}, "variables", matches=r"variables=\['sp'\]: are not variables of the source\. Use names from \['d2m', 't2m'\]"),
    Bad("unknown-preprocessor", {"preprocessors": [{"type": "resample", "time": "1D"}]}, "preprocessors[0].type", matches=r"preprocessors\[0\]\.type='resample': is not a known transform \(xarray's resample looks at neighbouring values, which a job writing one region cannot see\)\. Use one of \[.*'sel'"),
    Bad("unknown-variable-transform", {"variables": {"t2m": [{"type": "regrid"}]}}, "variables['t2m'][0].type", matches=r"variables\['t2m'\]\[0\]\.type='regrid': is not a known transform"),
    Bad("selection-outside-data", {"preprocessors": [{"type": "sel", "time": ["2021-01-01", "2021-01-31"]}]}, "preprocessors[0].time", matches=r"preprocessors\[0\]\.time=\['2021-01-01', '2021-01-31'\]: selects nothing \(outside the data\)\. Use labels within 2020-01-01T00:00:00 \.\. 2020-01-03T11:00:00"),
    Bad("selection-label-missing", {"preprocessors": [{"type": "sel", "latitude": 91.0}]}, "preprocessors[0].latitude", matches=r"preprocessors\[0\]\.latitude=91\.0: selects labels not in the data"),
    Bad("selection-unknown-dimension", {"preprocessors": [{"type": "isel", "level": [0, 1]}]}, "preprocessors[0].level", matches=r"preprocessors\[0\]\.level='level': is not a dimension of the data"),
    Bad("chunks-zero", {"chunks": {"time": 0}}, "chunks['time']", matches=r"chunks\['time'\]=0: must be a positive integer or -1"),
    Bad("chunks-negative", {"chunks": {"latitude": -3}}, "chunks['latitude']", matches=r"chunks\['latitude'\]=-3: must be a positive integer or -1"),
    Bad("chunks-unknown-dimension", {"chunks": {"level": 4}}, "chunks['level']", matches=r"chunks\['level'\]=4: names no dimension of the target\. Use dimensions of the target: \['latitude', 'longitude', 'time'\]"),
    Bad("chunks-not-a-size", {"chunks": {"time": "big"}}, "chunks['time']", matches=r"chunks\['time'\]='big': Input should be a valid integer"),
    # One target step (1 x 40 x 72 floats) touches a source chunk of 6 steps: 69 kB read +
    # 5 x 11.5 kB of region copies = 127 kB, above the 100 kB budget.
    Bad("memory-below-one-chunk", {"chunks": {"time": 1}}, "memory_limit", error=PlanError, options={"memory_limit": 356_000, "memory_reserve": 256_000}, matches=r"memory_limit='356\.00 kB': one write chunk of \['d2m', 't2m'\] \(\{time: 1, latitude: 40, longitude: 72\}\) with the source chunks it touches \(\{time: 6, latitude: 40, longitude: 72\}\) needs about 126\.72 kB, more than the 100\.00 kB a job may use \(memory_limit minus the 256\.00 kB reserve\)\. Raise memory_limit to at least 390\.00 kB"),
    Bad("memory-unparsable", {}, "memory_limit", options={"memory_limit": "lots"}, matches=r"memory_limit='lots': is not a memory size\. Use a number with a unit such as '2GB'"),
    Bad("memory-reserve-above-limit", {}, "memory_limit", options={"memory_limit": "200MB"}, matches="memory_limit='200MB': leaves nothing for jobs after the 256MB interpreter reserve"),
    Bad("timeout-unparsable", {}, "worker_timeout", options={"worker_timeout": "soon"}, matches=r"worker_timeout='soon': is not a duration\. Use 'MM:SS', 'HH:MM:SS'"),
    Bad("timeout-too-many-fields", {}, "worker_timeout", options={"worker_timeout": "1:2:3:4"}, matches="worker_timeout='1:2:3:4': is not a duration"),
    Bad("cache-dir-under-a-file", {}, "cache_dir", options={"cache_dir": "{tmp}/afile/caches"}, matches="cache_dir='.*afile/caches': cannot be created: .*afile is a file"),
    # Root ignores permission bits; a read-only file system refuses everyone.
    Bad("cache-dir-read-only", {}, "cache_dir", options={"cache_dir": "/proc/zarr-parallel-test/caches"}, matches=r"cache_dir='/proc/zarr-parallel-test/caches': is not writable \(/proc: "),
    Bad("cache-store-and-dir", {}, "cache_store", options={"cache_store": "{tmp}/caches/x.zarr"}, matches="exactly one of cache_store and cache_dir must be given"),
    # Values the request's JSON form cannot carry, or that mean nothing ([safety])
    Bad("timeout-nan", {}, "worker_timeout", options={"worker_timeout": float("nan")}, matches="worker_timeout=nan: is not a finite number"),
    Bad("timeout-inf", {}, "worker_timeout", options={"worker_timeout": float("inf")}, matches="worker_timeout=inf: is not a finite number"),
    Bad("timeout-negative", {}, "worker_timeout", options={"worker_timeout": -5}, matches="worker_timeout=-5: must be a positive, finite duration"),
    Bad("timeout-zero", {}, "worker_timeout", options={"worker_timeout": 0}, matches="worker_timeout=0: must be a positive, finite duration"),
    Bad("selection-nan", {"preprocessors": [{"type": "sel", "latitude": [float("nan"), 10]}]}, "preprocessors[0].latitude[0]", matches=r"preprocessors\[0\]\.latitude\[0\]=nan: is not a finite number"),
    Bad("chunks-boolean", {"chunks": {"time": True}}, "chunks", matches=r"chunks=\{'time': True\}: the size of 'time' is True, not a number of elements"),
    Bad("num-jobs-boolean", {}, "num_jobs", options={"num_jobs": True}, matches=r"num_jobs=True: is True \(true/false\), not a whole number"),
    # Tile dimension names become folders of the cache
    Bad("tiles-within-separator", {"tiles": {"size": {"latitude": 8}, "within": {"latitude": "a/b"}}}, "tiles.within.latitude", matches=r"tiles\.within\.latitude='a/b': contains a path separator"),
    Bad("tiles-within-parent", {"tiles": {"size": {"latitude": 8}, "within": {"latitude": ".."}}}, "tiles.within.latitude", matches=r"tiles\.within\.latitude='\.\.': is a relative path"),
    Bad("tiles-dim-escape", {"tiles": {"latitude": 8, "dim": "../../x"}}, "tiles.dim", matches=r"tiles\.dim='\.\./\.\./x': contains a path separator"),
    # URL cache paths: no object-store targets yet (a folder named 's3:' was written)
    Bad("cache-store-url", {}, "cache_store", options={"cache_dir": None, "cache_store": "s3://bucket/x.zarr"}, matches=r"cache_store='s3://bucket/x\.zarr': is a URL"),
    Bad("cache-dir-url", {}, "cache_dir", options={"cache_dir": "gs://bucket/caches"}, matches="cache_dir='gs://bucket/caches': is a URL"),
    Bad("cache-store-file-url", {}, "cache_store", options={"cache_dir": None, "cache_store": "file:///x.zarr"}, matches=r"cache_store='file:///x\.zarr': is a URL.*without 'file://'"),
]
# fmt: on


def _fill_tmp(value: Any, tmp: Path) -> Any:
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


@pytest.mark.parametrize("case", FRESH_CASES, ids=[c.id for c in FRESH_CASES])
def test_bad_input_creates_nothing(
    era5_files: list[Path], tmp_path: Path, case: Bad, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The memory figures in the messages are the xarray path's model (the fast read path has
    # its own, zarr_parallel.planning.memory.fast_job_memory).
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake lands where it is seen
    (tmp_path / "afile").write_text("not a folder")
    before = _tree(tmp_path)
    fields = {"data_uri": [str(p) for p in era5_files], **case.fields}
    fields = {k: _fill_tmp(v, tmp_path) for k, v in fields.items()}
    options = {"cache_dir": str(tmp_path / "caches"), **case.options}
    options = {k: _fill_tmp(v, tmp_path) for k, v in options.items()}
    with pytest.raises(case.error, match=case.matches) as info:
        zp = ZarrParallelAssembler(**fields)
        zp.cache(deploy_mode="series", **options)
    assert getattr(info.value, "parameter", None) == case.parameter
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


# ---------------------------------------------------------------------------------------------
# A disk that fills up while the cache is written


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 24 MB tmpfs (True), or a plain folder when mounting is not allowed here (False)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    # ZARR_PARALLEL_TEST_NO_TMPFS=1 exercises the fallback on machines that can mount.
    mounted = not os.environ.get("ZARR_PARALLEL_TEST_NO_TMPFS") and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield disk, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill_disk(disk: Path) -> Path:
    filler = disk / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_disk_fills_mid_write(
    small_disk: tuple[Path, bool], era5_files: list[Path], tmp_path: Path
) -> None:
    """The run fails clearly, the old cache stays published, and a re-run resumes.

    On a tmpfs the disk really fills (ENOSPC) once the run has recorded its first job. Where
    mounting is not allowed, the frozen run's file-size limit is cut instead (EFBIG), which
    fails the remaining writes the same way.
    """
    disk, mounted = small_disk
    cache = disk / "era5.zarr"
    src = [str(p) for p in era5_files]
    old = {**_fill(BASE, {"src": src, "cache": str(cache)}), "variables": {"t2m": {}}}
    run_request(build_request(**old))
    published, files = cache.resolve(), cache_files(cache)
    new = {**old, "variables": None, "chunks": OTHER, "num_jobs": 4}
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump({k: v for k, v in new.items() if v is not None}))
    filler: Path | None = None
    with frozen_run(request, "job-recorded#1") as proc:
        if mounted:
            filler = _fill_disk(disk)
        else:
            psutil.Process(proc.pid).rlimit(psutil.RLIMIT_FSIZE, (4096, 4096))
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    reason = "No space left on device" if mounted else "File too large"
    assert "run failed:" in err and reason in err and "resume" in err, err[-3000:]
    # The old cache is still the published one, unchanged and readable.
    assert cache.resolve() == published and cache_files(cache) == files
    with xr.open_zarr(cache) as ds, xr.open_mfdataset(src, engine="h5netcdf") as source:
        np.testing.assert_array_equal(ds.t2m.values, source.t2m.values)
    staging = next(v for v in CachePaths(cache).all_versions() if v != published)
    recorded = {r["id"] for r in iter_job_records(staging)}
    assert len(recorded) >= 1
    if filler is not None:
        filler.unlink()
    result = run_request(build_request(**new, resume=True))
    assert result.summary["resumed"]
    assert result.summary["jobs_run"] == result.summary["jobs"] - len(recorded)
    assert cache.resolve() == staging
    assert verify_cache(build_request(**new)).ok
