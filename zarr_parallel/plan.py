"""Pure planning: align jobs to target and source chunk grids, size them by the memory model.

Nothing here does I/O or imports an execution framework. The inputs describe, for each variable to
write, how every target index maps onto the source's on-disk chunk grid (:class:`AxisMap`); the
output is a :class:`Plan` of :class:`Job` values that tile the target exactly.

Terms (see DESIGN §3.4): per dimension the *write grid* is the target chunk (or shard) grid; the
*source grid* is the source chunk grid mapped into target index space. A *unit* is the smallest
block whole in both grids. Jobs are hyper-rectangles of whole units, grown as large as the memory
and time budgets allow.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from zarr_parallel.errors import PlanError
from zarr_parallel.units import format_bytes

IntArray = npt.NDArray[np.int64]

#: Copies of a job's region held at peak besides the decompressed source chunks: the assembled
#: region, the encoder's contiguous chunk copies and its compressed buffers (DESIGN §5).
REGION_COPIES = 3
#: Throughput assumed when sizing jobs against the time budget (bytes per second, conservative).
ASSUMED_THROUGHPUT = 20e6


@dataclass(frozen=True, eq=False)
class AxisMap:
    """How one target dimension maps onto the source chunk grid of one source dimension.

    Parameters
    ----------
    dim
        Target dimension name.
    chunk_of
        For each target index, the index of the source chunk (along the source dimension) that
        holds it. Monotone for slices; any order is accepted (planned conservatively).
    chunk_len
        Length of each source chunk along the source dimension.
    """

    dim: str
    chunk_of: IntArray
    chunk_len: IntArray
    _runs: tuple[IntArray, IntArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        chunk_of = np.asarray(self.chunk_of, dtype=np.int64)
        chunk_len = np.asarray(self.chunk_len, dtype=np.int64)
        object.__setattr__(self, "chunk_of", chunk_of)
        object.__setattr__(self, "chunk_len", chunk_len)
        if chunk_of.ndim != 1 or chunk_len.ndim != 1:
            raise ValueError("chunk_of and chunk_len must be one-dimensional")
        if chunk_of.size and (chunk_of.min() < 0 or chunk_of.max() >= chunk_len.size):
            raise ValueError(f"chunk_of of {self.dim!r} refers to chunks outside chunk_len")
        # Runs of equal chunk index: their starts are the source boundaries in target space.
        if chunk_of.size:
            change = np.flatnonzero(np.diff(chunk_of)) + 1
            starts = np.concatenate([[0], change, [chunk_of.size]]).astype(np.int64)
            touch = chunk_len[chunk_of[starts[:-1]]]
            prefix = np.concatenate([[0], np.cumsum(touch)]).astype(np.int64)
        else:
            starts = np.zeros(1, dtype=np.int64)
            prefix = np.zeros(1, dtype=np.int64)
        object.__setattr__(self, "_runs", (starts, prefix))

    @classmethod
    def uniform(cls, dim: str, size: int, source_chunk: int, start: int = 0) -> AxisMap:
        """Map a step-1 selection ``[start, start + size)`` of a regularly chunked source axis."""
        idx = np.arange(start, start + size, dtype=np.int64)
        n_chunks = max(1, math.ceil((start + size) / source_chunk))
        lens = np.full(n_chunks, source_chunk, dtype=np.int64)
        return cls(dim, idx // source_chunk, lens)

    @property
    def size(self) -> int:
        """Target length."""
        return int(self.chunk_of.size)

    @property
    def source_boundaries(self) -> IntArray:
        """Target indices where the source chunk changes, with 0 and ``size``."""
        return self._runs[0]

    @property
    def needed(self) -> int:
        """Source elements needed along this axis: the target length (tiled axes differ)."""
        return self.size

    def split_levels(self, chunk: int) -> list[IntArray]:
        """Boundaries to cut units at when they exceed the budget, coarsest first.

        The write grid here; a tiled axis first cuts at tile rows (see ``zarr_parallel.tiles``).
        """
        return [write_grid(self.size, chunk)]

    def touched(self, starts: IntArray, stops: IntArray) -> IntArray:
        """Source elements decompressed along this axis to read each segment ``[start, stop)``.

        A chunk that appears in two separate runs of one segment is counted twice: an upper
        bound, which is what memory estimates need.
        """
        run_starts, prefix = self._runs
        first = np.searchsorted(run_starts, starts, side="right") - 1
        last = np.searchsorted(run_starts, stops - 1, side="right") - 1
        return np.asarray(prefix[last + 1] - prefix[first], dtype=np.int64)

    def digest(self) -> str:
        """Stable digest of the mapping (for grouping and fingerprints)."""
        h = hashlib.sha256(self.dim.encode())
        h.update(self.chunk_of.tobytes())
        h.update(self.chunk_len.tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ArrayInput:
    """One target variable to be written by the jobs.

    Parameters
    ----------
    name
        Target variable name.
    axes
        One :class:`AxisMap` per target dimension, in the variable's dimension order.
    write_chunks
        Per dimension, the write unit: the Zarr shard length if sharded, else the chunk length.
    itemsize
        Bytes per element in memory after decoding and transforms (the target dtype).
    read_itemsize
        Bytes per decompressed source element (before decoding, e.g. 2 for packed int16).
    fixed_touched
        Source elements touched per target element along source dimensions that the target
        dropped (e.g. a scalar selection): the product of their touched chunk lengths.
    """

    name: str
    axes: tuple[AxisMap, ...]
    write_chunks: tuple[int, ...]
    itemsize: int
    read_itemsize: int
    fixed_touched: int = 1

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.write_chunks):
            raise ValueError(f"{self.name}: one write chunk length per axis is needed")
        if any(c <= 0 for c in self.write_chunks):
            raise ValueError(f"{self.name}: write chunks must be positive")

    @property
    def dims(self) -> tuple[str, ...]:
        """Target dimension names."""
        return tuple(a.dim for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Target shape."""
        return tuple(a.size for a in self.axes)

    @property
    def needed_elems(self) -> int:
        """Source elements the target needs (read amplification's denominator)."""
        return math.prod(ax.needed for ax in self.axes)

    def signature(self) -> str:
        """Variables with equal signatures share their jobs."""
        parts = [a.digest() for a in self.axes] + [repr(self.write_chunks)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """Budgets one job must respect.

    Parameters
    ----------
    memory_budget
        Bytes one job may use: the worker's memory limit minus the interpreter reserve.
    min_jobs
        Split into at least this many jobs where alignment allows (``num_jobs``).
    time_budget
        Seconds one job may take (a share of ``worker_timeout``); ``None`` for no limit.
    """

    memory_budget: int
    min_jobs: int = 1
    time_budget: float | None = None

    def __post_init__(self) -> None:
        if self.memory_budget <= 0:
            raise ValueError("memory_budget must be positive")
        if self.min_jobs < 1:
            raise ValueError("min_jobs must be at least 1")


@dataclass(frozen=True)
class Job:
    """One unit of work: a region of some variables, written by one task.

    ``region`` holds ``(dim, start, stop)`` per dimension in target index space.
    """

    id: int
    variables: tuple[str, ...]
    region: tuple[tuple[str, int, int], ...]
    memory: int
    read_bytes: int
    write_bytes: int

    @property
    def slices(self) -> dict[str, slice]:
        """The region as ``{dim: slice}``."""
        return {d: slice(a, b) for d, a, b in self.region}

    def describe(self) -> str:
        """Short human-readable region, e.g. ``t2m,d2m[time 0:48, latitude 0:721]``."""
        dims = ", ".join(f"{d} {a}:{b}" for d, a, b in self.region)
        return f"{','.join(self.variables)}[{dims}]"


@dataclass(frozen=True)
class GroupPlan:
    """How one group of variables (sharing dims and chunk mapping) was split."""

    variables: tuple[str, ...]
    dims: tuple[str, ...]
    unit_counts: tuple[int, ...]
    units_per_job: tuple[int, ...]
    split_dims: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A complete plan: jobs tiling the target, with memory and read-cost figures."""

    jobs: tuple[Job, ...]
    groups: tuple[GroupPlan, ...]
    memory_budget: int
    read_bytes: int
    needed_bytes: int
    write_bytes: int
    fingerprint: str
    notes: tuple[str, ...] = ()

    @property
    def read_amplification(self) -> float:
        """Source bytes read over source bytes needed (1.00 when aligned)."""
        return self.read_bytes / self.needed_bytes if self.needed_bytes else 1.0

    @property
    def max_job_memory(self) -> int:
        """Largest job estimate in bytes."""
        return max((j.memory for j in self.jobs), default=0)

    def job(self, job_id: int) -> Job:
        """The job with this id."""
        return self.jobs[job_id]

    def summary(self) -> dict[str, Any]:
        """Figures for reports and artifacts."""
        return {
            "jobs": len(self.jobs),
            "read_amplification": round(self.read_amplification, 4),
            "max_job_memory": self.max_job_memory,
            "memory_budget": self.memory_budget,
            "read_bytes": self.read_bytes,
            "needed_bytes": self.needed_bytes,
            "write_bytes": self.write_bytes,
            "fingerprint": self.fingerprint,
            "notes": list(self.notes),
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (the manifest's copy of the plan)."""
        return {
            **self.summary(),
            "groups": [
                {
                    "variables": list(g.variables),
                    "dims": list(g.dims),
                    "unit_counts": list(g.unit_counts),
                    "units_per_job": list(g.units_per_job),
                    "split_dims": list(g.split_dims),
                }
                for g in self.groups
            ],
            "job_list": [
                [j.id, list(j.variables), [list(r) for r in j.region], j.memory, j.read_bytes]
                for j in self.jobs
            ],
        }


def job_memory(
    touched_elems: int | IntArray,
    region_elems: int | IntArray,
    itemsize: int,
    read_itemsize: int,
) -> int | IntArray:
    """Estimated peak bytes of writing one variable's region (DESIGN §5).

    The decompressed source chunks touched, a decoded copy of them when decoding changes the
    item size, and :data:`REGION_COPIES` copies of the region.

    >>> job_memory(100, 50, 4, 4)
    1000
    >>> job_memory(100, 50, 4, 2)  # packed int16 decoded to float32
    1200
    """
    decoded = touched_elems * itemsize if itemsize != read_itemsize else 0
    return touched_elems * read_itemsize + decoded + REGION_COPIES * region_elems * itemsize


def fingerprint(*parts: str | bytes) -> str:
    """The one fingerprint function: SHA-256 over the parts, hex."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def plan_jobs(arrays: Sequence[ArrayInput], limits: Limits, request_digest: str = "") -> Plan:
    """Plan the jobs that write ``arrays`` within ``limits``.

    Parameters
    ----------
    arrays
        The variables to write, with their mapping onto the source chunk grid.
    limits
        Memory and time budgets and the minimum number of jobs.
    request_digest
        Digest of the validated request, folded into the plan fingerprint.

    Returns
    -------
    Plan
        Jobs tiling every array exactly, each aligned to the write grid, grown to the budgets.

    Raises
    ------
    PlanError
        When even a single write chunk with the source chunks it touches exceeds the budget.
    """
    groups: dict[str, list[ArrayInput]] = {}
    for arr in arrays:
        groups.setdefault(arr.signature(), []).append(arr)
    ordered = sorted(groups.values(), key=lambda g: g[0].name)
    total_min = limits.min_jobs
    jobs: list[Job] = []
    group_plans: list[GroupPlan] = []
    notes: list[str] = []
    read = needed = written = 0
    for members in ordered:
        share = max(1, math.ceil(total_min * _group_bytes(members) / _total_bytes(arrays)))
        gplan, group_jobs, g_read, g_needed, g_notes = _plan_group(
            members, limits, share, first_id=len(jobs)
        )
        jobs.extend(group_jobs)
        group_plans.append(gplan)
        notes.extend(g_notes)
        read += g_read
        needed += g_needed
        written += sum(j.write_bytes for j in group_jobs)
    digest = fingerprint(
        request_digest,
        canonical_json([[a.name, a.signature(), a.itemsize, a.read_itemsize] for a in arrays]),
        canonical_json([[j.variables, j.region] for j in jobs]),
    )
    return Plan(
        jobs=tuple(jobs),
        groups=tuple(group_plans),
        memory_budget=limits.memory_budget,
        read_bytes=read,
        needed_bytes=needed,
        write_bytes=written,
        fingerprint=digest,
        notes=tuple(notes),
    )


def _group_bytes(members: Sequence[ArrayInput]) -> int:
    return sum(math.prod(a.shape) * a.itemsize for a in members)


def _total_bytes(arrays: Sequence[ArrayInput]) -> int:
    return max(1, sum(math.prod(a.shape) * a.itemsize for a in arrays))


def write_grid(size: int, chunk: int) -> IntArray:
    """Boundaries of the write grid ``0, chunk, 2*chunk, ..., size``.

    >>> write_grid(10, 4).tolist()
    [0, 4, 8, 10]
    """
    return np.unique(np.concatenate([np.arange(0, size, chunk), [size]])).astype(np.int64)


def unit_boundaries(axis: AxisMap, chunk: int) -> IntArray:
    """Boundaries whole in both the write grid and the source grid (the units along an axis).

    >>> unit_boundaries(AxisMap.uniform("t", 10, 3), 2).tolist()
    [0, 6, 10]
    """
    return np.intersect1d(write_grid(axis.size, chunk), axis.source_boundaries).astype(np.int64)


class _GroupCost:
    """Cost of a group's jobs given per-dimension segment boundaries."""

    def __init__(self, members: Sequence[ArrayInput]) -> None:
        self.members = members
        self.axes = members[0].axes

    def segment_stats(self, d: int, bounds: IntArray) -> tuple[IntArray, IntArray]:
        starts, stops = bounds[:-1], bounds[1:]
        return self.axes[d].touched(starts, stops), stops - starts

    def bound(self, bounds: Sequence[IntArray]) -> tuple[int, float]:
        """Upper bound of any job's memory and duration for these segments."""
        t_max = l_max = 1
        for d, b in enumerate(bounds):
            touched, lengths = self.segment_stats(d, b)
            t_max *= int(touched.max())
            l_max *= int(lengths.max())
        memory = max(
            int(job_memory(t_max * a.fixed_touched, l_max, a.itemsize, a.read_itemsize))
            for a in self.members
        )
        moved = sum(
            t_max * a.fixed_touched * a.read_itemsize + l_max * a.itemsize for a in self.members
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


def _plan_group(
    members: Sequence[ArrayInput], limits: Limits, min_jobs: int, first_id: int
) -> tuple[GroupPlan, list[Job], int, int, list[str]]:
    lead = members[0]
    names = tuple(a.name for a in members)
    ndim = len(lead.axes)
    notes: list[str] = []
    cost = _GroupCost(members)

    if ndim == 0:
        mem = max(int(job_memory(a.fixed_touched, 1, a.itemsize, a.read_itemsize)) for a in members)
        _check_unit_fits(members, mem, limits, ())
        read = sum(a.fixed_touched * a.read_itemsize for a in members)
        need = sum(a.read_itemsize for a in members)
        job = Job(first_id, names, (), mem, read, sum(a.itemsize for a in members))
        return GroupPlan(names, (), (), (), ()), [job], read, need, notes

    if any(a.size == 0 for a in lead.axes):
        empty = [a.dim for a in lead.axes if a.size == 0]
        raise PlanError(
            "preprocessors",
            empty,
            f"the selection leaves no data along {empty} for {list(names)}",
            "Widen the selection so every dimension keeps at least one element",
        )

    units = [unit_boundaries(ax, c) for ax, c in zip(lead.axes, lead.write_chunks, strict=True)]
    split: list[str] = []
    # Units too large for the budget: cut them at write-grid boundaries, widest-over-write-grid
    # first. Those source chunks are then read by several jobs (read amplification > 1).
    if not cost.fits(units, limits):
        order = sorted(
            range(ndim),
            key=lambda d: -int(np.diff(units[d]).max()) / lead.write_chunks[d],
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
                    break
            if cost.fits(units, limits):
                break
        if split:
            notes.append(
                f"{','.join(names)}: units along {split} exceed the memory budget; split at "
                "target chunk boundaries, so some source chunks are read by more than one job"
            )
    if not cost.fits(units, limits):
        memory, _ = cost.bound(units)
        _check_unit_fits(members, memory, limits, tuple(units))

    n_units = [len(u) - 1 for u in units]
    per_job = [1] * ndim
    # Grow jobs innermost dimension first: contiguous slabs, few large writes.
    for d in reversed(range(ndim)):

        def ok(m: int, d: int = d) -> bool:
            trial = list(per_job)
            trial[d] = m
            return cost.fits([_pack(u, k) for u, k in zip(units, trial, strict=True)], limits)

        per_job[d] = _largest_fitting(1, n_units[d], ok)

    def count(pj: Sequence[int]) -> int:
        return math.prod(math.ceil(n / k) for n, k in zip(n_units, pj, strict=True))

    # Honour the minimum number of jobs by splitting the outermost dimensions first.
    for d in range(ndim):
        if count(per_job) >= min_jobs:
            break
        hi = per_job[d]

        def enough(m: int, d: int = d) -> bool:
            trial = list(per_job)
            trial[d] = m
            return count(trial) >= min_jobs

        if enough(1):
            # Largest m whose count still meets min_jobs (count falls as m grows).
            lo, top = 1, hi
            while lo < top:
                mid = (lo + top + 1) // 2
                if enough(mid):
                    lo = mid
                else:
                    top = mid - 1
            per_job[d] = lo
        else:
            per_job[d] = 1
    if count(per_job) < min_jobs:
        notes.append(
            f"{','.join(names)}: num_jobs={min_jobs} asked, but whole aligned units allow only "
            f"{count(per_job)} jobs"
        )

    bounds = [_pack(u, k) for u, k in zip(units, per_job, strict=True)]
    jobs, read, need = _make_jobs(members, cost, bounds, first_id)
    gplan = GroupPlan(names, lead.dims, tuple(n_units), tuple(per_job), tuple(split))
    return gplan, jobs, read, need, notes


def _check_unit_fits(
    members: Sequence[ArrayInput], memory: int, limits: Limits, units: tuple[IntArray, ...]
) -> None:
    if memory <= limits.memory_budget:
        return
    lead = members[0]
    src = ", ".join(f"{ax.dim}: {int(ax.chunk_len.max())}" for ax in lead.axes if ax.chunk_len.size)
    tgt = ", ".join(f"{ax.dim}: {c}" for ax, c in zip(lead.axes, lead.write_chunks, strict=True))
    raise PlanError(
        "memory_limit",
        format_bytes(limits.memory_budget),
        (
            f"one write chunk of {[a.name for a in members]} ({{{tgt}}}) with the source chunks "
            f"it touches ({{{src}}}) needs about {format_bytes(memory)}, more than the "
            f"{format_bytes(limits.memory_budget)} a job may use (memory_limit minus the reserve)"
        ),
        f"Raise memory_limit to at least {format_bytes(memory * 1.15 + 1)} plus the reserve, or "
        "choose smaller target chunks",
    )


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
    mem = np.zeros_like(touched)
    read = np.zeros_like(touched)
    write = np.zeros_like(touched)
    needed = 0
    for a in members:
        mem = np.maximum(
            mem, job_memory(touched * a.fixed_touched, lengths, a.itemsize, a.read_itemsize)
        )
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
