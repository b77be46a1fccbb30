"""Re-caching files that hold different variables, when the variables arrive on different days:
the steps every variable has are appended, the rest reported and appended once they arrive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from core_support import open_cache
from sources_support import write_variable_month
from zarr_parallel.orchestration.recache import recache_flow
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.store.paths import CachePaths


def _request(src: Path, cache: Path) -> CacheRequest:
    return build_request(
        data_uri=str(src / "*.nc"),
        cache_store=str(cache),
        chunks={"time": 8},
        deploy_mode="series",
        memory_limit="300MB",
    )


def _expected(src: Path, months: int) -> xr.Dataset:
    files = sorted(str(p) for p in src.glob("*.nc") if int(p.stem[-2:]) <= months)
    with xr.open_mfdataset(files, combine="by_coords") as ds:
        return ds.load()


def _assert_cache_is(cache: Path, expected: xr.Dataset) -> None:
    got = open_cache(cache)
    assert got.sizes == expected.sizes
    for name in ("t2m", "d2m", "time"):
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name].values, expected[name].values)


def test_d2m_newest_month_missing_then_arriving(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cache = tmp_path / "weather.zarr"
    for m in (1, 2):
        write_variable_month(src, "t2m", m)
        write_variable_month(src, "d2m", m, time_chunk=2)
    first = recache_flow(_request(src, cache))
    assert first["recache"]["action"] == "full"
    _assert_cache_is(cache, _expected(src, 2))

    # Day 2: t2m's March arrives, d2m's does not yet.
    write_variable_month(src, "t2m", 3)
    waiting = recache_flow(_request(src, cache))
    decision = waiting["recache"]
    assert decision["action"] == "up_to_date", decision
    (note,) = decision["pending"]
    assert "124 step(s) of t2m" in note and "t2m_2020-03.nc" in note and "until d2m" in note
    assert note in decision["reason"]
    assert open_cache(cache).sizes["time"] == 124 + 116

    # Day 3: d2m's March arrives: the re-cache appends March for both variables.
    version = CachePaths(cache).current()
    write_variable_month(src, "d2m", 3, time_chunk=2)
    appended = recache_flow(_request(src, cache))
    decision = appended["recache"]
    assert decision["action"] == "append", decision
    assert (decision["old_length"], decision["new_length"]) == (240, 364)
    assert {Path(f).name for f in decision["new_files"]} == {"t2m_2020-03.nc", "d2m_2020-03.nc"}
    assert decision["pending"] == []
    assert CachePaths(cache).current() != version
    _assert_cache_is(cache, _expected(src, 3))


def test_an_append_reports_steps_left_out(tmp_path: Path) -> None:
    """New files for both variables, one more for t2m: the common month is appended and the
    one only t2m has is reported in the decision and the run's notes."""
    src = tmp_path / "src"
    src.mkdir()
    cache = tmp_path / "weather.zarr"
    write_variable_month(src, "t2m", 1)
    write_variable_month(src, "d2m", 1)
    recache_flow(_request(src, cache))
    for m in (2, 3):
        write_variable_month(src, "t2m", m)
    write_variable_month(src, "d2m", 2)
    summary = recache_flow(_request(src, cache))
    decision = summary["recache"]
    assert decision["action"] == "append"
    assert (decision["old_length"], decision["new_length"]) == (124, 240)
    (note,) = decision["pending"]
    assert "t2m_2020-03.nc" in note and note in summary["notes"]
    _assert_cache_is(cache, _expected(src, 2))
