"""How long planning takes as the source grows: a synthetic ERA5 layout up to 40 years hourly.

The layout is what inspecting the real archive gives: one HDF5 chunk per time step and full 721 ×
1440 grid, 20 variables. It goes straight into :func:`zarr_parallel.planning.plan.plan_jobs` as
:class:`~zarr_parallel.planning.grid.AxisMap` inputs (no files), so the figures are the planner's
alone.

Run: ``python benchmarks/plan_scaling.py`` (``--years 1 10 40`` to choose the sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import Plan, plan_jobs

HOURS_PER_YEAR = 8766  # 365.25 days
NLAT, NLON = 721, 1440
N_VARIABLES = 20
GB = 10**9
RESERVE = 256 * 10**6  # memory_reserve's default


def era5_inputs(
    steps: int, target: tuple[int, int, int], source: tuple[int, int, int] = (1, NLAT, NLON)
) -> list[ArrayInput]:
    """Planner inputs for ``steps`` hourly steps of 20 ERA5 variables."""
    axes = []
    dims = ("time", "latitude", "longitude")
    for dim, size, chunk in zip(dims, (steps, NLAT, NLON), source, strict=True):
        axes.append(AxisMap.uniform(dim, size, chunk))
    return [
        ArrayInput(f"var{i:02d}", tuple(axes), target, itemsize=4, read_itemsize=4)
        for i in range(N_VARIABLES)
    ]


def time_plan(
    steps: int,
    target: tuple[int, int, int],
    memory_limit: int = 2 * GB,
    source: tuple[int, int, int] = (1, NLAT, NLON),
    min_jobs: int = 1,
) -> tuple[float, Plan]:
    """Seconds to build the inputs and plan them (best of three), and the plan."""
    best = float("inf")
    plan = None
    for _ in range(3):
        t0 = time.perf_counter()
        arrays = era5_inputs(steps, target, source)
        plan = plan_jobs(
            arrays,
            Limits(memory_limit - RESERVE, min_jobs=min_jobs, time_budget=900, reserve=RESERVE),
            request_digest="benchmark",
        )
        best = min(best, time.perf_counter() - t0)
    assert plan is not None
    return best, plan


def _row(label: str, steps: int, seconds: float, plan: Plan, source: Sequence[int]) -> str:
    chunks_per_var = int(
        np.prod([-(-n // c) for n, c in zip((steps, NLAT, NLON), source, strict=True)])
    )
    return (
        f"{label:<34} {steps:>8} {chunks_per_var * N_VARIABLES:>10} {seconds:>8.3f} "
        f"{len(plan.jobs):>7} {plan.read_amplification:>5.2f} "
        f"{plan.max_job_memory / GB:>6.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Print planning time against the number of source chunks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--years", type=float, nargs="+", default=[1, 5, 10, 20, 40])
    args = parser.parse_args(argv)
    header = (
        f"{'case':<34} {'steps':>8} {'src chunks':>10} {'seconds':>8} {'jobs':>7} "
        f"{'amp':>5} {'job GB':>6}"
    )
    print("Scaling: target {time: 48, latitude: 180, longitude: 360}, memory_limit 2GB")
    print(header)
    full = (1, NLAT, NLON)
    for years in args.years:
        steps = round(years * HOURS_PER_YEAR)
        seconds, plan = time_plan(steps, (48, 180, 360))
        print(_row(f"{years:g} years", steps, seconds, plan, full))
    steps = 350_640  # 40 years of hourly steps, 1979-2018
    print(f"\nOther plans of the 40-year layout ({steps} steps)")
    print(header)
    cases: list[tuple[str, tuple[int, int, int], int, tuple[int, int, int], int]] = [
        ("target (48,180,360), 1GB limit", (48, 180, 360), GB, full, 1),
        ("target (24,721,1440), 1GB", (24, NLAT, NLON), GB, full, 1),
        ("target (1,721,1440), 0.5GB", (1, NLAT, NLON), GB // 2, full, 1),
        ("source (24,100,100), target (48..)", (48, 180, 360), 2 * GB, (24, 100, 100), 1),
        ("num_jobs=10000", (48, 180, 360), 2 * GB, full, 10_000),
    ]
    for label, target, limit, source, min_jobs in cases:
        seconds, plan = time_plan(steps, target, limit, source, min_jobs)
        print(_row(label, steps, seconds, plan, source))
    heavy = [m for m in ("dask", "distributed", "prefect") if m in sys.modules]
    print(f"\nexecution frameworks imported by planning: {heavy or 'none'}")


if __name__ == "__main__":
    main()
