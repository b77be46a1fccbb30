"""Staged plans through an intermediate store (docs/design.md §3.4, "Strategies"): hypothesis
properties against brute force, the issue's year-long figures, and the strategy choice.

The brute-force checks count, element by element, which jobs write each target element and
which jobs touch each source chunk and each intermediate chunk; they share no code with
:mod:`zarr_parallel.planning.staged`.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.planning.test_streaming import YEAR, limits, year_of_maps
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import Job
from zarr_parallel.planning.plan import Plan, plan_jobs
from zarr_parallel.planning.staged import plan_staged
from zarr_parallel.planning.strategy import choose_plan


def chunk_ids(size: int, chunk: int) -> np.ndarray:
    return np.arange(size) // chunk


def touches(jobs: tuple[Job, ...], dims: list[str], shape: tuple[int, ...], chunks) -> dict:
    """For every chunk of a grid (``chunks`` per dim), the ids of the jobs whose region
    intersects it (brute force over each job's elements)."""
    seen: dict[tuple[int, ...], set[int]] = {}
    ids = [chunk_ids(n, c) for n, c in zip(shape, chunks, strict=True)]
    for job in jobs:
        b = job.bounds
        per_dim = [sorted(set(ids[k][b[d][0] : b[d][1]].tolist())) for k, d in enumerate(dims)]
        for key in itertools.product(*per_dim):
            seen.setdefault(key, set()).add(job.id)
    return seen


def coverage(jobs: tuple[Job, ...], dims: list[str], shape: tuple[int, ...]) -> np.ndarray:
    count = np.zeros(shape, dtype=np.int64)
    for job in jobs:
        count[tuple(slice(*job.bounds[d]) for d in dims)] += 1
    return count


shapes = st.lists(st.integers(2, 24), min_size=2, max_size=3)


@st.composite
def cases(draw):
    shape = tuple(draw(shapes))
    source = tuple(draw(st.integers(1, n)) for n in shape)
    target = tuple(draw(st.integers(1, n)) for n in shape)
    budget = draw(st.integers(2_000, 200_000))
    return shape, source, target, budget


def inputs(shape, source, target, fast=False) -> list[ArrayInput]:
    dims = ["t", "y", "x"][: len(shape)]
    axes = tuple(AxisMap.uniform(d, n, c) for d, n, c in zip(dims, shape, source, strict=True))
    return [ArrayInput("v", axes, target, 4, 4, fast=fast)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans())
def test_staged_plans_against_brute_force(case, fast) -> None:
    shape, source, target, budget = case
    arrays = inputs(shape, source, target, fast)
    plan = plan_staged(arrays, Limits(budget))
    if plan is None:
        return
    assert_staged_plan(plan, arrays, source, target, budget)


def assert_staged_plan(plan: Plan, arrays, source, target, budget: int) -> None:
    """Every stage of a staged plan of one variable (two stages or more), by brute force."""
    shape = arrays[0].shape
    dims = ["t", "y", "x"][: len(shape)]
    inters = [dict(s.chunks)["v"] for s in plan.stages]
    grids = [tuple(source), *inters, tuple(target)]  # what each stage reads, then writes
    plans = [s.plan for s in plan.stages] + [plan]
    for k, stage in enumerate(plans):
        # Coverage and disjoint writes: every element once, no write chunk shared by two jobs.
        assert np.all(coverage(stage.jobs, dims, shape) == 1)
        assert all(len(j) == 1 for j in touches(stage.jobs, dims, shape, grids[k + 1]).values())
        # Budget: every job of every stage.
        assert all(j.memory <= budget for j in stage.jobs)
        # Stage 1 reads each source chunk once, every later stage each chunk of the
        # intermediate before it once (the intermediate chunks align to both sides).
        assert all(len(j) == 1 for j in touches(stage.jobs, dims, shape, grids[k]).values())
    assert plan.read_amplification == 1.0
    assert plan.intermediate_bytes == len(inters) * int(np.prod(shape)) * 4
    # Deterministic, and what a manifest stores reads back.
    again = plan_staged(arrays, Limits(budget))
    assert again is not None and again.fingerprint == plan.fingerprint
    back = Plan.from_json(plan.to_json())
    assert [s.plan.jobs for s in back.stages] == [s.plan.jobs for s in plan.stages]
    assert back.jobs == plan.jobs
    assert back.stage_rows() == plan.stage_rows()


def test_year_to_time_series_staged_reads_source_once() -> None:
    for target, memory in (((YEAR, 10, 10), 2e9), ((YEAR, 30, 30), 4e9)):
        for fast in (True, False):
            plan = choose_plan(year_of_maps(target, fast), limits(memory), "r")
            assert plan.strategy == "staged", plan.strategy_reason
            assert plan.read_amplification <= 2
            assert all(j.memory <= plan.memory_budget for j in plan.jobs)
            assert all(j.memory <= plan.memory_budget for j in plan.stages[0].plan.jobs)
            rows = plan.summary()["stages"]
            assert [r["stage"] for r in rows] == [1, 2]
            assert rows[0]["intermediate_chunks"]["t2m"][1:] in ([30, 220], [60, 180])


def test_aligned_plans_stay_direct_and_unchanged() -> None:
    arrays = inputs((96, 20, 40), (24, 20, 40), (48, 20, 40))
    lim = Limits(10**8, min_jobs=2)
    plan = choose_plan(arrays, lim, "r")
    assert plan.strategy == "direct" and not plan.stages
    assert plan.jobs == plan_jobs(arrays, lim, "r").jobs
    assert plan.fingerprint == plan_jobs(arrays, lim, "r").fingerprint


def test_staged_keeps_the_content_fingerprint() -> None:
    arrays = year_of_maps((YEAR, 10, 10))
    staged = choose_plan(arrays, limits(2e9), "r")
    direct = plan_jobs(arrays, limits(2e9), "r")
    assert staged.content_fingerprint == direct.content_fingerprint
    assert staged.fingerprint != direct.fingerprint
