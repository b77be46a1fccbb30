"""Threads per job process: the worker's share of the cores against two other settings.

``python -m benchmarks.threads`` runs ``dask_distributed`` (one worker per core) on the full
ERA5-like dataset, misaligned and aligned targets, three repetitions, with each job process
reading and encoding with its worker's share of the cores (the default), with one reader and two
encoders, and as before 2026-12-03 (all cores for each job process, zarr's default thread pool;
see :data:`benchmarks.suite.THREAD_VARIANTS`). Figures as in :mod:`benchmarks.suite`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks import suite


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three settings; extra arguments go to :func:`benchmarks.suite.main`."""
    args = [
        "--size",
        "full",
        "--repeat",
        "3",
        "--cases",
        "misaligned,aligned",
        "--contenders",
        ",".join([suite.SHARE_OF_CORES, *suite.THREAD_VARIANTS]),
        "--results",
        str(suite.RESULTS / "threads.json"),
        *(sys.argv[1:] if argv is None else argv),
    ]
    return suite.main(args)


if __name__ == "__main__":
    sys.exit(main())
