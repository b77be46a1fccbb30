"""Packed variables (int16 with scale_factor/add_offset, as ERA5 ships them), both ways.

Default: the cache holds the values as xarray decodes them. ``keep_packing: true``: the cache
holds the same integers with the same encoding, so it is as compact as the source and xarray
decodes it to the same values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from sources_support import RUN
from zarr_parallel import ZarrParallelAssembler


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 hourly steps on a 91 x 180 grid, int16 packed like ERA5, with missing values."""
    rng = np.random.default_rng(3)
    time = pd.date_range("2021-03-01", periods=48, freq="h")
    lat = np.linspace(90, -90, 91)
    lon = np.linspace(0, 360, 180, endpoint=False)
    t2m = (280 + 15 * rng.standard_normal((48, 91, 180))).astype("float32")
    t2m[3, 10:20, 5:50] = np.nan
    tp = np.abs(rng.standard_normal((48, 91, 180)) * 1e-3).astype("float32")
    ds = xr.Dataset(
        {
            "t2m": (("time", "latitude", "longitude"), t2m, {"units": "K"}),
            "tp": (("time", "latitude", "longitude"), tp, {"units": "m"}),
        },
        coords={"time": time, "latitude": lat, "longitude": lon},
        attrs={"Conventions": "CF-1.6"},
    )
    packing = {
        "t2m": {"scale_factor": 0.0016, "add_offset": 280.0},
        "tp": {"scale_factor": 1.2e-7, "add_offset": 0.0039},
    }
    encoding = {
        name: {
            "dtype": "int16",
            "_FillValue": np.int16(-32767),
            "missing_value": np.int16(-32767),
            "chunksizes": (6, 91, 180),
            "zlib": True,
            "complevel": 1,
            **p,
        }
        for name, p in packing.items()
    }
    path = tmp_path_factory.mktemp("packed") / "era5_packed.nc"
    ds.to_netcdf(path, engine="netcdf4", encoding=encoding)
    return path


#: First-use allocations a job's peak also shows at this small size (HDF5 chunk caches, codec
#: contexts, the thread pool): part of memory_reserve, not of the per-job estimate. At 100 MB
#: per job the decoded run peaks at 163 MB for a 160 MB estimate, the packed one at 122 MB.
FIRST_USE = 16 * 10**6


def _stored_bytes(cache: Path, name: str) -> int:
    return sum(p.stat().st_size for p in (cache.resolve() / name).rglob("*") if p.is_file())


def _jobs(cache: Path) -> list[dict[str, int]]:
    folder = cache.resolve() / ".zarr-parallel" / "jobs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_packed_source_decoded_by_default(packed_file: Path, tmp_path: Path) -> None:
    result = ZarrParallelAssembler(str(packed_file), chunks={"time": 12}).cache(
        cache_store=str(tmp_path / "decoded.zarr"), **RUN
    )
    src = xr.open_dataset(packed_file)
    out = xr.open_zarr(result.path)
    for name in ("t2m", "tp"):
        xr.testing.assert_identical(out[name].load(), src[name].load())
        stored = zarr.open_array(result.path, path=name, mode="r")
        assert stored.dtype == src[name].dtype  # floats on disk, not the packed integers
        assert "scale_factor" not in stored.attrs and "add_offset" not in stored.attrs
    assert int(np.isnan(out.t2m.values).sum()) == 10 * 45
    for job in _jobs(result.path):
        assert job["peak_memory"] <= job["estimated_memory"] + FIRST_USE, job


def test_keep_packing_round_trips_the_integers(packed_file: Path, tmp_path: Path) -> None:
    decoded = ZarrParallelAssembler(str(packed_file), chunks={"time": 12}).cache(
        cache_store=str(tmp_path / "decoded.zarr"), **RUN
    )
    result = ZarrParallelAssembler(str(packed_file), chunks={"time": 12}, keep_packing=True).cache(
        cache_store=str(tmp_path / "packed.zarr"), **RUN
    )
    assert result.summary["fingerprint"] != decoded.summary["fingerprint"]
    src = xr.open_dataset(packed_file)
    out = xr.open_zarr(result.path)
    raw_src = xr.open_dataset(packed_file, mask_and_scale=False)
    raw_out = xr.open_zarr(result.path, mask_and_scale=False)
    for name in ("t2m", "tp"):
        # Decoded: the same values, dtype and attributes as the source.
        xr.testing.assert_identical(out[name].load(), src[name].load())
        # Stored: the same integers with the same packing.
        np.testing.assert_array_equal(raw_out[name].values, raw_src[name].values)
        assert raw_out[name].dtype == np.dtype("int16")
        for key in ("scale_factor", "add_offset", "_FillValue"):
            assert out[name].encoding[key] == src[name].encoding[key], key
        assert out[name].encoding["dtype"] == np.dtype("int16")
        # As compact as the source: the integers take half the bytes of the floats.
        assert _stored_bytes(result.path, name) < 0.75 * _stored_bytes(decoded.path, name)
    for job in _jobs(result.path):
        assert job["peak_memory"] <= job["estimated_memory"] + FIRST_USE, job


def test_packing_asked_by_the_encoding_transform_is_kept(
    era5_files: list[Path], tmp_path: Path
) -> None:
    pack = {
        "type": "encoding",
        "dtype": "int16",
        "scale_factor": 0.01,
        "add_offset": 280.0,
        "_FillValue": -32767,
    }
    result = ZarrParallelAssembler(
        [str(p) for p in era5_files], chunks={"time": 12}, variables={"t2m": [pack]}
    ).cache(cache_store=str(tmp_path / "asked.zarr"), **RUN)
    stored = zarr.open_array(result.path, path="t2m", mode="r")
    assert stored.dtype == np.dtype("int16")
    src = xr.open_mfdataset(era5_files, engine="h5netcdf").t2m.values
    out = xr.open_zarr(result.path).t2m.values
    np.testing.assert_allclose(out, src, atol=0.005 + 1e-6)
