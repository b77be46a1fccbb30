"""Series mode next to plain xarray on ≥ 1 GB (the performance report of the core issue).

``python -m benchmarks.series`` builds (or reuses) the 1.2 GB ``quick`` ERA5-like dataset (0.25°
grid, hourly, HDF5 chunks of one step × full grid, six daily files), writes it to target chunks
``{time: 48, latitude: 180, longitude: 360}`` with ``deploy_mode="series"`` and with
``xarray.open_mfdataset(...).chunk(target).to_zarr()`` in the same run, and prints wall time,
MB/s, measured read amplification and peak RSS of each (see :mod:`benchmarks.suite`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks import suite


def main(argv: Sequence[str] | None = None) -> int:
    """Run the two contenders; extra arguments go to :func:`benchmarks.suite.main`."""
    args = [
        "--size",
        "quick",
        "--repeat",
        "1",
        "--cases",
        "misaligned",
        "--contenders",
        "zarr-parallel series,xarray+dask (source chunks)",
        "--results",
        str(suite.RESULTS / "series.json"),
        *(sys.argv[1:] if argv is None else argv),
    ]
    return suite.main(args)


if __name__ == "__main__":
    sys.exit(main())
