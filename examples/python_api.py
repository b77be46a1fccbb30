"""The Python door: cache ERA5-like example files with ``ZarrParallelAssembler``, then read them.

Run from a clone after ``bash scripts/setup.sh`` (or with zarr-parallel installed)::

    python examples/python_api.py                     # example-data/ -> example-cache/
    python examples/python_api.py --data D --cache C  # other folders

It makes the example files if they are missing, caches two days of both variables (renaming one)
in 24-step chunks, prints the run's summary, opens the cache with ``open_cache`` (which pins the
version current when it opens) and checks it against the source with plain xarray. The same
request as a YAML file is ``examples/quickstart.yaml`` (the command-line door,
``examples/cli.sh``); the deployment door is ``examples/deployment.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import xarray as xr

from zarr_parallel import ZarrParallelAssembler, open_cache
from zarr_parallel.examples import make_era5_like


def main() -> None:
    """Cache the example data and compare the cache with the source."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="example-data", help="folder of the example files")
    parser.add_argument("--cache", default="example-cache", help="folder the cache goes in")
    args = parser.parse_args()

    data = Path(args.data)
    if not list(data.glob("era5_like_*.nc")):
        make_era5_like(data)  # four daily files, 73 x 144, t2m and d2m, real HDF5 chunks

    assembler = ZarrParallelAssembler(
        str(data / "era5_like_*.nc"),
        preprocessors=[{"type": "sel", "time": ["2020-01-01T00:00", "2020-01-02T23:00"]}],
        chunks={"time": 24, "latitude": 73, "longitude": 72},
        variables={"t2m": {}, "d2m": [{"type": "rename", "new_name_or_name_dict": "dew"}]},
        cache_label="_python_api",
    )
    # memory_limit is per worker; recommend_changes="halt" (the default) would stop with
    # proposals (RecommendationsPending) if this selection re-read source chunks.
    result = assembler.cache(cache_dir=args.cache, memory_limit="1GB")
    print(f"cache: {result.path}")
    summary = result.summary
    print(
        f"status: {result.status}, jobs: {summary['jobs']}, "
        f"read amplification: {summary['read_amplification']:.2f}"
    )

    source = xr.open_mfdataset(sorted(data.glob("era5_like_*.nc")), engine="h5netcdf")
    expected = source.sel(time=slice("2020-01-01T00:00", "2020-01-02T23:00"))
    with open_cache(result.path) as cached:
        for name, source_name in (("t2m", "t2m"), ("dew", "d2m")):
            assert cached[name].dtype == expected[source_name].dtype
            np.testing.assert_array_equal(cached[name].values, expected[source_name].values)
        print(f"variables {sorted(cached.data_vars)} equal the source, {dict(cached.sizes)}")


if __name__ == "__main__":
    main()
