"""A first end-to-end run through the Python API in series mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from zarr_parallel import ZarrParallelAssembler


def test_series_round_trip(era5_files: list[Path], tmp_path: Path) -> None:
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files], chunks={"time": 12}, variables={"d2m": {}}, cache_label="_v1"
    )
    result = zp.cache(cache_dir=str(tmp_path), deploy_mode="series", memory_limit="300MB")
    assert result.path == tmp_path / "era5_like_v1.zarr"
    out = xr.open_zarr(result.path)
    src = xr.open_mfdataset(era5_files, engine="h5netcdf")
    np.testing.assert_array_equal(out.d2m.values, src.d2m.values)
    assert out.d2m.dtype == src.d2m.dtype
