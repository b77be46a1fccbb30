"""One variable per file, end to end: two variables × three months each, cached through the
command line (series) and through Python (dask_distributed), equal to what xarray's
``open_mfdataset`` merges (values and dtypes), each variable's chunks read once."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr
import yaml

from core_support import cli_result, open_cache
from sources_support import write_variable_month
from zarr_parallel import ZarrParallelAssembler


@pytest.fixture(scope="module")
def monthly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """t2m and d2m, one file per variable and month; t2m packed as ERA5 ships it (int16)."""
    folder = tmp_path_factory.mktemp("monthly")
    for m in (1, 2, 3):
        write_variable_month(folder, "t2m", m, time_chunk=4, packed=True)
        write_variable_month(folder, "d2m", m, time_chunk=2)
    return folder


def _assert_same_as_xarray(cache: Path, folder: Path) -> None:
    files = sorted(str(p) for p in folder.glob("*.nc"))
    with xr.open_mfdataset(files, combine="by_coords") as expected:
        got = open_cache(cache)
        assert set(got.data_vars) == set(expected.data_vars) == {"t2m", "d2m"}
        for name in expected.variables:
            assert got[name].dtype == expected[name].dtype, name
            xr.testing.assert_equal(got[name], expected[name].load())
        assert got.sizes == expected.sizes


def test_cli_series_run_equals_open_mfdataset(monthly: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.yaml"
    cache = tmp_path / "weather.zarr"
    fields = {
        "data_uri": str(monthly / "*.nc"),
        "cache_store": str(cache),
        "chunks": {"time": 8},
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 3,
    }
    request.write_text(yaml.safe_dump(fields))
    done = cli_result(request)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read amplification  1.00" in done.stdout
    _assert_same_as_xarray(cache, monthly)


def test_python_dask_distributed_run_equals_open_mfdataset(monthly: Path, tmp_path: Path) -> None:
    cache = tmp_path / "weather.zarr"
    result = ZarrParallelAssembler(str(monthly / "*.nc"), chunks={"time": 8}).cache(
        str(cache),
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
        memory_limit="1GB",
        num_jobs=3,
    )
    assert result.summary["read_amplification"] == pytest.approx(1.0)
    # Every variable of every job took the fast raw-chunk path, from its own files.
    jobs = result.jobs
    assert {name for job in jobs for name in job["checksums"]} == {"t2m", "d2m"}
    assert all(set(job.get("fast_read") or {}) == set(job["checksums"]) for job in jobs), jobs
    _assert_same_as_xarray(cache, monthly)


def test_xarray_read_path_gives_the_same_cache(
    monthly: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fast path off, jobs read the merged dataset through xarray: the same cache."""
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    cache = tmp_path / "weather.zarr"
    result = ZarrParallelAssembler(str(monthly / "*.nc"), chunks={"time": 8}).cache(
        str(cache), deploy_mode="series", memory_limit="300MB", num_jobs=2
    )
    assert not any(job.get("fast_read") for job in result.jobs)
    _assert_same_as_xarray(cache, monthly)
