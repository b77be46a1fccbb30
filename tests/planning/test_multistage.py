"""Staged plans of more than two stages (docs/design.md §3.4, "Strategies"): a chain of
intermediates when no single intermediate keeps both of its stages within the memory budget with
chunks worth writing (rechunker's ``multistage_rechunking_plan``).

The brute force here decides, over every intermediate chunk shape (not the planner's thinned
candidates), whether a two-stage plan could fit; it shares no code with
:mod:`zarr_parallel.planning.staged` or :mod:`zarr_parallel.planning.chain` (it uses the memory
model, which is the specification of what a job holds).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.planning.test_staged import assert_staged_plan, inputs
from tests.planning.test_streaming import YEAR, limits, year_of_maps
from zarr_parallel.planning.chain import step_lengths
from zarr_parallel.planning.inputs import Limits
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.planning.staged import INTERMEDIATE_CHUNK_FLOOR, MAX_STAGES, plan_staged
from zarr_parallel.planning.strategy import choose_plan, plan_cost
from zarr_parallel.run.stages import strategy_lines

ITEMSIZE = 4


def longest_unit(size: int, a: int, b: int) -> int:
    """Longest block whole in both the ``a`` and the ``b`` grid of an axis of ``size``."""
    cuts = sorted(({*range(0, size, a)} & {*range(0, size, b)}) | {size})
    return max(y - x for x, y in itertools.pairwise(cuts))


def floor_bytes(shape, source, target) -> int:
    clipped = [
        math.prod(min(c, n) for c, n in zip(g, shape, strict=True)) for g in (source, target)
    ]
    return min(INTERMEDIATE_CHUNK_FLOOR, *(c * ITEMSIZE for c in clipped))


def two_stages_fit(shape, source, target, budget: int) -> bool:
    """Whether any intermediate chunk shape at least the floor keeps both stages' units (through
    xarray: the source chunks they touch and the region's copies) within ``budget``."""
    per_dim = []
    for n, s, w in zip(shape, source, target, strict=True):
        lengths = np.arange(1, n + 1)
        u1 = np.array([longest_unit(n, s, c) for c in lengths])
        u2 = np.array([longest_unit(n, c, w) for c in lengths])
        per_dim.append((lengths, u1, u2))
    chunk = unit1 = unit2 = np.ones((), dtype=np.int64)
    for lengths, u1, u2 in per_dim:
        chunk = np.multiply.outer(chunk, lengths)
        unit1 = np.multiply.outer(unit1, u1)
        unit2 = np.multiply.outer(unit2, u2)
    ok = (
        (chunk * ITEMSIZE >= floor_bytes(shape, source, target))
        & (job_memory(unit1, unit1, ITEMSIZE, ITEMSIZE) <= budget)
        & (job_memory(unit2, unit2, ITEMSIZE, ITEMSIZE) <= budget)
    )
    return bool(ok.any())


@st.composite
def long_and_short(draw):
    """Maps read into series-like targets: chunks long along one axis and short along the
    others, at a budget between one source chunk's and a comfortable one."""
    t = draw(st.sampled_from([24, 36, 48, 72, 96]))
    y, x = draw(st.integers(6, 24)), draw(st.integers(6, 24))
    shape = (t, y, x)
    source = (draw(st.sampled_from([1, 2])), y, x)
    target = (t, draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    smallest = 6 * ITEMSIZE * max(math.prod(source), math.prod(target))
    budget = draw(st.integers(2 * smallest, 12 * smallest))
    return shape, source, target, budget


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_and_short())
def test_more_stages_only_where_two_cannot_fit(case) -> None:
    shape, source, target, budget = case
    arrays = inputs(shape, source, target)
    plan = plan_staged(arrays, Limits(budget))
    two = two_stages_fit(shape, source, target, budget)
    stages = 0 if plan is None else len(plan.stages) + 1
    event(f"stages: {stages}")
    if plan is None:
        return
    assert 2 <= stages <= MAX_STAGES
    # Coverage, disjoint writes, budget, each stage reading its grid once: by brute force.
    assert_staged_plan(plan, arrays, source, target, budget)
    floor = floor_bytes(shape, source, target)
    small = [s for s in plan.stages if math.prod(dict(s.chunks)["v"]) * ITEMSIZE < floor]
    event(f"chunks below the floor: {bool(small)}")
    if small:
        # Only when no chain fits with chunks at least the floor: two stages, and a note.
        assert stages == 2 and not two
        assert any("below 1 MiB" in note for note in plan.notes)
    elif not two:
        # Where two stages cannot fit, the plan has more.
        assert stages > 2
    # The converse holds up to the two-stage search's candidate lengths (16 per dimension,
    # grown towards the floor one dimension at a time): an untried combination may have fitted.
    # How often, in these cases (none in 600 examples when this was written):
    event(f"more stages although two fit: {stages > 2 and two}")


@pytest.mark.parametrize(
    ("steps", "grid", "patch", "budget", "stages"),
    [
        (96, 12, 1, 21_000, 3),
        (96, 24, 2, 83_000, 3),
        (48, 24, 3, 56_000, 3),
        (96, 36, 3, 187_000, 3),
        (48, 12, 1, 11_000, 4),
        (96, 24, 1, 42_000, 4),
    ],
)
def test_maps_to_series_where_two_stages_cannot_fit(steps, grid, patch, budget, stages) -> None:
    """Maps (one step × the grid) to series (every step × a patch) at a budget where the brute
    force finds no two-stage intermediate: the planner chains more, and every stage checks."""
    shape, source, target = (steps, grid, grid), (1, grid, grid), (steps, patch, patch)
    assert not two_stages_fit(shape, source, target, budget)
    plan = plan_staged(inputs(shape, source, target), Limits(budget))
    assert plan is not None and len(plan.stages) + 1 == stages
    assert_staged_plan(plan, inputs(shape, source, target), source, target, budget)
    floor = floor_bytes(shape, source, target)
    assert all(math.prod(dict(s.chunks)["v"]) * ITEMSIZE >= floor for s in plan.stages)


def test_year_to_time_series_at_1gb_plans_three_stages() -> None:
    """Through xarray, a year of maps to (8766, 10, 10) at 1 GB: a single intermediate would need
    chunks below 1 MiB (both of its stages within the budget); three stages fit, each reading
    what it reads once, the intermediates stepping from the maps towards the series."""
    plan = choose_plan(year_of_maps((YEAR, 10, 10), fast=False), limits(1e9), "r")
    assert plan.strategy == "staged", plan.strategy_reason
    assert len(plan.stages) == 2
    assert "3 stages because a single intermediate" in plan.strategy_reason
    first, second = (dict(s.chunks)["t2m"] for s in plan.stages)
    assert first[0] < second[0] < YEAR and 721 > first[1] > second[1] > 10
    for stage in [*plan.stages, None]:
        jobs = stage.plan.jobs if stage else plan.jobs
        assert all(j.memory <= plan.memory_budget for j in jobs)
    assert plan.read_amplification == 1.0
    assert plan.intermediate_bytes == 2 * 2 * YEAR * 721 * 1440 * 4
    # Each stage reads its intermediate once, so the cost counts every stage's bytes.
    rows = plan.summary()["stages"]
    assert [r["stage"] for r in rows] == [1, 2, 3]
    assert plan_cost(plan) == sum(r["read_bytes"] + r["write_bytes"] for r in rows)
    lines = dict(strategy_lines(plan))
    assert {"stage 1/3", "stage 2/3", "stage 3/3"} <= set(lines)
    assert "intermediate chunks" in lines["stage 2/3"]


def test_four_stages_where_three_do_not_fit() -> None:
    """The same year at 700 MB: neither two nor three stages fit, four do."""
    plan = choose_plan(year_of_maps((YEAR, 10, 10), fast=False), limits(0.7e9), "r")
    assert plan.strategy == "staged" and len(plan.stages) == 3
    assert all(j.memory <= plan.memory_budget for s in plan.stages for j in s.plan.jobs)


def test_too_tight_for_a_chain_two_stages_with_small_chunks_and_a_note() -> None:
    """At 400 MB no chain of up to four stages fits with chunks of 1 MiB: the two-stage plan
    with smaller chunks (as before chains existed) beats re-reading the source 511 times."""
    plan = choose_plan(year_of_maps((YEAR, 10, 10)), limits(0.4e9), "r")
    assert plan.strategy == "staged" and len(plan.stages) == 1
    assert dict(plan.stages[0].chunks)["t2m"] == (20, 60, 5)
    assert any(f"no staged plan of up to {MAX_STAGES} stages" in n for n in plan.notes)


def test_no_staged_plan_fits_the_streaming_plan_stays_and_says_why() -> None:
    """(8766, 30, 30) at 420 MB: one target chunk through zarr does not fit a stage's budget,
    the fast path's streaming jobs do."""
    plan = choose_plan(year_of_maps((YEAR, 30, 30)), limits(0.42e9), "r")
    assert plan.strategy == "streaming" and not plan.stages
    assert f"no staged plan (of up to {MAX_STAGES} stages)" in plan.strategy_reason


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 400),
    st.integers(1, 400),
    st.integers(1, 400),
    st.integers(3, MAX_STAGES),
)
def test_chain_steps_nest_and_move_monotonically(size, source, write, stages) -> None:
    steps = step_lengths(size, source, write, stages)
    ends = [min(source, size), *steps, min(write, size)]
    assert len(steps) == stages - 1 and all(1 <= s <= size for s in steps)
    # From the source's length to the target's, never turning back.
    assert ends == sorted(ends) or ends == sorted(ends, reverse=True)
    # Neighbouring intermediates nest: their units are the larger chunk, not a multiple.
    for a, b in itertools.pairwise(steps):
        assert longest_unit(size, a, b) == min(max(a, b), size)
