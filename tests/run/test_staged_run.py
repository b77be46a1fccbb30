"""Staged runs end to end (docs/design.md §3.4, "Strategies"): map → time series and back through
an intermediate Zarr store, equal to the source (values and dtypes); resume after a kill in
either stage; the intermediate gone after publish; a staged cache verified by its checksums.

Small real netCDF4 files; the memory limit is made tight with ``memory_reserve`` so that a direct
plan would re-read the source many times and the planner chooses two stages. The xarray read
path is used (``ZARR_PARALLEL_FAST_READ=0``): its memory model has no fixed thread allowance,
so a few MB of data are enough to need staging.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from core_support import cli_run
from zarr_parallel.api import run_request
from zarr_parallel.request.model import build_request
from zarr_parallel.run.stages import stage_request
from zarr_parallel.run.steps import initialise, make_plan, prepare
from zarr_parallel.run.verify import verify_cache
from zarr_parallel.run.warm import warm
from zarr_parallel.store.manifest import iter_job_records, plan_record
from zarr_parallel.store.paths import CachePaths

TIME_SERIES = {"time": 96, "latitude": 8, "longitude": 8}
MAPS = {"time": 1, "latitude": 91, "longitude": 180}


@pytest.fixture(autouse=True)
def xarray_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "fast" not in request.node.name:
        monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")


@pytest.fixture(scope="module")
def maps(era5_factory: Any) -> list[Path]:
    """Four days of hourly maps, one HDF5 chunk per step (the archive layout)."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None)


@pytest.fixture(scope="module")
def packed_maps(era5_factory: Any) -> list[Path]:
    """The maps as ERA5 ships them: int16 with scale_factor, add_offset and _FillValue."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None, packed=True)


@pytest.fixture(scope="module")
def big_maps(era5_factory: Any) -> list[Path]:
    """Larger maps for the fast path, whose memory model counts reader and encoder threads."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=181, nlon=360, chunks=None)


@pytest.fixture(scope="module")
def series(era5_factory: Any) -> list[Path]:
    """The same grid stored as time series: HDF5 chunks of a whole file's steps × 8 × 8."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=(24, 8, 8))


def fields(files: list[Path], store: Path, chunks: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "data_uri": [str(p) for p in files],
        "cache_store": str(store),
        "chunks": chunks,
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "memory_reserve": "290MB",
        "recommend_changes": "proceed",
        "retries": 0,
        **extra,
    }


def assert_equal_to_source(store: Path, files: list[Path]) -> None:
    got = xr.open_zarr(store).load()
    with xr.open_mfdataset(files) as src:
        want = src.load()
    for name in ("t2m", "d2m"):
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name].values, want[name].values)
    np.testing.assert_array_equal(got["time"].values, want["time"].values)


def assert_no_intermediate(store: Path) -> None:
    versions = CachePaths(store).versions
    assert not list(versions.glob(".stage-*")), "the intermediate must be removed after publish"


@pytest.mark.parametrize(
    ("source", "chunks", "mode", "reserve"),
    [
        pytest.param("maps", TIME_SERIES, "series", "290MB", id="maps-to-time-series-series"),
        pytest.param("series", MAPS, "series", "296MB", id="time-series-to-maps-series"),
        pytest.param(
            "maps", TIME_SERIES, "dask_distributed", "290MB", id="maps-to-time-series-dask"
        ),
        pytest.param(
            "big_maps", TIME_SERIES, "series", "280MB", id="maps-to-time-series-fast-series"
        ),
        # Each stage's jobs on SLURM jobs of the local single-node SLURM (scripts/slurm-local.sh).
        pytest.param(
            "maps",
            TIME_SERIES,
            "SLURM",
            "290MB",
            id="maps-to-time-series-slurm",
            marks=[pytest.mark.slurm, pytest.mark.timeout(900)],
        ),
    ],
)
def test_staged_round_trip(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    source: str,
    chunks: dict[str, int],
    mode: str,
    reserve: str,
) -> None:
    files = request.getfixturevalue(source)
    if mode == "SLURM":
        request.getfixturevalue("slurm")  # the local SLURM is up (fails under CI=true if not)
    extra: dict[str, Any] = {"memory_reserve": reserve}
    if mode != "series":
        # Beside each dask worker process the budget loses its 250 MB allowance.
        extra.update(memory_limit="550MB", simultaneous_worker_limit=2)
    req = build_request(**fields(files, tmp_path / "c.zarr", chunks, deploy_mode=mode, **extra))
    _, plan = make_plan(req)
    assert plan.strategy == "staged", plan.strategy_reason
    assert plan.read_amplification == 1.0
    result = run_request(req)
    assert result.summary["strategy"] == "staged"
    # Stage 1 went through the fast path where the request is fast-path material.
    fast = [r for r in result.summary["job_results"] if r.get("fast_read")]
    assert not fast  # the last stage copies from the intermediate (no source reads)
    assert [s["stage"] for s in result.summary["stages"]] == [1, 2]
    assert_equal_to_source(tmp_path / "c.zarr", files)
    assert_no_intermediate(tmp_path / "c.zarr")
    arr_chunks = xr.open_zarr(tmp_path / "c.zarr")["t2m"].encoding["chunks"]
    shape = xr.open_zarr(tmp_path / "c.zarr")["t2m"].shape
    assert arr_chunks == tuple(min(c, n) for c, n in zip(chunks.values(), shape, strict=True))


def test_the_plan_view_shows_each_stage(maps: list[Path], tmp_path: Path) -> None:
    """``plan`` prints the strategy and one line per stage, as the run's artifact does."""
    from zarr_parallel.run.plan_view import view_plan

    req = build_request(**fields(maps, tmp_path / "c.zarr", TIME_SERIES, memory_reserve="296MB"))
    view = view_plan(req)
    assert view.plan.strategy == "staged"
    lines = view.text().splitlines()
    assert any(line.startswith("strategy:") and "staged: " in line for line in lines)
    stages = [line for line in lines if line.startswith("stage ")]
    assert [line.split(":")[0] for line in stages] == ["stage 1/2", "stage 2/2"], stages
    assert "intermediate chunks" in stages[0] and "intermediate chunks" not in stages[1]
    assert not (tmp_path / "c.zarr").exists()


def _killed(fields_: dict[str, Any], folder: Path, fault: str) -> None:
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(fields_))
    proc = cli_run(path, f"kill@{fault}")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}: {err[-2000:]}"


@pytest.mark.parametrize("stage", [1, 2])
def test_kill_in_a_stage_then_resume(maps: list[Path], tmp_path: Path, stage: int) -> None:
    store = tmp_path / "c.zarr"
    f = fields(maps, store, TIME_SERIES)
    _, plan = make_plan(build_request(**f))
    n1 = len(plan.stages[0].plan.jobs)
    assert n1 >= 2 and len(plan.jobs) >= 2
    # The second job of the stage records, then the process is killed.
    _killed(f, tmp_path, f"job-recorded#{2 if stage == 1 else n1 + 2}")
    paths = CachePaths(store)
    assert not store.exists()
    (inter,) = paths.versions.glob(".stage-1-*")
    # The intermediate's codec: zstd level 1 in Blosc with byte shuffle and 1 MiB blocks
    # (store.intermediate).
    (blosc,) = zarr.open_array(inter, path="t2m", mode="r").compressors
    got = (blosc.cname.value, blosc.clevel, blosc.shuffle.value, blosc.blocksize)
    assert got == ("zstd", 1, "shuffle", 2**20)
    stage1_done = {r["id"] for r in iter_job_records(inter)}
    (version,) = paths.all_versions()
    stage2_done = {r["id"] for r in iter_job_records(version)}
    if stage == 1:
        assert len(stage1_done) == 2 and not stage2_done
    else:
        assert len(stage1_done) == n1 and len(stage2_done) == 2
        # The first recorded stage-2 job let go of the intermediate chunks only it read (emptied
        # files); the job killed at its record, and those not run, kept theirs.
        sizes = [p.stat().st_size for p in (inter / "t2m" / "c").rglob("*") if p.is_file()]
        assert 0 < sizes.count(0) < len(sizes)
    before = {r["id"]: r["pid"] for r in iter_job_records(inter)}
    result = run_request(build_request(**f))
    assert result.summary["resumed"]
    # Only what was not recorded ran again, in either stage.
    assert result.summary["jobs_run"] == len(plan.jobs) - len(stage2_done)
    assert plan_record(store.resolve())["fingerprint"] == plan.fingerprint
    assert_equal_to_source(store, maps)
    assert_no_intermediate(store)
    assert before and all(pid != 0 for pid in before.values())


def test_staged_run_in_temp_store_with_statistics(maps: list[Path], tmp_path: Path) -> None:
    """The intermediate goes under temp_store (only its own subfolder is removed), and the
    statistics a staged run reports are those of the values."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("not ours")
    store = tmp_path / "c.zarr"
    f = fields(maps, store, TIME_SERIES, temp_store=str(scratch), generate_stats=True)
    result = run_request(build_request(**f))
    assert result.summary["strategy"] == "staged"
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]
    assert_equal_to_source(store, maps)
    got = xr.open_zarr(store).load()
    stats = result.summary["stats"]["t2m"]
    assert stats["count"] == got["t2m"].size
    assert stats["min"] == pytest.approx(float(got["t2m"].min()))
    assert stats["max"] == pytest.approx(float(got["t2m"].max()))


def _region_checksums(store: Path) -> list[dict[str, str]]:
    return [r["checksums"] for r in iter_job_records(store.resolve())]


def test_staged_cache_verifies_by_checksum(maps: list[Path], tmp_path: Path) -> None:
    """The last stage's copy jobs record the CRC32 of each region as xarray decodes it from the
    cache, so a full ``verify`` compares a staged cache with its checksums (also before
    publishing) and catches a chunk changed after the run as a ``checksum`` problem."""
    store = tmp_path / "c.zarr"
    req = build_request(**fields(maps, store, TIME_SERIES, verify_before_publish="full"))
    result = run_request(req)
    assert result.summary["strategy"] == "staged"
    records = _region_checksums(store)
    assert records and all(set(r) == {"t2m", "d2m"} for r in records), records
    report = verify_cache(req, mode="full")
    assert report.ok, report.text()
    assert report.checksums_compared == 2 * len(records) and not report.checksums_missing
    assert f"checksums {2 * len(records)} job regions compared" in report.text()
    # A chunk of the target rewritten with other values that decode fine.
    arr = zarr.open_array(store.resolve(), path="t2m", mode="r+")
    arr[0:96, 8:16, 0:8] = arr[0:96, 8:16, 0:8] + np.float32(0.5)
    report = verify_cache(req, mode="full")
    t2m = [p for p in report.problems if p.variable == "t2m"]
    assert {p.kind for p in t2m} == {"checksum", "values"}, report.text()
    assert not [p for p in report.problems if p.variable == "d2m"]


def test_staged_packed_variables_keep_their_checksums(
    packed_maps: list[Path], tmp_path: Path
) -> None:
    """Packed int16 kept packed (``scale_factor``, ``add_offset``, ``_FillValue``) through a
    staged plan: the copy jobs' checksums are those of the decoded values, which verify
    accepts; statistics are those of the decoded values too."""
    store = tmp_path / "c.zarr"
    req = build_request(
        **fields(packed_maps, store, TIME_SERIES, keep_packing=True, generate_stats=True)
    )
    result = run_request(req)
    assert result.summary["strategy"] == "staged"
    raw = zarr.open_array(store.resolve(), path="t2m")
    assert raw.dtype == np.int16 and raw.attrs["scale_factor"] == 0.002
    assert_equal_to_source(store, packed_maps)
    assert all(set(r) == {"t2m", "d2m"} for r in _region_checksums(store))
    report = verify_cache(req, mode="full")
    assert report.ok, report.text()
    assert report.checksums_compared > 0 and not report.checksums_missing
    got = xr.open_zarr(store)["t2m"].values
    stats = result.summary["stats"]["t2m"]
    assert stats["count"] == got.size and stats["nan_count"] == np.isnan(got).sum()
    assert stats["min"] == pytest.approx(float(np.nanmin(got)))
    assert stats["max"] == pytest.approx(float(np.nanmax(got)))


def test_a_staged_runs_first_jobs_are_its_first_stages_and_only_they_are_warmed(
    maps: list[Path], tmp_path: Path
) -> None:
    """The job processes of a staged run ready stage 1 (it reads the source); the later stages
    copy an intermediate store and have nothing to ready (zarr_parallel.run.warm)."""
    prepared = prepare(build_request(**fields(maps, tmp_path / "c.zarr", TIME_SERIES)))
    initialise(prepared)
    assert prepared.plan.stages
    first = prepared.first_write()
    assert first is not None
    request_json, folder = first
    assert folder == str(prepared.intermediates[0])
    assert (
        request_json == stage_request(prepared.request, prepared.plan.stages[0]).model_dump_json()
    )
    assert request_json != prepared.request_json
    assert warm(prepared.request_json, str(prepared.version)) == {"files": 0, "kept": 0}
