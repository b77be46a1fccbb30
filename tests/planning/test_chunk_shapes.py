"""Cheaper target chunk shapes (docs/design.md §3.5): hypothesis properties against brute force,
and a table of cases (maps → time series over a year, time series → maps, aligned requests).

The brute-force checks count, element by element, which jobs write each target element and
each chunk of the suggested write grid (tests/planning/test_staged.py's helpers); the costs are
the planner's own model (planning.strategy.plan_cost), recomputed from a fresh plan.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.planning.test_staged import cases, coverage, inputs, touches
from tests.planning.test_streaming import YEAR, limits, year_of_maps
from zarr_parallel.errors import PlanError
from zarr_parallel.planning.chunk_shapes import (
    CHEAPER_BY,
    cheaper_shapes,
    clearly_cheaper,
    length_candidates,
)
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import Plan
from zarr_parallel.planning.strategy import choose_plan, plan_cost


def _with(arrays: list[ArrayInput], dim: str, length: int) -> list[ArrayInput]:
    return [
        replace(
            a,
            write_chunks=tuple(
                length if ax.dim == dim else c for ax, c in zip(a.axes, a.write_chunks, strict=True)
            ),
        )
        for a in arrays
    ]


def _cheaper_by_the_model(alt: Plan, current: Plan) -> bool:
    """The promise, written out: no more re-reading, and 1.5x fewer bytes or re-reads."""
    if alt.read_amplification > current.read_amplification + 1e-9:
        return False
    return (
        plan_cost(current) >= 1.5 * plan_cost(alt)
        or current.read_amplification >= 1.5 * alt.read_amplification
    )


@st.composite
def rechunk_cases(draw):
    """Maps read into time series, or time series into maps, along any dimension order, with a
    budget between one source chunk's unit and the whole array (where a cheaper shape exists
    most often; any shape, source and target come from ``cases()``)."""
    t, y, x = draw(st.integers(8, 48)), draw(st.integers(4, 24)), draw(st.integers(4, 24))
    steps = draw(st.integers(1, 3))
    maps = (steps, y, x)
    series = (draw(st.integers(t // 2, t)), draw(st.integers(1, y)), draw(st.integers(1, x)))
    source, target = (maps, series) if draw(st.booleans()) else (series, maps)
    order = draw(st.permutations([0, 1, 2]))
    shape = tuple((t, y, x)[k] for k in order)
    source = tuple(source[k] for k in order)
    target = tuple(target[k] for k in order)
    budget = draw(st.integers(24 * y * x * steps, max(24 * y * x * steps, 24 * t * y * x)))
    return shape, source, target, budget


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(rechunk_cases(), cases()), st.booleans())
def test_suggested_shapes_make_cheaper_plans_of_the_same_region(case, fast) -> None:
    shape, source, target, budget = case
    arrays = inputs(shape, source, target, fast)
    lim = Limits(budget)
    try:
        current = choose_plan(arrays, lim, "r")
    except PlanError:
        return
    options = cheaper_shapes(arrays, lim, current, "r")
    dims = ["t", "y", "x"][: len(shape)]
    assert len(options) <= len(dims)  # bounded: at most one plan per dimension
    assert [o.cost for o in options] == sorted(o.cost for o in options)  # cheapest first
    for option in options:
        k = dims.index(option.dim)
        assert 1 <= option.length < min(target[k], shape[k]) and option.asked == target[k]
        # Really cheaper by the model: a fresh plan with the suggested chunks says so.
        again = choose_plan(_with(arrays, option.dim, option.length), lim, "r")
        assert again.fingerprint == option.plan.fingerprint
        assert option.cost == plan_cost(again)
        assert _cheaper_by_the_model(again, current) and clearly_cheaper(again, current)
        # The same region (every element once), aligned to the suggested write grid, within
        # the budget.
        write = tuple(
            option.length if d == option.dim else c for d, c in zip(dims, target, strict=True)
        )
        assert np.all(coverage(again.jobs, dims, shape) == 1)
        assert all(len(j) == 1 for j in touches(again.jobs, dims, shape, write).values())
        assert all(j.memory <= budget for j in again.jobs)
        assert again.needed_bytes == current.needed_bytes
    event(f"{len(options)} suggested")


def test_year_of_maps_to_time_series_suggests_a_shorter_time_chunk() -> None:
    """The issue's year of hourly maps: the staged plan moves the data four times (source,
    intermediate both ways, target); a time chunk whose units fit one job moves it twice."""
    for target, memory in (((YEAR, 10, 10), 2e9), ((YEAR, 30, 30), 4e9)):
        for fast in (True, False):
            arrays = year_of_maps(target, fast)
            lim = limits(memory)
            current = choose_plan(arrays, lim, "r")
            assert current.strategy == "staged"
            options = cheaper_shapes(arrays, lim, current, "r")
            assert [o.dim for o in options] == ["time"], options
            best = options[0]
            assert best.plan.strategy == "direct" and not best.plan.stages
            assert best.plan.read_amplification == 1.0
            assert 2 * best.cost <= plan_cost(current) + 1  # no intermediate: half the bytes
            assert best.plan.peak_job_memory <= lim.memory_budget


def test_time_series_to_maps_suggests_strips() -> None:
    """The reverse: source chunks of a year × 10 × 10, target maps. A unit is then the whole
    grid for a whole year; latitude chunks of whole source chunks make units that fit."""
    axes = (
        AxisMap.uniform("time", 2000, 2000),
        AxisMap.uniform("latitude", 120, 10),
        AxisMap.uniform("longitude", 240, 10),
    )
    arrays = [ArrayInput("t2m", axes, (1, 120, 240), 4, 4)]
    lim = Limits(400 * 10**6)
    current = choose_plan(arrays, lim, "r")
    options = cheaper_shapes(arrays, lim, current, "r")
    assert options, current.strategy_reason
    for option in options:
        assert option.dim in ("latitude", "longitude")
        assert option.length % 10 == 0  # whole source chunks
        assert option.plan.read_amplification == 1.0 and not option.plan.stages


@pytest.mark.parametrize(
    ("shape", "source", "target"),
    [
        ((96, 20, 40), (24, 20, 40), (48, 20, 40)),  # aligned: nothing is cheaper
        ((96, 20, 40), (1, 20, 40), (96, 20, 40)),  # a unit fits: read once already
    ],
)
def test_nothing_is_suggested_when_the_plan_reads_once_directly(shape, source, target) -> None:
    arrays = inputs(shape, source, target)
    lim = Limits(10**8)
    current = choose_plan(arrays, lim, "r")
    assert current.strategy == "direct" and current.read_amplification == 1.0
    assert cheaper_shapes(arrays, lim, current, "r") == []


def test_a_plan_only_somewhat_cheaper_is_not_suggested() -> None:
    """Below CHEAPER_BY the requested shape stands."""
    arrays = inputs((96, 20, 40), (1, 20, 40), (96, 20, 40))
    base = choose_plan(arrays, Limits(10**8), "r")
    assert not clearly_cheaper(base, base)
    assert CHEAPER_BY == 1.5


@pytest.mark.parametrize(
    ("size", "asked", "source", "expected"),
    [
        (8766, 8766, 1, {24, 48, 72, 144, 288, 4383, 2922}),  # hours, and divisors of the span
        (96, 96, 24, {24, 48, 72}),  # whole source chunks only
        (91, 8, 91, {1, 7}),  # below the source chunk: its divisors
        (100, 30, 4, {1, 2, 4, 8, 12, 16, 24}),
    ],
)
def test_length_candidates(size: int, asked: int, source: int, expected: set[int]) -> None:
    got = length_candidates(size, asked, source)
    assert expected <= set(got), got
    assert got == sorted(got) and all(v < asked for v in got)
    assert len(got) < 200  # a handful of checks each (bisection)
