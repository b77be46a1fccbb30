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
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.jobs import Job
from zarr_parallel.units import format_bytes

IntArray = npt.NDArray[np.int64]

#: Copies of a job's region held at peak besides the decompressed source chunks: the assembled
#: region, an encoded copy (when a fill value or dtype is encoded), the encoder's contiguous
#: chunk copies, its compressed buffers (as large as the chunks for data that barely
#: compresses), and one more for library buffers and allocator slack (DESIGN §5). Measured peaks
#: are 2.8 regions for aligned jobs and 3.8 with an encoded fill value on incompressible data
#: (tests/test_memory_model.py), against 6 estimated (the touched chunks plus these five).
REGION_COPIES = 5
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
    def uniform(
        cls,
        dim: str,
        size: int,
        source_chunk: int,
        start: int = 0,
        source_size: int | None = None,
    ) -> AxisMap:
        """Map a step-1 selection ``[start, start + size)`` of a regularly chunked source axis.

        ``source_size`` is the source axis length (default: the selection's end); the last
        source chunk is cut short there.

        >>> AxisMap.uniform("latitude", 721, 100).chunk_len[-2:].tolist()
        [100, 21]
        """
        source_size = start + size if source_size is None else source_size
        idx = np.arange(start, start + size, dtype=np.int64)
        n_chunks = max(1, math.ceil(source_size / source_chunk))
        lens = np.full(n_chunks, source_chunk, dtype=np.int64)
        lens[-1] = max(1, source_size - source_chunk * (n_chunks - 1))
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

        The write grid here; a tiled axis first cuts at tile rows (see
        ``zarr_parallel.planning.tiles``).
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

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256(self.dim.encode())
        h.update(self.chunk_of.tobytes())
        h.update(self.chunk_len.tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """Stable digest of the mapping (for grouping and fingerprints)."""
        return self._digest


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
    fast
        Written by the fast path (raw chunk reads streamed in slabs, :func:`fast_job_memory`)
        rather than through xarray (:func:`job_memory`).
    """

    name: str
    axes: tuple[AxisMap, ...]
    write_chunks: tuple[int, ...]
    itemsize: int
    read_itemsize: int
    fixed_touched: int = 1
    fast: bool = False

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

    @property
    def source_chunk_elems(self) -> int:
        """Elements of the largest source chunk this variable touches."""
        return self.fixed_touched * math.prod(
            int(a.chunk_len.max()) if a.chunk_len.size else 1 for a in self.axes
        )

    def memory(self, touched: Any, lengths: Sequence[Any]) -> Any:
        """Estimated peak bytes of jobs with these per-dimension region lengths.

        ``touched`` is the source elements touched (product over dimensions), ``lengths`` the
        region lengths per dimension (ints or arrays that broadcast together).
        """
        region = math.prod(lengths) if lengths else 1
        if not self.fast or not lengths:
            return job_memory(
                touched * self.fixed_touched, region, self.itemsize, self.read_itemsize
            )
        return fast_job_memory(
            lengths,
            self.write_chunks,
            self.itemsize,
            self.read_itemsize,
            self.source_chunk_elems,
        )

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
    reserve
        The interpreter reserve subtracted from ``memory_limit`` to get ``memory_budget``
        (only used to word errors in the user's terms).
    overhead
        The worker process's allowance, also subtracted from ``memory_limit`` outside series
        mode (only used to word errors).
    """

    memory_budget: int
    min_jobs: int = 1
    time_budget: float | None = None
    reserve: int = 0
    overhead: int = 0

    @property
    def memory_limit(self) -> int:
        """The ``memory_limit`` these budgets come from.

        >>> Limits(14 * 10**6, reserve=256 * 10**6, overhead=250 * 10**6).memory_limit
        520000000
        """
        return self.memory_budget + self.reserve + self.overhead

    def held_back(self) -> str:
        """What ``memory_limit`` keeps from a job, in words (for error messages)."""
        parts = [f"the {format_bytes(self.reserve)} reserve"] if self.reserve else []
        if self.overhead:
            parts.append(f"the {format_bytes(self.overhead)} dask worker process")
        return f"memory_limit minus {' and '.join(parts)}" if parts else "memory_limit"

    def __post_init__(self) -> None:
        if self.memory_budget <= 0:
            raise ValueError("memory_budget must be positive")
        if self.min_jobs < 1:
            raise ValueError("min_jobs must be at least 1")


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
    #: What the cache holds (request content, source state, arrays), whatever the job split:
    #: equal for runs of one request in any deploy mode, worker count or memory limit.
    content_fingerprint: str = ""

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
            "content_fingerprint": self.content_fingerprint,
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
            "job_list": [j.to_row() for j in self.jobs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """The plan a manifest stored (:meth:`to_json`), e.g. to continue an interrupted run."""
        jobs = tuple(Job.from_row(row) for row in data["job_list"])
        groups = tuple(
            GroupPlan(
                tuple(g["variables"]),
                tuple(g["dims"]),
                tuple(g["unit_counts"]),
                tuple(g["units_per_job"]),
                tuple(g["split_dims"]),
            )
            for g in data.get("groups", [])
        )
        return cls(
            jobs=jobs,
            groups=groups,
            memory_budget=int(data["memory_budget"]),
            read_bytes=int(data["read_bytes"]),
            needed_bytes=int(data["needed_bytes"]),
            write_bytes=int(data["write_bytes"]),
            fingerprint=str(data["fingerprint"]),
            notes=tuple(data.get("notes", ())),
            content_fingerprint=str(data.get("content_fingerprint", "")),
        )


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
    1400
    >>> job_memory(100, 50, 4, 2)  # packed int16 decoded to float32
    1600
    """
    decoded = touched_elems * itemsize if itemsize != read_itemsize else 0
    return touched_elems * read_itemsize + decoded + REGION_COPIES * region_elems * itemsize


#: Slabs a fast-path job streams its region in (along the first dimension, at write-chunk
#: boundaries): one slab is encoded while the next is read (zarr_parallel.run.job._copy_fast).
FAST_SLABS = 4


def fast_slab_bounds(start: int, stop: int, chunk: int, slabs: int = FAST_SLABS) -> IntArray:
    """Boundaries of the slabs a fast-path job streams ``[start, stop)`` in.

    At most ``slabs`` pieces of whole write chunks (the last may end at ``stop``).

    >>> fast_slab_bounds(0, 96, 48).tolist()
    [0, 48, 96]
    >>> fast_slab_bounds(0, 500, 48).tolist()
    [0, 144, 288, 432, 500]
    """
    n_chunks = max(1, math.ceil((stop - start) / chunk))
    per = math.ceil(n_chunks / min(slabs, n_chunks))
    edges = np.arange(start, stop, per * chunk, dtype=np.int64)
    return np.concatenate([edges, [stop]]).astype(np.int64)


#: Fast path: most write chunks zarr encodes at once (``async.concurrency`` during its writes) and
#: the bytes each holds then (a contiguous copy and the compressed result), in chunk sizes.
FAST_WRITE_INFLIGHT = 4
FAST_WRITE_COPIES = 2
#: Fast path: most reader threads (zarr_parallel.sources.fastread caps its pool at this), and the
#: bytes each holds per source chunk (the stored bytes, inflated, un-shuffled), in chunk sizes. Two
#: are enough: inflating (libdeflate, GIL released) costs ~1.1 CPU s per GB here, encoding the
#: output with zstd ~6 s per GB, so two readers keep ahead of the encoders; more would only hold
#: more chunks.
FAST_READ_THREADS = 2
FAST_READ_COPIES = 3
#: Fast path: what each thread running at once (readers and encoders) touches besides the counted
#: buffers the first time a process runs a job: its allocator arena and stack. Measured with the
#: kernel's exact peak (VmHWM) in fresh job processes: +8-11 MB at 2 readers and 4 encoders.
FAST_THREAD_BYTES = 2 * 2**20
#: Fast path: allowance over the counted buffers for allocator and interpreter churn. Measured on
#: the 4.2 GB benchmark (benchmarks/results/full.json): peaks of 0.99-1.002x the counted buffers.
FAST_MARGIN = 1.1


def fast_slab_len(length: Any, chunk: int) -> tuple[Any, Any]:
    """Longest slab and number of slabs of a region ``length`` long (see :func:`fast_slab_bounds`).

    >>> fast_slab_len(500, 48)
    (144, 4)
    """
    n_chunks = np.maximum(1, -(-np.asarray(length) // chunk))
    per = -(-n_chunks // np.minimum(FAST_SLABS, n_chunks)) * chunk
    slab = np.minimum(per, length)
    n_slabs = -(-np.asarray(length) // per)
    if np.ndim(slab) == 0:
        return int(slab), int(n_slabs)
    return slab, n_slabs


def fast_job_memory(
    lengths: Sequence[Any],
    write_chunks: Sequence[int],
    itemsize: int,
    read_itemsize: int,
    source_chunk_elems: int,
) -> Any:
    """Estimated peak bytes of a fast-path job with these region lengths (DESIGN §5).

    The job streams its region in slabs along the first dimension: the slab being read (raw
    items, plus a decoded copy when decoding changes the item size), the previous slab being
    written when there are several, the chunks zarr encodes at once, the source chunks the
    reader threads hold and what each of those threads touches (:data:`FAST_THREAD_BYTES`),
    with a :data:`FAST_MARGIN` allowance. A single-slab job reads, then writes (variables
    follow one another too), so its readers' and encoders' buffers never coexist.

    >>> fast_job_memory([96, 721, 1440], [48, 180, 360], 4, 4, 721 * 1440)
    589289395
    """
    slab0, n_slabs = fast_slab_len(lengths[0], int(write_chunks[0]))
    slab = slab0 * (math.prod(lengths[1:]) if len(lengths) > 1 else 1)
    held = slab * read_itemsize
    if itemsize != read_itemsize:
        held = held + slab * itemsize
    # The previous slab is written while the next is read: two full slabs when there are three
    # or more; with two, the second is the shorter rest of the region.
    rest = (np.asarray(lengths[0]) - slab0) * (slab // np.maximum(slab0, 1))
    previous = np.where(np.asarray(n_slabs) > 2, slab, np.where(np.asarray(n_slabs) == 2, rest, 0))
    held = held + previous * itemsize
    chunk_elems = math.prod(int(c) for c in write_chunks)
    in_slab = -(-slab // chunk_elems)
    writing = FAST_WRITE_COPIES * np.minimum(FAST_WRITE_INFLIGHT, in_slab) * chunk_elems * itemsize
    reading = FAST_READ_THREADS * FAST_READ_COPIES * source_chunk_elems * read_itemsize
    threads = (FAST_READ_THREADS + FAST_WRITE_INFLIGHT) * FAST_THREAD_BYTES
    # Reading overlaps writing only while a previous slab is written (write._copy_fast).
    buffers = np.where(np.asarray(n_slabs) > 1, writing + reading, np.maximum(writing, reading))
    total = (held + buffers + threads) * FAST_MARGIN
    return int(total) if np.ndim(total) == 0 else total.astype(np.int64)


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
    # By name: the order in which a request lists its variables changes neither the jobs nor
    # the fingerprint (the same content must be found up to date).
    arrays = sorted(arrays, key=lambda a: a.name)
    groups: dict[str, list[ArrayInput]] = {}
    for arr in arrays:
        groups.setdefault(arr.signature(), []).append(arr)
    ordered = [_Group.build(members, limits) for members in groups.values()]
    ordered.sort(key=lambda g: g.members[0].name)
    shares = _share_jobs(
        limits.min_jobs,
        [_group_bytes(g.members) for g in ordered],
        [g.capacity for g in ordered],
    )
    jobs: list[Job] = []
    group_plans: list[GroupPlan] = []
    notes: list[str] = []
    read = needed = written = 0
    for group, share in zip(ordered, shares, strict=True):
        gplan, group_jobs, g_read, g_needed, g_notes = group.plan(limits, share, len(jobs))
        jobs.extend(group_jobs)
        group_plans.append(gplan)
        notes.extend(g_notes)
        read += g_read
        needed += g_needed
        written += sum(j.write_bytes for j in group_jobs)
    if sum(g.capacity for g in ordered) < limits.min_jobs:
        notes.append(
            f"num_jobs={limits.min_jobs} asked, but whole aligned units allow only {len(jobs)} "
            "jobs; cutting units further would make jobs re-read source chunks"
        )
    arrays_json = canonical_json(
        [[a.name, a.signature(), a.itemsize, a.read_itemsize] for a in arrays]
    )
    digest = fingerprint(
        request_digest, arrays_json, canonical_json([[j.variables, j.region] for j in jobs])
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
        content_fingerprint=fingerprint(request_digest, arrays_json),
    )


def _group_bytes(members: Sequence[ArrayInput]) -> int:
    return sum(math.prod(a.shape) * a.itemsize for a in members)


def _share_jobs(min_jobs: int, weights: Sequence[int], capacities: Sequence[int]) -> list[int]:
    """Spread ``min_jobs`` over groups by weight, none above its capacity (its unit count).

    What a full group cannot take goes to the others, so the total reaches ``min_jobs``
    whenever the capacities allow.

    >>> _share_jobs(4, [4, 16], [2, 2])
    [2, 2]
    >>> _share_jobs(6, [1, 1, 1], [100, 1, 100])
    [3, 1, 3]
    """
    shares = [1] * len(weights)
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        remaining = min_jobs - sum(shares[i] for i in fixed)
        total = sum(max(1, weights[i]) for i in free)
        capped = False
        for i in free:
            want = max(1, math.ceil(remaining * max(1, weights[i]) / max(1, total)))
            shares[i] = min(want, max(1, capacities[i]))
            if want >= capacities[i]:
                fixed.add(i)
                capped = True
        if not capped or not free:
            return shares


def write_grid(size: int, chunk: int) -> IntArray:
    """Boundaries of the write grid ``0, chunk, 2*chunk, ..., size``.

    >>> write_grid(10, 4).tolist()
    [0, 4, 8, 10]
    """
    grid = np.arange(0, size + chunk, chunk, dtype=np.int64)
    grid[-1] = size  # the last chunk may be partial (or the array empty)
    return grid if size else grid[:1]


def unit_boundaries(axis: AxisMap, chunk: int) -> IntArray:
    """Boundaries whole in both the write grid and the source grid (the units along an axis).

    >>> unit_boundaries(AxisMap.uniform("t", 10, 3), 2).tolist()
    [0, 6, 10]
    """
    bounds = axis.source_boundaries  # sorted, with 0 and the size: keep those on the write grid
    keep = (bounds % chunk == 0) | (bounds == axis.size)
    return np.asarray(bounds[keep], dtype=np.int64)


#: Beyond this many combinations of per-dimension extremes, cost bounds use the (safe, maybe
#: pessimistic) product of per-dimension maxima instead of the exact maximum.
_MAX_COMBINATIONS = 4096


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
class _Group:
    """Variables planned together, with their units (cut to the budget where needed)."""

    members: Sequence[ArrayInput]
    cost: _GroupCost
    units: list[IntArray]
    split: list[str]
    notes: list[str]

    @property
    def capacity(self) -> int:
        """Most jobs whole units allow."""
        return math.prod(len(u) - 1 for u in self.units) if self.units else 1

    @classmethod
    def build(cls, members: Sequence[ArrayInput], limits: Limits) -> _Group:
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
        units = [unit_boundaries(ax, c) for ax, c in zip(lead.axes, lead.write_chunks, strict=True)]
        split: list[str] = []
        notes: list[str] = []
        # Units too large for the budget: cut them at write-grid boundaries, widest-over-write-
        # grid first. Those source chunks are then read by several jobs (read amplification > 1).
        if not cost.fits(units, limits):
            order = sorted(
                range(len(units)),
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
            _check_unit_fits(members, memory, limits)
            notes.append(
                f"{','.join(names)}: one write chunk is estimated to take longer than the time "
                "budget (half of worker_timeout); raise worker_timeout or choose smaller chunks"
            )
        return cls(members, cost, units, split, notes)

    def plan(
        self, limits: Limits, min_jobs: int, first_id: int
    ) -> tuple[GroupPlan, list[Job], int, int, list[str]]:
        """Grow jobs to the budgets, then split them until there are ``min_jobs``."""
        members, cost, units = self.members, self.cost, self.units
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

            def enough(m: int, d: int = d) -> bool:
                trial = list(per_job)
                trial[d] = m
                return count(trial) >= min_jobs

            # Largest m whose count still meets min_jobs (count falls as m grows), else 1.
            per_job[d] = _largest_fitting(1, per_job[d], enough) if enough(1) else 1

        # Same number of jobs, evened out: 4 units in 2 jobs are 2 + 2, not 3 + 1.
        per_job = [math.ceil(n / math.ceil(n / k)) for n, k in zip(n_units, per_job, strict=True)]
        bounds = [_pack(u, k) for u, k in zip(units, per_job, strict=True)]
        jobs, read, need = _make_jobs(members, cost, bounds, first_id)
        gplan = GroupPlan(names, lead.dims, tuple(n_units), tuple(per_job), tuple(self.split))
        return gplan, jobs, read, need, list(self.notes)


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


def plan_jobs_from(
    arrays: Sequence[ArrayInput],
    limits: Limits,
    request_digest: str,
    dim: str,
    start: int,
) -> Plan:
    """Plan only the part of ``arrays`` from index ``start`` along ``dim`` (an append).

    Arrays without ``dim`` are left out: nothing of them is written. ``start`` must be a
    boundary of every remaining array's write grid, so the jobs stay aligned; the returned jobs'
    regions are in the full arrays' index space and tile ``[start, size)`` along ``dim``.

    >>> arr = ArrayInput("t2m", (AxisMap.uniform("time", 10, 3),), (4,), 4, 4)
    >>> [j.region for j in plan_jobs_from([arr], Limits(10**6), "", "time", 8).jobs]
    [(('time', 8, 10),)]

    Raises
    ------
    ValueError
        When no array has ``dim``, or ``start`` is outside it or not on its write grid.
    """
    tail: list[ArrayInput] = []
    for arr in arrays:
        if dim not in arr.dims:
            continue
        d = arr.dims.index(dim)
        axis = arr.axes[d]
        if not 0 <= start < axis.size:
            raise ValueError(f"{arr.name}: start {start} is outside {dim} of length {axis.size}")
        if start % arr.write_chunks[d]:
            raise ValueError(
                f"{arr.name}: start {start} is not on the write grid of {dim} "
                f"(chunk length {arr.write_chunks[d]})"
            )
        axes = list(arr.axes)
        axes[d] = AxisMap(dim, axis.chunk_of[start:], axis.chunk_len)
        tail.append(replace(arr, axes=tuple(axes)))
    if not tail:
        raise ValueError(f"no array has the dimension {dim!r}")
    sub = plan_jobs(tail, limits, request_digest)
    jobs = tuple(
        replace(
            job,
            region=tuple(
                (d, a + start, b + start) if d == dim else (d, a, b) for d, a, b in job.region
            ),
        )
        for job in sub.jobs
    )
    digest = fingerprint(sub.fingerprint, canonical_json(["from", dim, start]))
    return replace(sub, jobs=jobs, fingerprint=digest)
