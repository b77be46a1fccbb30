"""How one group of variables (sharing dimensions and chunk mapping) is cut into jobs.

A :class:`Group` holds its units (cut at write-grid boundaries where one is too large for the
budget); :meth:`Group.plan` grows jobs of whole units to the memory and time budgets, then splits
them until there are enough. Cost bounds come from the memory model over the Pareto front of
per-dimension segments, so the largest job is found without enumerating every job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.grid import IntArray, unit_boundaries
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import Job
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.units import format_bytes

#: Throughput assumed when sizing jobs against the time budget (bytes per second, conservative).
ASSUMED_THROUGHPUT = 20e6
#: Beyond this many combinations of per-dimension extremes, cost bounds use the (safe, maybe
#: pessimistic) product of per-dimension maxima instead of the exact maximum.
_MAX_COMBINATIONS = 4096


@dataclass(frozen=True)
class GroupPlan:
    """How one group of variables (sharing dims and chunk mapping) was split."""

    variables: tuple[str, ...]
    dims: tuple[str, ...]
    unit_counts: tuple[int, ...]
    units_per_job: tuple[int, ...]
    split_dims: tuple[str, ...]


def _pareto(touched: IntArray, lengths: IntArray) -> IntArray:
    """The (touched, length) pairs no other segment beats in both: rows of an (n, 2) array.

    Job memory and duration grow with both figures, so the largest job over a grid of segments
    is found among combinations of these pairs.
    """
    t_max, l_max = touched.max(), lengths.max()
    if np.any((touched == t_max) & (lengths == l_max)):
        return np.array([[t_max, l_max]], dtype=np.int64)  # the usual case: one segment wins
    order = np.lexsort((-lengths, -touched))  # touched descending, then length descending
    t, ln = touched[order], lengths[order]
    best_before = np.maximum.accumulate(np.concatenate([[-1], ln[:-1]]))
    keep = ln > best_before
    return np.stack([t[keep], ln[keep]], axis=1)


class _GroupCost:
    """Cost of a group's jobs given per-dimension segment boundaries."""

    def __init__(self, members: Sequence[ArrayInput]) -> None:
        self.members = members
        self.axes = members[0].axes

    def segment_stats(self, d: int, bounds: IntArray) -> tuple[IntArray, IntArray]:
        starts, stops = bounds[:-1], bounds[1:]
        return self.axes[d].touched(starts, stops), stops - starts

    def bound(self, bounds: Sequence[IntArray]) -> tuple[int, float]:
        """The largest job memory and duration over the jobs these segments make."""
        fronts = [_pareto(*self.segment_stats(d, b)) for d, b in enumerate(bounds)]
        if math.prod(len(f) for f in fronts) > _MAX_COMBINATIONS:
            fronts = [f.max(axis=0, keepdims=True) for f in fronts]
        memory, moved = 0, 0
        for combo in itertools.product(*fronts):
            t = math.prod(int(p[0]) for p in combo)
            ln = math.prod(int(p[1]) for p in combo)
            lengths = [int(p[1]) for p in combo]
            # ArrayInput.memory: job_memory, or the fast path's model (monotone in each length).
            memory = max(memory, *(int(a.memory(t, lengths)) for a in self.members))
            moved = max(
                moved,
                sum(t * a.fixed_touched * a.read_itemsize + ln * a.itemsize for a in self.members),
            )
        return memory, moved / ASSUMED_THROUGHPUT

    def fits(self, bounds: Sequence[IntArray], limits: Limits) -> bool:
        memory, seconds = self.bound(bounds)
        if memory > limits.memory_budget:
            return False
        return limits.time_budget is None or seconds <= limits.time_budget


def _pack(units: IntArray, per_job: int) -> IntArray:
    """Segment boundaries grouping ``per_job`` consecutive units."""
    picked = units[::per_job]
    if picked[-1] != units[-1]:
        picked = np.concatenate([picked, units[-1:]])
    return picked


def _largest_fitting(lo: int, hi: int, ok: Any) -> int:
    """Largest n in [lo, hi] with ok(n) true, given ok(lo) is true and ok is monotone."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Group:
    """Variables planned together, with their units (cut to the budget where needed)."""

    members: Sequence[ArrayInput]
    cost: _GroupCost
    units: list[IntArray]
    split: list[str]
    notes: list[str]
    #: Seconds the smallest units already take when no cut brings them within the time budget:
    #: jobs may take that plus the budget (a job reads what one unit must, and the usual rest).
    time_floor: float | None = None

    def limits(self, limits: Limits) -> Limits:
        """The budgets this group's jobs are grown to (the time budget raised by the floor)."""
        if self.time_floor is None or limits.time_budget is None:
            return limits
        return replace(limits, time_budget=limits.time_budget + self.time_floor)

    @property
    def capacity(self) -> int:
        """Most jobs whole units allow."""
        return math.prod(len(u) - 1 for u in self.units) if self.units else 1

    @classmethod
    def build(cls, members: Sequence[ArrayInput], limits: Limits) -> Group:
        """The group of ``members`` with its units, cut where one exceeds the budgets.

        Raises
        ------
        PlanError
            When the selection leaves no data along some dimension, or one write chunk with the
            source chunks it touches exceeds the memory budget.
        """
        lead = members[0]
        names = [a.name for a in members]
        cost = _GroupCost(members)
        if any(a.size == 0 for a in lead.axes):
            empty = [a.dim for a in lead.axes if a.size == 0]
            raise PlanError(
                "preprocessors",
                empty,
                f"the selection leaves no data along {empty} for {names}",
                "Widen the selection so every dimension keeps at least one element",
            )
        if not lead.axes:
            memory = max(
                int(job_memory(a.fixed_touched, 1, a.itemsize, a.read_itemsize)) for a in members
            )
            _check_unit_fits(members, memory, limits)
            return cls(members, cost, [], [], [])
        whole = [unit_boundaries(ax, c) for ax, c in zip(lead.axes, lead.write_chunks, strict=True)]
        notes: list[str] = []
        units, split = _cut_units(lead, cost, whole, limits)
        time_floor = None
        if not cost.fits(units, limits):
            memory, _ = cost.bound(units)
            _check_unit_fits(members, memory, limits)
            # Cutting did not bring units within the time budget: their source chunks span the
            # whole cut (maps read for time series), so every piece still reads all of them. Cut
            # for memory alone, and let jobs grow while none reads more than such a unit does:
            # jobs then gather the units that read the same chunks (streaming, docs/design.md §5).
            units, split = _cut_units(lead, cost, whole, replace(limits, time_budget=None))
            time_floor = cost.bound(units)[1]
            notes.append(
                f"{','.join(names)}: one write chunk is estimated to take longer than the time "
                "budget (half of worker_timeout); raise worker_timeout or choose smaller chunks"
            )
        if split:
            notes.insert(
                0,
                f"{','.join(names)}: units along {split} exceed the memory budget; split at "
                "target chunk boundaries, so some source chunks are read by more than one job",
            )
        return cls(members, cost, units, split, notes, time_floor)

    def plan(
        self, limits: Limits, min_jobs: int, first_id: int
    ) -> tuple[GroupPlan, list[Job], int, int, list[str]]:
        """Grow jobs to the budgets, then split them until there are ``min_jobs``.

        Jobs grow first along the dimensions whose units re-read source chunks most (a job
        holding several units that cut one source chunk reads it once), then innermost first:
        contiguous slabs, few large writes. Splits for ``min_jobs`` go the other way.
        """
        members, cost, units = self.members, self.cost, self.units
        limits = self.limits(limits)
        lead = members[0]
        names = tuple(a.name for a in members)
        if not units:
            mem = max(
                int(job_memory(a.fixed_touched, 1, a.itemsize, a.read_itemsize)) for a in members
            )
            read = sum(a.fixed_touched * a.read_itemsize for a in members)
            need = sum(a.read_itemsize for a in members)
            job = Job(first_id, names, (), mem, read, sum(a.itemsize for a in members))
            return GroupPlan(names, (), (), (), ()), [job], read, need, list(self.notes)
        ndim = len(units)
        n_units = [len(u) - 1 for u in units]
        per_job = [1] * ndim
        rereads = [_rereads(cost, d, u) for d, u in enumerate(units)]
        grow = sorted(range(ndim), key=lambda d: (-rereads[d], -d))
        for d in grow:

            def ok(m: int, d: int = d) -> bool:
                trial = list(per_job)
                trial[d] = m
                return cost.fits([_pack(u, k) for u, k in zip(units, trial, strict=True)], limits)

            per_job[d] = _largest_fitting(1, n_units[d], ok)

        def fits(pj: Sequence[int]) -> bool:
            return cost.fits([_pack(u, k) for u, k in zip(units, pj, strict=True)], limits)

        per_job = _split_for_min_jobs(per_job, n_units, grow, rereads, min_jobs, limits)
        # Units of unequal cost do not pack monotonically: fewer units per job can put a costly
        # pair of units together (units [2, 4) and [4, 5) of a cut source chunk). Every plan is
        # checked against the budgets again; one unit per job always fits (Group.build).
        if not fits(per_job):
            per_job = [1] * ndim
        # Same number of jobs, evened out: 4 units in 2 jobs are 2 + 2, not 3 + 1 (when that
        # packing fits too).
        evened = [math.ceil(n / math.ceil(n / k)) for n, k in zip(n_units, per_job, strict=True)]
        if fits(evened):
            per_job = evened
        bounds = [_pack(u, k) for u, k in zip(units, per_job, strict=True)]
        # Tail balance only along dimensions whose cuts re-read nothing (outermost first): an
        # idle worker for the last job costs less than reading source chunks again.
        free = [d for d in reversed(grow) if rereads[d] <= 1.0]
        bounds = _balanced(bounds, units, limits.workers, lambda b: cost.fits(b, limits), free)
        jobs, read, need = _make_jobs(members, cost, bounds, first_id)
        gplan = GroupPlan(names, lead.dims, tuple(n_units), tuple(per_job), tuple(self.split))
        return gplan, jobs, read, need, list(self.notes)


def _split_for_min_jobs(
    per_job: list[int],
    n_units: Sequence[int],
    grow: Sequence[int],
    rereads: Sequence[float],
    min_jobs: int,
    limits: Limits,
) -> list[int]:
    """Units per job after splitting for the minimum number of jobs.

    The outermost dimensions are split first (those that re-read nothing before those that
    do). A derived minimum (jobs per worker, for balance) splits a dimension that re-reads
    source chunks only until every worker has a job: more jobs there would read the source
    again for no more parallelism.
    """
    per_job = list(per_job)

    def count(pj: Sequence[int]) -> int:
        return math.prod(math.ceil(n / k) for n, k in zip(n_units, pj, strict=True))

    for d in reversed(grow):
        want = min_jobs
        if limits.min_jobs_derived and rereads[d] > 1.0:
            want = min(min_jobs, max(1, limits.workers))
        if count(per_job) >= want:
            continue

        def enough(m: int, d: int = d, want: int = want) -> bool:
            trial = list(per_job)
            trial[d] = m
            return count(trial) >= want

        # Largest m whose count still meets the minimum (count falls as m grows), else 1.
        per_job[d] = _largest_fitting(1, per_job[d], enough) if enough(1) else 1
    return per_job


def split_evenly(units: IntArray, parts: int) -> IntArray:
    """Boundaries grouping the units between ``units`` into ``parts`` consecutive segments whose
    unit counts differ by at most one, the larger first.

    >>> split_evenly(np.arange(12), 4).tolist()  # 11 units: 3 + 3 + 3 + 2
    [0, 3, 6, 9, 11]
    """
    n = len(units) - 1
    size, extra = divmod(n, parts)
    counts = [size + 1] * extra + [size] * (parts - extra)
    picked: IntArray = units[np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)]
    return picked


def balanced_parts(jobs_along: Sequence[int], d: int, workers: int) -> int:
    """Least number of segments along dimension ``d`` (at least ``jobs_along[d]``) that makes
    the job count a multiple of ``workers``.

    >>> balanced_parts([11], 0, 2), balanced_parts([3, 3], 0, 2), balanced_parts([5, 4], 0, 2)
    (12, 4, 5)
    """
    others = math.prod(jobs_along) // jobs_along[d]
    step = workers // math.gcd(others, workers)
    return -(-jobs_along[d] // step) * step


def _balanced(
    bounds: list[IntArray],
    units: list[IntArray],
    workers: int,
    fits: Any,
    order: Sequence[int] | None = None,
) -> list[IntArray]:
    """The split with its job count raised to a multiple of ``workers`` where whole units allow
    (outermost dimension first), so that all workers run until the end: 11 equal jobs on 2
    workers leave one idle for the whole last job, 12 smaller ones do not. Unchanged when no
    such split fits the budgets."""
    jobs_along = [len(b) - 1 for b in bounds]
    if workers <= 1 or math.prod(jobs_along) % workers == 0:
        return bounds
    for d in range(len(bounds)) if order is None else order:
        parts = balanced_parts(jobs_along, d, workers)
        if parts > len(units[d]) - 1:
            continue
        trial = list(bounds)
        trial[d] = split_evenly(units[d], parts)
        if fits(trial):
            return trial
    return bounds


def _rereads(cost: _GroupCost, d: int, units: IntArray) -> float:
    """How many times units along dimension ``d`` read its source chunks (1.0: once).

    >>> from zarr_parallel.planning.grid import AxisMap
    >>> arr = ArrayInput("v", (AxisMap.uniform("x", 40, 40),), (10,), 4, 4)
    >>> _rereads(_GroupCost([arr]), 0, np.array([0, 10, 20, 30, 40]))
    4.0
    """
    touched, lengths = cost.segment_stats(d, units)
    return float(touched.sum()) / max(1, int(lengths.sum()))


def _cut_units(
    lead: ArrayInput, cost: _GroupCost, whole: list[IntArray], limits: Limits
) -> tuple[list[IntArray], list[str]]:
    """Units cut at write-grid boundaries until they fit ``limits`` (or cannot be cut further).

    Widest-over-write-grid dimension first; there the source chunks are read by several jobs
    (read amplification > 1).
    """
    units = list(whole)
    split: list[str] = []
    if cost.fits(units, limits):
        return units, split
    order = sorted(
        range(len(units)), key=lambda d: -int(np.diff(units[d]).max()) / lead.write_chunks[d]
    )
    for d in order:
        # Coarse cuts first (a tiled axis cuts whole tile rows before single tiles).
        for fine in lead.axes[d].split_levels(lead.write_chunks[d]):
            fine = np.union1d(fine, units[d]).astype(np.int64)
            if len(fine) == len(units[d]):
                continue
            units[d] = fine
            if lead.axes[d].dim not in split:
                split.append(lead.axes[d].dim)
            if cost.fits(units, limits):
                return units, split
    return units, split


def _check_unit_fits(members: Sequence[ArrayInput], memory: int, limits: Limits) -> None:
    if memory <= limits.memory_budget:
        return
    lead = members[0]
    names = [a.name for a in members]
    shown = f"{names}" if len(names) <= 4 else f"{names[:3]} and {len(names) - 3} more"
    src = ", ".join(f"{ax.dim}: {int(ax.chunk_len.max())}" for ax in lead.axes if ax.chunk_len.size)
    tgt = ", ".join(f"{ax.dim}: {c}" for ax, c in zip(lead.axes, lead.write_chunks, strict=True))
    # The minimum holds back what the budget holds back, so that it is then accepted.
    minimum = _round_up(memory + limits.memory_limit - limits.memory_budget)
    raise PlanError(
        "memory_limit",
        format_bytes(limits.memory_limit),
        (
            f"one write chunk of {shown} ({{{tgt}}}) with the source chunks it touches "
            f"({{{src}}}) needs about {format_bytes(memory)}, more than the "
            f"{format_bytes(limits.memory_budget)} a job may use ({limits.held_back()})"
        ),
        f"Raise memory_limit to at least {format_bytes(minimum)}, or choose smaller target chunks",
    )


def _round_up(nbytes: int) -> int:
    """Round up to two significant digits, for limits people type.

    >>> _round_up(654_680_000), _round_up(1_000)
    (660000000, 1000)
    """
    step: int = 10 ** max(0, len(str(int(nbytes))) - 2)
    return -(-int(nbytes) // step) * step


def _make_jobs(
    members: Sequence[ArrayInput],
    cost: _GroupCost,
    bounds: Sequence[IntArray],
    first_id: int,
) -> tuple[list[Job], int, int]:
    lead = members[0]
    names = tuple(a.name for a in members)
    stats = [cost.segment_stats(d, b) for d, b in enumerate(bounds)]
    touched = _outer([s[0] for s in stats])
    lengths = _outer([s[1] for s in stats])
    ndim = len(stats)
    per_dim = [
        s[1].astype(np.int64).reshape([-1 if k == d else 1 for k in range(ndim)])
        for d, s in enumerate(stats)
    ]
    mem = np.zeros_like(touched)
    read = np.zeros_like(touched)
    write = np.zeros_like(touched)
    needed = 0
    for a in members:
        mem = np.maximum(mem, np.broadcast_to(a.memory(touched, per_dim), mem.shape))
        read += touched * a.fixed_touched * a.read_itemsize
        write += lengths * a.itemsize
        needed += a.needed_elems * a.read_itemsize
    jobs: list[Job] = []
    dims = lead.dims
    for flat, idx in enumerate(np.ndindex(*[len(b) - 1 for b in bounds])):
        region = tuple(
            (dims[d], int(bounds[d][i]), int(bounds[d][i + 1])) for d, i in enumerate(idx)
        )
        jobs.append(
            Job(first_id + flat, names, region, int(mem[idx]), int(read[idx]), int(write[idx]))
        )
    return jobs, int(read.sum()), needed


def _outer(vectors: Iterable[IntArray]) -> IntArray:
    out = np.ones((), dtype=np.int64)
    for v in vectors:
        out = np.multiply.outer(out, v.astype(np.int64))
    return out
