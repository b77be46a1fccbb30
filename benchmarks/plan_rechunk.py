"""The planner's figures for maps → time series (issue #18): a year of hourly ERA5-like maps.

One HDF5 chunk per time step × the full 721 × 1440 grid, two float32 variables, planned (no files,
pure planning) to year-long time series at the issue's memory limits, three ways: the direct plan
alone (streaming where the fast path applies, as the fast path's jobs hold their region), and the
strategy the planner chooses by modelled bytes through storage (staged, through an intermediate
store). Prints jobs, read amplification, intermediate bytes, the largest job against the budget
and the planning time; then, per case, the target chunk shape a recommendation offers instead
(``planning.chunk_shapes``, by the same cost model), with its figures and the time its search took.

Run: ``python benchmarks/plan_rechunk.py``.
"""

from __future__ import annotations

import time

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.chunk_shapes import cheaper_shapes
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import plan_jobs
from zarr_parallel.planning.strategy import choose_plan, plan_cost
from zarr_parallel.units import format_bytes

YEAR, NLAT, NLON = 8766, 721, 1440
RESERVE = 256 * 10**6  # memory_reserve's default
CASES = [((YEAR, 10, 10), 2 * 10**9), ((YEAR, 30, 30), 4 * 10**9)]


def inputs(target: tuple[int, int, int], fast: bool) -> list[ArrayInput]:
    """Two variables of a year of hourly maps, to ``target`` chunks."""
    axes = (
        AxisMap.uniform("time", YEAR, 1),
        AxisMap.uniform("latitude", NLAT, NLAT),
        AxisMap.uniform("longitude", NLON, NLON),
    )
    return [ArrayInput(n, axes, target, 4, 4, fast=fast) for n in ("d2m", "t2m")]


def main() -> None:
    """Print one line per case, read path and planner."""
    print(
        f"{'target':<18}{'limit':>7} {'path':<7}{'planner':<9}{'strategy':<10}"
        f"{'jobs':>6}{'amp':>8}{'intermediate':>14}{'largest job':>13}{'plan s':>8}"
    )
    for target, limit in CASES:
        lim = Limits(limit - RESERVE, time_budget=900.0, reserve=RESERVE, min_jobs_derived=True)
        for fast in (True, False):
            for name, planner in (("direct", plan_jobs), ("chosen", choose_plan)):
                t0 = time.perf_counter()
                try:
                    plan = planner(inputs(target, fast), lim, "bench")
                except PlanError:
                    print(
                        f"{target!s:<18}{limit // 10**9:>5}GB {'fast' if fast else 'xarray':<7}"
                        f"{name:<9}refused: one write chunk needs more than the budget"
                    )
                    continue
                seconds = time.perf_counter() - t0
                strategy = plan.strategy if name == "chosen" else "-"
                print(
                    f"{target!s:<18}{limit // 10**9:>5}GB {'fast' if fast else 'xarray':<7}"
                    f"{name:<9}{strategy:<10}{len(plan.jobs):>6}"
                    f"{plan.read_amplification:>8.2f}{format_bytes(plan.intermediate_bytes):>14}"
                    f"{format_bytes(plan.peak_job_memory):>13}{seconds:>8.2f}"
                )


def suggestions() -> None:
    """Print, per case and read path, the cheaper target chunk shape a recommendation offers."""
    print(
        f"\n{'target':<18}{'limit':>7} {'path':<7}{'suggested':<16}{'strategy':<10}"
        f"{'jobs':>6}{'amp':>8}{'moves':>12}{'staged moves':>14}{'search s':>10}"
    )
    for target, limit in CASES:
        lim = Limits(limit - RESERVE, time_budget=900.0, reserve=RESERVE, min_jobs_derived=True)
        for fast in (True, False):
            arrays = inputs(target, fast)
            current = choose_plan(arrays, lim, "bench")
            t0 = time.perf_counter()
            options = cheaper_shapes(arrays, lim, current, "bench")
            seconds = time.perf_counter() - t0
            head = f"{target!s:<18}{limit // 10**9:>5}GB {'fast' if fast else 'xarray':<7}"
            if not options:
                print(
                    f"{head}{'-':<16}{'':<10}{'':>6}{'':>8}{'':>12}"
                    f"{format_bytes(plan_cost(current)):>14}{seconds:>10.3f}"
                )
                continue
            best = options[0]
            print(
                f"{head}{f'{best.dim} {best.length}':<16}{best.plan.strategy:<10}"
                f"{len(best.plan.jobs):>6}{best.plan.read_amplification:>8.2f}"
                f"{format_bytes(best.cost):>12}{format_bytes(plan_cost(current)):>14}"
                f"{seconds:>10.3f}"
            )


if __name__ == "__main__":
    main()
    suggestions()
