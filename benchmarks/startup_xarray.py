"""The plain xarray script a user would write instead of the quickstart request (#21's yardstick).

``python benchmarks/startup_xarray.py 'FOLDER/era5_like_*.nc' OUT.zarr``: the same files, the same
selection (``t2m``, and ``d2m`` renamed ``dew``; 2020-01-01T00:00 to 2020-01-03T23:00), the same
target chunks, one ``to_zarr`` (Zarr v3). Run as a fresh process by :mod:`benchmarks.startup`.
"""

import glob
import sys

import xarray as xr


def main() -> None:
    """Open, select, rechunk and write, as examples/quickstart.yaml asks."""
    pattern, out = sys.argv[1:3]
    ds = xr.open_mfdataset(sorted(glob.glob(pattern)), engine="h5netcdf", combine="by_coords")
    ds = ds[["t2m", "d2m"]].rename({"d2m": "dew"})
    ds = ds.sel(time=slice("2020-01-01T00:00", "2020-01-03T23:00"))
    ds = ds.chunk({"time": 24, "latitude": 73, "longitude": 72})
    for var in ds.variables.values():
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    ds.to_zarr(out, mode="w", zarr_format=3, consolidated=True)


if __name__ == "__main__":
    main()
