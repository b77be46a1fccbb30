"""Streaming direct plans (docs/design.md §3.4, §5): a job holds its target region and streams the
source chunks through it, so jobs grow along the dimensions whose units re-read source chunks.

The issue's figures: a year of hourly maps (8766 × 721 × 1440 float32, one chunk per step), two
variables, to time series. Before streaming plans the time budget made every write chunk a job
that read the whole source (10,512 jobs, read amplification 10,512).
"""

from __future__ import annotations

import numpy as np

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import plan_jobs
from zarr_parallel.planning.strategy import choose_plan, plan_cost

YEAR = 8766
RESERVE = 256 * 10**6


def year_of_maps(target: tuple[int, int, int], fast: bool = True) -> list[ArrayInput]:
    """Two float32 variables of a year of hourly ERA5-like maps, planned to ``target`` chunks."""
    axes = (
        AxisMap.uniform("time", YEAR, 1),
        AxisMap.uniform("latitude", 721, 721),
        AxisMap.uniform("longitude", 1440, 1440),
    )
    return [ArrayInput(n, axes, target, 4, 4, fast=fast) for n in ("d2m", "t2m")]


def limits(memory_limit: float, min_jobs: int = 1) -> Limits:
    return Limits(
        int(memory_limit) - RESERVE,
        min_jobs=min_jobs,
        min_jobs_derived=True,
        time_budget=900.0,
        reserve=RESERVE,
    )


def test_year_to_time_series_streams_in_bands() -> None:
    plan = plan_jobs(year_of_maps((YEAR, 10, 10)), limits(2e9))
    # Each job reads every source chunk once (it needs a part of each), so amplification is
    # the job count; bands of whole write chunks, not one job per write chunk.
    assert len(plan.jobs) <= 73
    assert plan.read_amplification == len(plan.jobs)
    assert plan.max_job_memory <= plan.memory_budget
    widths = {j.bounds["longitude"][1] - j.bounds["longitude"][0] for j in plan.jobs}
    assert min(widths) > 10  # grown beyond one write chunk along a re-read dimension


def test_year_to_30x30_at_4gb() -> None:
    plan = plan_jobs(year_of_maps((YEAR, 30, 30)), limits(4e9))
    assert plan.read_amplification <= 73
    assert plan.max_job_memory <= plan.memory_budget


def test_min_jobs_split_outermost_when_nothing_is_re_read() -> None:
    """Aligned dimensions keep today's order: a minimum number of jobs cuts the outermost."""
    axes = (AxisMap.uniform("time", 96, 1), AxisMap.uniform("x", 100, 100))
    arr = ArrayInput("v", axes, (24, 10), 4, 4, fast=True)
    plan = plan_jobs([arr], Limits(10**9, min_jobs=4))
    assert len(plan.jobs) == 4
    assert {j.bounds["x"] for j in plan.jobs} == {(0, 100)}
    assert plan.read_amplification == 1.0


def test_streaming_plan_tiles_and_respects_budget() -> None:
    plan = plan_jobs(year_of_maps((YEAR, 30, 30)), limits(3e9, min_jobs=4))
    cover = np.zeros((721, 1440), dtype=np.int64)
    for job in plan.jobs:
        (t0, t1), (y0, y1), (x0, x1) = (job.bounds[d] for d in ("time", "latitude", "longitude"))
        assert (t0, t1) == (0, YEAR)
        assert y0 % 30 == 0 and x0 % 30 == 0
        cover[y0:y1, x0:x1] += 1
        assert job.memory <= plan.memory_budget
    assert np.all(cover == 1)  # one group holds both variables


def six_days_of_maps() -> list[ArrayInput]:
    """The benchmark's `quick` map → time-series case: 144 hourly maps, two variables."""
    axes = (
        AxisMap.uniform("time", 144, 1),
        AxisMap.uniform("latitude", 721, 721),
        AxisMap.uniform("longitude", 1440, 1440),
    )
    return [ArrayInput(n, axes, (144, 30, 30), 4, 4, fast=True) for n in ("d2m", "t2m")]


def worker_limits(min_jobs: int, derived: bool) -> Limits:
    """A local worker's budget at memory_limit 1 GB (reserve and worker overhead taken)."""
    return Limits(
        494 * 10**6,
        min_jobs=min_jobs,
        min_jobs_derived=derived,
        time_budget=1800.0,
        reserve=RESERVE,
        workers=2,
    )


def test_a_derived_minimum_does_not_re_read_for_more_jobs_than_workers() -> None:
    """Two jobs per worker is a wish for balance: on a dimension whose cuts re-read the maps,
    one job per worker is enough (2 jobs reading the source twice, not 4 reading it 4x)."""
    plan = choose_plan(six_days_of_maps(), worker_limits(4, derived=True), "r")
    assert len(plan.jobs) == 2
    assert plan.read_amplification == 2.0


def test_an_asked_minimum_that_would_re_read_4x_is_staged() -> None:
    """num_jobs=4 asked of one variable: a direct plan would read the source 4x; the staged plan
    reads it once (and the intermediate once), which the cost model counts as cheaper."""
    plan = choose_plan(six_days_of_maps()[:1], worker_limits(4, derived=False), "r")
    assert plan.strategy == "staged", plan.strategy_reason
    assert plan.read_amplification == 1.0
    direct = plan_jobs(six_days_of_maps()[:1], worker_limits(4, derived=False), "r")
    assert direct.read_amplification == 4.0
    # Source read once, intermediate written and read once each, target written once.
    assert plan_cost(plan) == (plan.read_bytes + 2 * plan.intermediate_bytes + plan.write_bytes)
    assert plan_cost(plan) < plan_cost(direct)


def test_an_asked_minimum_of_two_variables_splits_by_variable_first() -> None:
    """num_jobs=4 of two variables: a job per variable and half the map re-reads the source
    2x, where 4 jobs of both variables would re-read it 4x."""
    plan = choose_plan(six_days_of_maps(), worker_limits(4, derived=False), "r")
    assert len(plan.jobs) == 4
    assert all(len(j.variables) == 1 for j in plan.jobs)
    assert plan.read_amplification == 2.0
