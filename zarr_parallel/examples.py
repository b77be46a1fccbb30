"""ERA5-like example data with real HDF5 chunking, for the quickstart, tests and benchmarks."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

#: netCDF4 writes the examples where it is installed (the [netcdf4] extra, and every dev install);
#: h5netcdf, a default dependency, writes the same netCDF4/HDF5 files, so the quickstart runs on
#: a default install.
_ENGINE: Literal["netcdf4", "h5netcdf"] = (
    "netcdf4" if importlib.util.find_spec("netCDF4") else "h5netcdf"
)


def make_era5_like(
    folder: str | Path,
    n_files: int = 4,
    steps_per_file: int | Sequence[int] = 24,
    nlat: int = 73,
    nlon: int = 144,
    chunks: tuple[int, int, int] | None = None,
    variables: Sequence[str] = ("t2m", "d2m"),
    compression: str | None = "zlib",
    start: str = "2020-01-01",
    packed: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write hourly ERA5-like netCDF4 files (one per block of steps) and return their paths.

    Parameters
    ----------
    folder
        Where to write ``era5_like_000.nc``, ``era5_like_001.nc``...
    n_files, steps_per_file
        Number of files along time and steps in each (a sequence gives irregular files).
    nlat, nlon
        Grid size; latitude runs 90 → -90 (descending, as ERA5 does), longitude 0 → 360.
    chunks
        HDF5 chunk shape ``(time, latitude, longitude)``; default one step × full grid (the
        archive layout). ``None`` in a position is clamped to the file's length.
    compression
        ``"zlib"`` (level 1 + shuffle, as the archive does) or ``None`` for uncompressed.
    packed
        Store int16 with ``scale_factor``/``add_offset``, as ERA5 ships them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = [steps_per_file] * n_files if isinstance(steps_per_file, int) else list(steps_per_file)
    rng = np.random.default_rng(seed)
    lat = np.linspace(90, -90, nlat, dtype="float64")
    lon = np.linspace(0, 360, nlon, endpoint=False, dtype="float64")
    t0 = pd.Timestamp(start)
    paths: list[Path] = []
    offset = 0
    for i, n in enumerate(steps):
        time = pd.date_range(t0 + pd.Timedelta(hours=offset), periods=n, freq="h")
        offset += n
        data_vars = {}
        for j, name in enumerate(variables):
            base = 270.0 + 10 * j + 20 * np.cos(np.deg2rad(lat))[None, :, None]
            values = base + rng.standard_normal((n, nlat, nlon)).astype("float32")
            data_vars[name] = (
                ("time", "latitude", "longitude"),
                values.astype("float32"),
                {"units": "K", "long_name": f"{name} (synthetic)"},
            )
        ds = xr.Dataset(
            data_vars,
            coords={
                "time": ("time", time),
                "latitude": ("latitude", lat, {"units": "degrees_north"}),
                "longitude": ("longitude", lon, {"units": "degrees_east"}),
            },
            attrs={"Conventions": "CF-1.6", "source": "zarr-parallel synthetic ERA5-like data"},
        )
        shape = (n, nlat, nlon)
        chunk = tuple(min(c or s, s) for c, s in zip(chunks or (1, nlat, nlon), shape, strict=True))
        encoding: dict[str, dict[str, object]] = {}
        for name in variables:
            enc: dict[str, object] = {"chunksizes": chunk}
            if compression == "zlib":
                enc.update(zlib=True, complevel=1, shuffle=True)
            if packed:
                enc.update(dtype="int16", scale_factor=0.002, add_offset=280.0, _FillValue=-32767)
            encoding[name] = enc
        encoding["time"] = {"units": f"hours since {t0:%Y-%m-%d %H:%M:%S}", "dtype": "int64"}
        path = folder / f"era5_like_{i:03d}.nc"
        ds.to_netcdf(path, engine=_ENGINE, encoding=encoding)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m zarr_parallel.examples FOLDER``: write the quickstart's example data."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args(argv)
    for p in make_era5_like(args.folder, n_files=args.files, steps_per_file=args.steps):
        print(p)


if __name__ == "__main__":
    main()
