"""Multi-file time handling: mixed units and calendars, duplicated or backward steps, and the
recipes for the new CDS layout (``valid_time``/``expver``) and longitude -180..180."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from sources_support import RUN
from zarr_parallel import RequestError, ZarrParallelAssembler

GRID = {"latitude": np.linspace(90, -90, 19), "longitude": np.arange(0, 360, 20.0)}


def _write(
    path: Path,
    times: pd.DatetimeIndex | list[Any],
    units: str,
    dtype: str = "int64",
    calendar: str = "standard",
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    shape = (len(times), 19, 18)
    ds = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), rng.random(shape, dtype="float32"))},
        coords={"time": times, **GRID},
    )
    ds.to_netcdf(
        path,
        engine="netcdf4",
        encoding={
            "time": {"units": units, "dtype": dtype, "calendar": calendar},
            "t2m": {"chunksizes": (6, 19, 18), "zlib": True},
        },
    )
    return path


def _hours(start: str, n: int) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=n, freq="h")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three consecutive days of hourly steps, each file with its own time encoding."""
    d = tmp_path_factory.mktemp("mixed")
    return [
        _write(d / "a.nc", _hours("2020-01-01", 24), "hours since 2020-01-01", seed=1),
        _write(
            d / "b.nc",
            _hours("2020-01-02", 24),
            "days since 1900-01-01",
            dtype="float64",
            calendar="gregorian",
            seed=2,
        ),
        _write(
            d / "c.nc",
            _hours("2020-01-03", 24),
            "seconds since 2020-01-03 00:00:00",
            calendar="proleptic_gregorian",
            seed=3,
        ),
    ]


def _raw_time(cache: Path) -> xr.DataArray:
    return xr.open_zarr(cache, decode_times=False)["time"]


def test_mixed_time_units_combine_and_stay_consistent(mixed: list[Path], tmp_path: Path) -> None:
    first = ZarrParallelAssembler([str(p) for p in mixed[:2]], chunks={"time": 12}).cache(
        cache_store=str(tmp_path / "two.zarr"), **RUN
    )
    third = ZarrParallelAssembler([str(p) for p in mixed], chunks={"time": 12}).cache(
        cache_store=str(tmp_path / "three.zarr"), **RUN
    )
    expected = xr.concat([xr.open_dataset(p) for p in mixed], dim="time")
    out = xr.open_zarr(third.path)
    np.testing.assert_array_equal(out.time.values, expected.time.values)
    np.testing.assert_array_equal(out.t2m.values, expected.t2m.values)
    # One encoding for the whole axis: the first file's, as exact integers...
    raw2, raw3 = _raw_time(first.path), _raw_time(third.path)
    for raw in (raw2, raw3):
        assert raw.attrs["units"] == "hours since 2020-01-01"
        assert raw.dtype == np.int64
    np.testing.assert_array_equal(raw3.values, np.arange(72))
    # ...and the same when more files follow (what an append relies on).
    np.testing.assert_array_equal(raw3.values[:48], raw2.values)


def test_finer_steps_in_a_later_file_get_a_unit_that_holds_them(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.nc", _hours("2020-01-01", 6), "hours since 2020-01-01")
    half = pd.date_range("2020-01-01 06:00", periods=6, freq="30min")
    b = _write(tmp_path / "b.nc", half, "minutes since 2020-01-01 06:00")
    result = ZarrParallelAssembler([str(a), str(b)], chunks={"time": 6}).cache(
        cache_store=str(tmp_path / "c.zarr"), **RUN
    )
    raw = _raw_time(result.path)
    assert raw.attrs["units"] == "minutes since 2020-01-01"  # xarray drops a midnight time
    np.testing.assert_array_equal(
        xr.open_zarr(result.path).time.values, np.concatenate([_hours("2020-01-01", 6), half])
    )


def test_disagreeing_calendars_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "std.nc", _hours("2020-01-01", 6), "hours since 2020-01-01")
    b = _write(
        tmp_path / "noleap.nc",
        _hours("2020-01-01 06:00", 6),
        "hours since 2020-01-01",
        calendar="noleap",
    )
    with pytest.raises(RequestError, match=r"different calendars.*noleap: noleap\.nc") as e:
        ZarrParallelAssembler([str(a), str(b)]).cache(cache_store=str(tmp_path / "x.zarr"), **RUN)
    assert e.value.parameter == "data_uri"


def test_duplicated_step_is_refused_before_writing(tmp_path: Path) -> None:
    a = _write(tmp_path / "day1.nc", _hours("2020-01-01", 24), "hours since 2020-01-01")
    b = _write(tmp_path / "day2.nc", _hours("2020-01-01 23:00", 24), "hours since 2020-01-01")
    c = _write(tmp_path / "day3.nc", _hours("2020-01-02 23:00", 24), "hours since 2020-01-01")
    cache = tmp_path / "dup.zarr"
    with pytest.raises(
        RequestError, match=r"time=2020-01-01 23:00:00 appears twice \(in day1\.nc and day2\.nc\)"
    ) as e:
        ZarrParallelAssembler([str(c), str(b), str(a)]).cache(cache_store=str(cache), **RUN)
    assert e.value.value == ["day1.nc", "day2.nc"]
    assert not cache.exists() and not Path(f"{cache}.versions").exists()


def test_backward_steps_inside_a_file_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "ok.nc", _hours("2020-01-01", 6), "hours since 2020-01-01")
    times = list(_hours("2020-01-01 06:00", 6))
    times[2], times[3] = times[3], times[2]
    b = _write(tmp_path / "shuffled.nc", times, "hours since 2020-01-01")
    with pytest.raises(RequestError, match=r"go backwards.*\(in shuffled\.nc\)"):
        ZarrParallelAssembler([str(a), str(b)]).cache(cache_store=str(tmp_path / "x.zarr"), **RUN)
    with pytest.raises(RequestError, match=r"go backwards.*\(in shuffled\.nc\)"):
        ZarrParallelAssembler(str(b)).cache(cache_store=str(tmp_path / "y.zarr"), **RUN)


def _cds_like(path: Path) -> Path:
    """The new CDS netCDF layout: ``valid_time`` as the time dimension, ``expver`` per step
    (ERA5 final '0001' then ERA5T '0005'), a scalar ``number``, longitude 0..340."""
    times = _hours("2024-06-01", 12)
    rng = np.random.default_rng(7)
    ds = xr.Dataset(
        {
            "t2m": (
                ("valid_time", "latitude", "longitude"),
                rng.random((12, 19, 18), dtype="float32"),
                {"units": "K"},
            )
        },
        coords={
            "valid_time": times,
            **GRID,
            "number": 0,
            "expver": ("valid_time", np.array(["0001"] * 8 + ["0005"] * 4)),
        },
    )
    ds.to_netcdf(
        path,
        engine="netcdf4",
        encoding={
            "valid_time": {"units": "seconds since 1970-01-01", "dtype": "int64"},
            "t2m": {"chunksizes": (1, 19, 18), "zlib": True},
        },
    )
    return path


CDS_RECIPE: list[dict[str, Any]] = [
    {"type": "drop_vars", "names": ["expver", "number"]},
    {"type": "rename", "new_name_or_name_dict": {"valid_time": "time"}},
    {"type": "roll", "longitude": 9, "wrap_longitude": True},
]


def test_cds_valid_time_expver_recipe(tmp_path: Path) -> None:
    src_path = _cds_like(tmp_path / "cds.nc")
    result = ZarrParallelAssembler(
        str(src_path), preprocessors=CDS_RECIPE, chunks={"time": 6}
    ).cache(cache_store=str(tmp_path / "cds.zarr"), **RUN)
    out = xr.open_zarr(result.path)
    src = xr.open_dataset(src_path)
    assert set(out.dims) == {"time", "latitude", "longitude"}
    assert "expver" not in out.variables and "number" not in out.variables
    np.testing.assert_array_equal(out.time.values, src.valid_time.values)
    np.testing.assert_array_equal(out.longitude.values, np.arange(-180, 180, 20.0))
    expected = src.t2m.roll(longitude=9).values
    np.testing.assert_array_equal(out.t2m.values, expected)
    # -180 comes from 180 in the source: the same column.
    np.testing.assert_array_equal(
        out.t2m.sel(longitude=-180).values, src.t2m.sel(longitude=180).values
    )
