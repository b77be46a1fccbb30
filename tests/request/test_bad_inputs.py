"""A catalogue of bad inputs: each fails with a clear error naming what is wrong, and no existing
cache changes.

Every case runs against one published cache. Cases that fail before writing must leave the cache
location exactly as it was (link target, every file's bytes, no staging version); cases that can
only fail while writing must leave the published version untouched and readable. New cases are
one line in ``CASES``: request fields over ``BASE`` (``"@name"`` values and ``{name}`` in strings
are filled from the context below), or a request file for the YAML door.
"""

from __future__ import annotations

import errno
import os
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
from zarr_parallel.api import run_request
from zarr_parallel.errors import PlanError, RequestError, RunFailed
from zarr_parallel.examples import make_era5_like
from zarr_parallel.orchestration.cache import main
from zarr_parallel.request.model import build_request, load_request_file
from zarr_parallel.run.verify import cache_files, location_snapshot, verify_cache
from zarr_parallel.store.manifest import iter_job_records
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.transforms import registry as transforms

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


# One line per case: the table is easier to read and extend than formatted calls.
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
