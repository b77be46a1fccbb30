"""The planner (docs/design.md §4): hypothesis properties against a brute-force reference, and a
table of hand-checked plans.

The brute-force reference enumerates elements and chunks directly; it shares no code with
:mod:`zarr_parallel.planning.plan` beyond :func:`~zarr_parallel.planning.memory.job_memory` (the
memory model, which is the definition being applied, not the thing under test).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.grid import AxisMap, unit_boundaries, write_grid
from zarr_parallel.planning.groups import balanced_parts
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import Job
from zarr_parallel.planning.memory import REGION_COPIES, job_memory
from zarr_parallel.planning.plan import Plan, _plan_groups, makespan, plan_jobs
from zarr_parallel.units import format_bytes

# ------------------------------------------------------------------------------------------
# Brute-force reference


@dataclass(frozen=True)
class AxisCase:
    """A source axis with irregular chunk boundaries and the target's selection of it."""

    dim: str
    bounds: tuple[int, ...]  # source chunk boundaries, 0 .. source length
    indices: tuple[int, ...]  # source index of each target position

    def axis_map(self) -> AxisMap:
        b = np.asarray(self.bounds, dtype=np.int64)
        idx = np.asarray(self.indices, dtype=np.int64)
        return AxisMap(self.dim, np.searchsorted(b, idx, side="right") - 1, np.diff(b))

    @property
    def chunk_ids(self) -> list[int]:
        """Source chunk of each target position (computed without AxisMap)."""
        return [max(k for k, b in enumerate(self.bounds[:-1]) if b <= i) for i in self.indices]

    @property
    def monotone(self) -> bool:
        d = np.diff(self.indices)
        return bool(np.all(d == 1) or np.all(d == -1))

    @property
    def aligned(self) -> bool:
        """Monotone, and every source chunk touched lies wholly inside the selection."""
        ids = self.chunk_ids
        lengths = np.diff(self.bounds)
        return self.monotone and all(ids.count(k) == lengths[k] for k in set(ids))


def brute_units(case: AxisCase, chunk: int) -> list[int]:
    """Boundaries on the write grid where the source chunk changes (or the ends)."""
    ids, n = case.chunk_ids, len(case.indices)
    return [
        b
        for b in range(n + 1)
        if (b % chunk == 0 or b == n) and (b in (0, n) or ids[b - 1] != ids[b])
    ]


def brute_touched(case: AxisCase, start: int, stop: int) -> int:
    """Source elements read along this axis for target positions [start, stop)."""
    lengths = np.diff(case.bounds)
    return int(sum(lengths[k] for k in set(case.chunk_ids[start:stop])))


@dataclass(frozen=True)
class VarCase:
    name: str
    axes: tuple[AxisCase, ...]
    chunks: tuple[int, ...]
    itemsize: int
    read_itemsize: int
    fixed: int

    def array_input(self) -> ArrayInput:
        return ArrayInput(
            self.name,
            tuple(a.axis_map() for a in self.axes),
            self.chunks,
            self.itemsize,
            self.read_itemsize,
            self.fixed,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a.indices) for a in self.axes)


def brute_job_memory(job: Job, var: VarCase) -> int:
    touched = math.prod(
        brute_touched(a, s, e) for a, (_, s, e) in zip(var.axes, job.region, strict=True)
    )
    region = math.prod(e - s for _, s, e in job.region)
    return int(job_memory(touched * var.fixed, region, var.itemsize, var.read_itemsize))


def finest_max_memory(var: VarCase) -> int:
    """Largest estimate over one-write-chunk jobs: the least any valid plan can need."""
    grids = [
        list(
            zip(write_grid(len(a.indices), c)[:-1], write_grid(len(a.indices), c)[1:], strict=True)
        )
        for a, c in zip(var.axes, var.chunks, strict=True)
    ]
    best = 0
    for box in itertools.product(*grids):
        region = tuple((a.dim, int(s), int(e)) for a, (s, e) in zip(var.axes, box, strict=True))
        best = max(best, brute_job_memory(Job(0, (var.name,), region, 0, 0, 0), var))
    return best


# ------------------------------------------------------------------------------------------
# Strategies


@st.composite
def axis_cases(draw: st.DrawFn, dim: str) -> AxisCase:
    n_src = draw(st.integers(1, 24))
    cuts = draw(st.sets(st.integers(1, max(1, n_src - 1)), max_size=8)) if n_src > 1 else set()
    bounds = (0, *sorted(c for c in cuts if 0 < c < n_src), n_src)
    if draw(st.booleans()):
        # Half the cases select whole source chunks: the aligned requests.
        start = draw(st.sampled_from(bounds[:-1]))
        stop = draw(st.sampled_from([b for b in bounds if b > start]))
    else:
        start = draw(st.integers(0, n_src - 1))
        stop = draw(st.integers(start + 1, n_src))
    indices = list(range(start, stop))
    order = draw(st.sampled_from(["forward", "reverse", "roll"]))
    if order == "reverse":
        indices.reverse()
    elif order == "roll" and len(indices) > 1:
        shift = draw(st.integers(1, len(indices) - 1))
        indices = indices[shift:] + indices[:shift]
    return AxisCase(dim, bounds, tuple(indices))


@st.composite
def plan_cases(draw: st.DrawFn) -> tuple[list[VarCase], Limits]:
    ndim = draw(st.integers(1, 3))
    dims = ["time", "latitude", "longitude"][:ndim]
    axes = tuple(draw(axis_cases(d)) for d in dims)
    n_vars = draw(st.integers(1, 3))
    chunk_options = [
        tuple(draw(st.integers(1, len(a.indices) + 2)) for a in axes) for _ in range(2)
    ]
    variables = []
    for i in range(n_vars):
        variables.append(
            VarCase(
                f"v{i}",
                axes,
                chunk_options[draw(st.integers(0, 1))],
                draw(st.sampled_from([1, 2, 4, 8])),
                draw(st.sampled_from([2, 4])),
                draw(st.sampled_from([1, 1, 3])),
            )
        )
    # Budgets from just below the least any plan needs (one write chunk per job: refused) to
    # above one job doing everything, so refusals, splits and growth all occur.
    least = max(finest_max_memory(v) for v in variables)
    most = sum(
        brute_job_memory(Job(0, (), tuple((a.dim, 0, len(a.indices)) for a in v.axes), 0, 0, 0), v)
        for v in variables
    )
    fraction = draw(st.integers(-10, 100)) / 100  # hypothesis favours 0: exactly the least
    budget = max(1, int(least + (most * 1.1 - least) * fraction))
    min_jobs = draw(st.integers(1, 12))
    workers = draw(st.sampled_from([1, 1, 2, 3, 4]))
    return variables, Limits(memory_budget=budget, min_jobs=min_jobs, workers=workers)


def _plan(variables: Sequence[VarCase], limits: Limits, digest: str = "r") -> Plan:
    return plan_jobs([v.array_input() for v in variables], limits, digest)


# ------------------------------------------------------------------------------------------
# Properties


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(axis_cases("time"), st.integers(1, 30))
def test_unit_boundaries_match_brute_force(case: AxisCase, chunk: int) -> None:
    assert unit_boundaries(case.axis_map(), chunk).tolist() == brute_units(case, chunk)


#: Found by hypothesis: evening 3 + 1 units out to 2 + 2 put both units of a cut source chunk's
#: neighbourhood ([2, 4) and [4, 5)) into one job, over the budget.
UNEVEN_UNITS = (
    [
        VarCase(
            "v0",
            (
                AxisCase("time", (0, 2), (0,)),
                AxisCase("latitude", (0, 1, 2, 4, 10), (0, 1, 2, 3, 4)),
            ),
            (1, 1),
            1,
            2,
            1,
        )
    ],
    Limits(memory_budget=44, min_jobs=1),
)


@PROPERTY_SETTINGS
@given(plan_cases())
@example(UNEVEN_UNITS)
def test_plan_invariants(case: tuple[list[VarCase], Limits]) -> None:
    """Coverage, disjoint writes, alignment, budget and read figures, against brute force."""
    variables, limits = case
    try:
        plan = _plan(variables, limits)
    except PlanError as e:
        # Budget: refused only when some one-write-chunk job cannot fit, i.e. no plan can.
        assert e.parameter == "memory_limit"
        assert e.value == format_bytes(limits.memory_budget) and "Raise memory_limit" in e.fix
        if all(a.monotone for a in variables[0].axes):
            assert max(finest_max_memory(v) for v in variables) > limits.memory_budget
        # (A rolled axis can hold one source chunk in two runs of a job; the estimate counts
        # it twice, as the job's two reads may be alive at once.)
        return
    assert [j.id for j in plan.jobs] == list(range(len(plan.jobs)))
    read_total = 0
    for var in variables:
        jobs = [j for j in plan.jobs if var.name in j.variables]
        # Coverage: every element exactly once.
        counts = np.zeros(var.shape, dtype=np.int64)
        for job in jobs:
            assert [d for d, _, _ in job.region] == [a.dim for a in var.axes]
            counts[tuple(slice(s, e) for _, s, e in job.region)] += 1
        assert np.all(counts == 1), "jobs must tile the target exactly"
        # Disjoint writes: no write chunk (or shard) is touched by two jobs.
        owner: dict[tuple[int, ...], int] = {}
        for job in jobs:
            ranges = [
                range(s // c, -(-e // c))
                for (_, s, e), c in zip(job.region, var.chunks, strict=True)
            ]
            for key in itertools.product(*ranges):
                assert key not in owner, f"chunk {key} written by jobs {owner[key]} and {job.id}"
                owner[key] = job.id
        # Alignment: on the write grid; on units (source boundaries too) unless split.
        group = next(g for g in plan.groups if var.name in g.variables)
        group_vars = [v for v in variables if v.name in group.variables]
        for job in jobs:
            for (dim, s, e), c, axis in zip(job.region, var.chunks, var.axes, strict=True):
                n = len(axis.indices)
                assert s % c == 0 and (e % c == 0 or e == n), (dim, s, e, c)
                if dim not in group.split_dims:
                    units = brute_units(axis, c)
                    assert s in units and e in units, (dim, s, e, units)
        # Budget and the memory model: each estimate covers the brute-force figure.
        for job in jobs:
            assert job.memory <= limits.memory_budget
            if all(a.monotone for a in var.axes):
                assert job.memory == max(brute_job_memory(job, v) for v in group_vars)
            else:
                assert job.memory >= brute_job_memory(job, var)
        read_total += sum(
            math.prod(
                brute_touched(a, s, e) for a, (_, s, e) in zip(var.axes, j.region, strict=True)
            )
            * var.fixed
            * var.read_itemsize
            for j in jobs
        )
        # An aligned request whose units fit reads each source chunk exactly once.
        if all(a.aligned for a in var.axes) and not group.split_dims:
            seen: dict[tuple[int, ...], int] = {}
            for job in jobs:
                ids = [
                    set(a.chunk_ids[s:e]) for a, (_, s, e) in zip(var.axes, job.region, strict=True)
                ]
                for key in itertools.product(*ids):
                    assert key not in seen, f"source chunk {key} read by two jobs"
                    seen[key] = job.id
    if all(a.monotone for a in variables[0].axes):
        assert plan.read_bytes == read_total
    else:
        assert plan.read_bytes >= read_total
    assert plan.needed_bytes == sum(math.prod(v.shape) * v.read_itemsize for v in variables)
    # A dropped dimension whose chunk is longer than one (fixed > 1) is a cut chunk too.
    aligned = all(a.aligned and v.fixed == 1 for v in variables for a in v.axes)
    if aligned and not any(g.split_dims for g in plan.groups):
        assert plan.read_amplification == 1.0
    # num_jobs is a minimum wherever whole units allow it.
    n_units = sum(math.prod(g.unit_counts) for g in plan.groups)
    if n_units >= limits.min_jobs:
        assert len(plan.jobs) >= limits.min_jobs


@PROPERTY_SETTINGS
@given(plan_cases())
def test_plan_determinism(case: tuple[list[VarCase], Limits]) -> None:
    """Same inputs (rebuilt from scratch) → same plan and fingerprint; other request → other."""
    variables, limits = case
    try:
        first = _plan(variables, limits)
    except PlanError:
        with pytest.raises(PlanError):
            _plan(variables, limits)
        return
    second = _plan(
        list(variables), Limits(limits.memory_budget, limits.min_jobs, workers=limits.workers)
    )
    assert first == second
    assert first.fingerprint == second.fingerprint
    assert _plan(variables, limits, digest="other").fingerprint != first.fingerprint


@PROPERTY_SETTINGS
@given(plan_cases(), st.randoms(use_true_random=False))
def test_plan_ignores_the_order_variables_are_listed_in(
    case: tuple[list[VarCase], Limits], rng: Any
) -> None:
    """The same variables listed in another order → the same jobs and fingerprints."""
    variables, limits = case
    shuffled = list(variables)
    rng.shuffle(shuffled)
    try:
        first = _plan(variables, limits)
    except PlanError:
        return
    second = _plan(shuffled, limits)
    assert first == second
    assert (first.fingerprint, first.content_fingerprint) == (
        second.fingerprint,
        second.content_fingerprint,
    )


@PROPERTY_SETTINGS
@given(plan_cases())
def test_content_fingerprint_ignores_the_split(case: tuple[list[VarCase], Limits]) -> None:
    """Another job split of the same arrays (more jobs asked) keeps the content fingerprint;
    another request changes it; the manifest's copy of a plan reads back as the same plan."""
    variables, limits = case
    try:
        first = _plan(variables, limits)
        split = _plan(
            variables, Limits(limits.memory_budget, limits.min_jobs + 3, workers=limits.workers)
        )
    except PlanError:
        return
    assert split.content_fingerprint == first.content_fingerprint != ""
    if [j.region for j in split.jobs] != [j.region for j in first.jobs]:
        assert split.fingerprint != first.fingerprint
    assert _plan(variables, limits, digest="other").content_fingerprint != (
        first.content_fingerprint
    )
    assert Plan.from_json(json.loads(json.dumps(first.to_json()))) == first


# ------------------------------------------------------------------------------------------
# Hand-checked plans


def _axis(dim: str, bounds: Sequence[int], start: int = 0, stop: int | None = None) -> AxisMap:
    """A step-1 selection [start, stop) of a source axis with these chunk boundaries."""
    stop = bounds[-1] if stop is None else stop
    return AxisCase(dim, tuple(bounds), tuple(range(start, stop))).axis_map()


def _regions(plan: Plan, d: int = 0) -> list[tuple[int, int]]:
    return [(j.region[d][1], j.region[d][2]) for j in plan.jobs]


BIG = 10**12


def test_irregular_file_boundaries() -> None:
    """Files of 10, 7 and 5 steps, HDF5 chunks of 4: the chunk grid restarts at each file."""
    bounds = [0, 4, 8, 10, 14, 17, 21, 22]
    axis = _axis("time", bounds)
    # Target chunks of 2: 17 and 21 are odd, so the units end at the last even boundary.
    assert unit_boundaries(axis, 2).tolist() == [0, 4, 8, 10, 14, 22]
    arr = ArrayInput("t2m", (axis,), (2,), 4, 4)
    one = plan_jobs([arr], Limits(BIG))
    assert _regions(one) == [(0, 22)] and one.read_amplification == 1.0
    five = plan_jobs([arr], Limits(BIG, min_jobs=5))
    assert _regions(five) == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 22)]
    assert five.read_amplification == 1.0
    # Six jobs cannot be had without cutting a source chunk: five, and a note says so.
    six = plan_jobs([arr], Limits(BIG, min_jobs=6))
    assert len(six.jobs) == 5 and any("num_jobs=6" in n for n in six.notes)


def test_selection_mid_chunk() -> None:
    """Steps 3..14 of chunks of 6: chunks 0, 1 and 2 are read for 12 steps, 18 read."""
    axis = _axis("time", range(0, 25, 6), start=3, stop=15)
    plan = plan_jobs([ArrayInput("t2m", (axis,), (12,), 4, 4)], Limits(BIG))
    assert _regions(plan) == [(0, 12)]
    assert plan.read_bytes == 18 * 4 and plan.needed_bytes == 12 * 4
    assert plan.read_amplification == 1.5
    assert plan.jobs[0].memory == 18 * 4 + REGION_COPIES * 12 * 4


def test_misaligned_target_chunks() -> None:
    """Source chunks of 6, target chunks of 4: units of 12 (three target, two source chunks)."""
    axis = _axis("time", range(0, 49, 6))
    arr = ArrayInput("t2m", (axis,), (4,), 4, 4)
    assert unit_boundaries(axis, 4).tolist() == [0, 12, 24, 36, 48]
    plan = plan_jobs([arr], Limits(BIG, min_jobs=4))
    assert _regions(plan) == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert plan.read_amplification == 1.0


def test_budget_split() -> None:
    """One source chunk of 24 × 10 and target chunks of 4 × 10, in a budget of 2600 bytes.

    The unit (all 240 elements) needs 240·4 + 5·240·4 = 5760 bytes: too much, so it is cut at
    target chunk boundaries. Each job still reads the whole source chunk (960 bytes); two target
    chunks (80 elements, 5·320 = 1600 bytes of region copies) fit, three (2400) do not.
    """
    assert REGION_COPIES == 5
    arr = ArrayInput("t2m", (_axis("time", [0, 24]), _axis("latitude", [0, 10])), (4, 10), 4, 4)
    plan = plan_jobs([arr], Limits(2600))
    assert _regions(plan) == [(0, 8), (8, 16), (16, 24)]
    assert [j.memory for j in plan.jobs] == [2560, 2560, 2560]
    assert plan.groups[0].split_dims == ("time",)
    assert plan.read_amplification == 3.0
    assert any("exceed the memory budget" in n for n in plan.notes)
    with pytest.raises(PlanError, match="memory_limit") as info:
        plan_jobs([arr], Limits(1000, reserve=500))  # one target chunk needs 960 + 800 bytes
    assert info.value.parameter == "memory_limit" and info.value.value == "1.50 kB"
    assert "needs about 1.76 kB, more than the 1.00 kB a job may use" in str(info.value)
    assert "Raise memory_limit to at least 2.30 kB" in info.value.fix


def test_num_jobs_minimum() -> None:
    """Eight units of 6 steps and num_jobs=3: three jobs of three, three and two units."""
    arr = ArrayInput("t2m", (_axis("time", range(0, 49, 6)),), (6,), 4, 4)
    assert _regions(plan_jobs([arr], Limits(BIG, min_jobs=3))) == [(0, 18), (18, 36), (36, 48)]
    assert len(plan_jobs([arr], Limits(BIG, min_jobs=8)).jobs) == 8
    many = plan_jobs([arr], Limits(BIG, min_jobs=20))
    assert len(many.jobs) == 8 and any("num_jobs=20" in n for n in many.notes)


def test_outer_dimension_split_first() -> None:
    """num_jobs splits time (outermost) before latitude, keeping writes contiguous."""
    axes = (_axis("time", range(0, 13, 3)), _axis("latitude", [0, 3, 6, 8]))
    plan = plan_jobs([ArrayInput("t2m", axes, (3, 3), 4, 4)], Limits(BIG, min_jobs=4))
    assert [tuple((s, e) for _, s, e in j.region) for j in plan.jobs] == [
        ((0, 3), (0, 8)),
        ((3, 6), (0, 8)),
        ((6, 9), (0, 8)),
        ((9, 12), (0, 8)),
    ]


def test_groups_share_num_jobs() -> None:
    """Variables with different chunking plan separately; num_jobs is spread over them."""
    axis = _axis("time", range(0, 25, 6))
    small = ArrayInput("a", (axis,), (6,), 1, 1)
    large = ArrayInput("b", (axis,), (12,), 8, 8)
    plan = plan_jobs([small, large], Limits(BIG, min_jobs=4))
    assert [g.variables for g in plan.groups] == [("a",), ("b",)]
    by_var = {v: [j for j in plan.jobs if j.variables == (v,)] for v in "ab"}
    # b has only two units (of 12); a takes the rest.
    assert len(by_var["b"]) == 2 and len(by_var["a"]) >= 2
    assert len(plan.jobs) >= 4


def test_variables_sharing_a_grid_share_jobs() -> None:
    axis = _axis("time", range(0, 25, 6))
    plan = plan_jobs(
        [ArrayInput(v, (axis,), (6,), 4, 4) for v in ("t2m", "d2m")], Limits(BIG, min_jobs=2)
    )
    # Listed by name whatever the input order (plans and fingerprints ignore listing order).
    assert [j.variables for j in plan.jobs] == [("d2m", "t2m"), ("d2m", "t2m")]
    # Four units in two jobs: two each, not three and one.
    assert _regions(plan) == [(0, 12), (12, 24)]
    # Variables are written one after another: memory is the largest one's, not the sum.
    assert plan.jobs[0].memory == 12 * 4 + REGION_COPIES * 12 * 4


def test_packed_source_memory() -> None:
    """int16 on disk decoded to float32: the decoded copy of the chunks is counted."""
    arr = ArrayInput("t2m", (_axis("time", [0, 10]),), (10,), 4, 2)
    memory = 10 * 2 + 10 * 4 + REGION_COPIES * 10 * 4
    assert plan_jobs([arr], Limits(BIG)).jobs[0].memory == memory


def test_time_budget_splits() -> None:
    """Each step moves 2 MB (read and write) at the assumed 20 MB/s: 0.1 s. A 4 s budget allows
    40 steps a job, so 100 steps need three jobs, evened out to 34, 34 and 32."""
    arr = ArrayInput("t2m", (_axis("time", range(0, 101, 1)),), (1,), 10**6, 10**6)
    plan = plan_jobs([arr], Limits(BIG, time_budget=4.0))
    assert _regions(plan) == [(0, 34), (34, 68), (68, 100)]


# ------------------------------------------------------------------------------------------
# Tail balance (docs/design.md §2b): the jobs of a parallel run share out evenly over its workers


def _jobs_along(plan: Plan) -> list[int]:
    return [len({j.region[d][1] for j in plan.jobs}) for d in range(len(plan.jobs[0].region))]


def _greedy_loads(plan: Plan, workers: int) -> list[int]:
    """Elements each worker writes when every job goes to the next free worker, in order (as
    the dask scheduler hands them out, one at a time per worker), timed by its size."""
    loads = [0] * workers
    for job in plan.jobs:
        size = math.prod(stop - start for _, start, stop in job.region)
        loads[loads.index(min(loads))] += size
    return loads


def test_eleven_jobs_for_two_workers_become_twelve() -> None:
    """22 time units, two per job by the budget: 11 jobs would leave one of 2 workers idle for
    the last; 12 jobs (ten of two units, two of one) keep both busy to the end."""
    arr = ArrayInput("t2m", (_axis("time", range(0, 23)),), (1,), 4, 4)
    budget = max(j.memory for j in plan_jobs([arr], Limits(BIG, min_jobs=11)).jobs)
    series = plan_jobs([arr], Limits(budget, min_jobs=1))
    assert len(series.jobs) == 11  # one worker: the split the budget gives
    balanced = plan_jobs([arr], Limits(budget, min_jobs=1, workers=2))
    assert len(balanced.jobs) == 12
    assert _greedy_loads(balanced, 2) == [11, 11]
    assert _greedy_loads(series, 2) == [12, 10]


def _variable_loads(plan: Plan, workers: int) -> list[int]:
    """Like :func:`_greedy_loads`, a job timed by its elements times its variables."""
    loads = [0] * workers
    for job in plan.jobs:
        size = math.prod(stop - start for _, start, stop in job.region) * len(job.variables)
        loads[loads.index(min(loads))] += size
    return loads


def test_three_jobs_of_two_variables_for_two_workers_become_jobs_of_one_variable() -> None:
    """Three time units hold both variables in 3 jobs: one of 2 workers would idle for the last
    (loads 2 and 1 jobs). Jobs of one variable share the 6 variable-units evenly, and read each
    source chunk once all the same; one worker keeps the grouped jobs."""
    axes = (_axis("time", range(0, 4)),)
    arrays = [ArrayInput(n, axes, (1,), 4, 4) for n in ("t2m", "d2m")]
    budget = max(j.memory for j in plan_jobs(arrays, Limits(BIG, min_jobs=3)).jobs)
    series = plan_jobs(arrays, Limits(budget, min_jobs=1))
    assert len(series.jobs) == 3 and all(len(j.variables) == 2 for j in series.jobs)
    assert _variable_loads(series, 2) == [4, 2]
    parallel = plan_jobs(arrays, Limits(budget, min_jobs=1, workers=2))
    assert all(len(j.variables) == 1 for j in parallel.jobs)
    assert _variable_loads(parallel, 2) == [3, 3]
    assert parallel.read_bytes == series.read_bytes


@PROPERTY_SETTINGS
@given(plan_cases())
def test_parallel_plans_are_never_less_balanced_than_grouped_ones(
    case: tuple[list[VarCase], Limits],
) -> None:
    """With several workers, the plan chosen is never busier on its busiest worker (bytes read
    and written, jobs handed out in order) than the plan keeping variables together."""
    variables, limits = case
    workers = max(2, limits.workers)
    limits = Limits(limits.memory_budget, limits.min_jobs, workers=workers)
    arrays = sorted((v.array_input() for v in variables), key=lambda a: a.name)
    try:
        chosen = plan_jobs(arrays, limits)
    except PlanError:
        return
    groups: dict[str, list[ArrayInput]] = {}
    for a in arrays:
        groups.setdefault(a.signature(), []).append(a)
    grouped, *_ = _plan_groups(list(groups.values()), limits)
    assert makespan(chosen.jobs, workers) <= makespan(grouped, workers)


def test_a_dimension_that_cannot_split_further_hands_over_to_the_next() -> None:
    """11 single-unit time jobs cannot become 12: latitude is split in two instead (22 jobs)."""
    axes = (_axis("time", range(0, 12)), _axis("latitude", [0, 4, 8]))
    arr = ArrayInput("t2m", axes, (1, 4), 4, 4)
    budget = plan_jobs([arr], Limits(BIG, min_jobs=11)).jobs[0].memory
    plan = plan_jobs([arr], Limits(budget, min_jobs=1, workers=2))
    assert len(plan.jobs) == 22
    assert _greedy_loads(plan, 2) == [44, 44]


def _rereads_nothing(axis: AxisMap, chunk: int) -> bool:
    """True when units along ``axis`` read each of their source chunks once."""
    bounds = unit_boundaries(axis, chunk)
    touched = axis.touched(bounds[:-1], bounds[1:])
    return int(touched.sum()) <= int((bounds[1:] - bounds[:-1]).sum())


@PROPERTY_SETTINGS
@given(plan_cases())
def test_the_job_count_is_a_multiple_of_the_workers_where_units_allow(
    case: tuple[list[VarCase], Limits],
) -> None:
    """One variable without a memory bound: the job count is a multiple of the workers unless
    no dimension has the units for it."""
    variables, limits = case
    limits = Limits(BIG, limits.min_jobs, workers=limits.workers)
    plan = _plan(variables[:1], limits)
    if not plan.jobs[0].region:
        return
    jobs_along = _jobs_along(plan)
    units = [
        len(unit_boundaries(a.axis_map(), c)) - 1
        for a, c in zip(variables[0].axes, variables[0].chunks, strict=True)
    ]
    # Only along dimensions whose cuts re-read no source chunk (an idle worker for the last
    # job costs less than reading the source again).
    free = [
        _rereads_nothing(a.axis_map(), c)
        for a, c in zip(variables[0].axes, variables[0].chunks, strict=True)
    ]
    possible = any(
        balanced_parts(jobs_along, d, limits.workers) <= units[d]
        for d in range(len(units))
        if free[d]
    )
    if limits.workers > 1 and possible:
        assert len(plan.jobs) % limits.workers == 0, (jobs_along, units)
