"""Staged plans through intermediate Zarr stores (docs/design.md §3.4, "Strategies").

When the target cuts every source chunk (maps read into time series), a direct plan either holds
too much or re-reads the source once per job. rechunker's answer: choose *intermediate* chunks
that both sides consolidate into within the memory limit. Stage 1 is a direct plan from the source
to an intermediate target with those chunks (every source chunk read once); stage 2 a direct plan
from the intermediate store (a Zarr source in target index space) to the real target (every
intermediate chunk read once). Pure arithmetic: the same planner plans each stage.

Two stages are tried first (:func:`choose_intermediate`). When no single intermediate keeps both
stages within the budget with chunks of at least :func:`chunk_floor` (a tight memory limit between
chunks long along one axis and short along another leaves only tiny intermediate chunks: many
small files, as many file-system calls), the plan gets more stages, up to :data:`MAX_STAGES`,
through a chain of intermediates whose chunk shapes step geometrically from the source's to the
target's (:mod:`zarr_parallel.planning.chain`, rechunker's ``multistage_rechunking_plan``).
When no chain fits either, the two-stage plan with smaller chunks is kept (many small files
still beat re-reading the source), with a note. :func:`plan_staged` plans the stages.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.chain import chain_chunks, source_length
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.planning.grid import AxisMap, IntArray, unit_boundaries
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.planning.plan import Plan, Stage, content_fingerprint, plan_jobs

#: Largest intermediate chunk sought (bytes): beyond this larger chunks save no file-system
#: calls worth having, and they make the stages' units (so their jobs) larger.
INTERMEDIATE_CHUNK_CAP = 64 * 2**20
#: Smallest intermediate chunk written (bytes), unless the source's or the target's chunks are
#: smaller still: below about 1 MiB a chunk file costs more in file-system calls (open, write,
#: close, and an inode on a parallel file system) than in bytes, and rechunker and cubed bound
#: their intermediates from below for the same reason (``min_mem``).
INTERMEDIATE_CHUNK_FLOOR = 2**20
#: Most stages of a staged plan (one intermediate store fewer): each stage writes and reads the
#: data once more, so beyond this the two-stage plan with smaller chunks (or a streaming or direct
#: plan) is kept.
MAX_STAGES = 4
#: Most candidate chunk lengths tried per dimension (thinned geometrically).
_CANDIDATES = 16


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nesting_lengths(size: int, source: int, write: int) -> list[int]:
    """Every chunk length along one dimension whose grid nests with the source grid or with the
    write grid (divisors and multiples of either), and the whole dimension.

    >>> _nesting_lengths(12, 4, 6)
    [1, 2, 3, 4, 6, 8, 12]
    """
    found = {size}
    for base in {max(1, min(source, size)), max(1, min(write, size))}:
        found.update(d for d in _divisors(base))
        found.update(base * k for k in range(1, size // base + 1))
    return sorted(v for v in found if 1 <= v <= size)


def _candidates(size: int, source: int, write: int) -> list[int]:
    """Intermediate chunk lengths worth trying along one dimension: the nesting lengths thinned
    geometrically to :data:`_CANDIDATES`, always keeping both ends.

    >>> _candidates(12, 4, 6)
    [1, 2, 3, 4, 6, 8, 12]
    """
    values = _nesting_lengths(size, source, write)
    if len(values) <= _CANDIDATES:
        return values
    picks = np.unique(np.geomspace(1, len(values), _CANDIDATES).astype(int) - 1)
    return sorted({values[0], values[-1], *(values[int(i)] for i in picks)})


def _max_unit(bounds: IntArray) -> int:
    return int(np.diff(bounds).max()) if bounds.size > 1 else 0


def chunk_floor(members: Sequence[ArrayInput]) -> int:
    """Smallest intermediate chunk (bytes) a staged plan of this group may write.

    :data:`INTERMEDIATE_CHUNK_FLOOR`, or the source's or the target's chunk if smaller (an
    intermediate then has no more chunks than the larger of the two ends).

    >>> arr = ArrayInput("v", (AxisMap.uniform("t", 96, 1),), (96,), 4, 4)
    >>> chunk_floor([arr])
    4
    """
    lead = members[0]
    itemsize = max(a.itemsize for a in members)
    source = math.prod(source_length(ax) for ax in lead.axes) * itemsize
    target = math.prod(min(w, ax.size) for ax, w in zip(lead.axes, lead.write_chunks, strict=True))
    return min(INTERMEDIATE_CHUNK_FLOOR, source, target * itemsize)


@dataclass(frozen=True)
class _Option:
    """One intermediate chunk length along one dimension and the units it makes."""

    length: int
    unit1: int  # longest stage-1 unit (source grid with the intermediate grid)
    touched1: int  # source elements it touches
    unit2: int  # longest stage-2 unit (intermediate grid with the write grid)


def _option(axis: AxisMap, write: int, length: int) -> _Option:
    u1 = unit_boundaries(axis, length)
    touched = axis.touched(u1[:-1], u1[1:])
    u2 = unit_boundaries(AxisMap.uniform(axis.dim, axis.size, length), write)
    return _Option(length, _max_unit(u1), int(touched.max()), _max_unit(u2))


def _options(axis: AxisMap, write: int) -> list[_Option]:
    source = int(np.diff(axis.source_boundaries).max()) if axis.size else 1
    return [_option(axis, write, n) for n in _candidates(axis.size, source, write)]


def chain_inputs(
    members: Sequence[ArrayInput], chain: Sequence[Sequence[int]]
) -> list[list[ArrayInput]]:
    """The planner's inputs of every stage of a chain of intermediates with chunks ``chain``
    (source side first): stage 1 source → ``chain[0]``, stage ``j`` ``chain[j-2]`` →
    ``chain[j-1]``, the last ``chain[-1]`` → the members' write grid.

    Every stage after the first reads an intermediate store through zarr: chunks of the
    previous intermediate in target index space, stored items of the target's size, sized by the
    general memory model (no fast path).
    """
    stages = [[replace(a, write_chunks=tuple(chain[0])) for a in members]]
    for j, read in enumerate(chain):
        stages.append(
            [
                replace(
                    a,
                    axes=tuple(
                        AxisMap.uniform(ax.dim, ax.size, c)
                        for ax, c in zip(a.axes, read, strict=True)
                    ),
                    write_chunks=tuple(chain[j + 1]) if j + 1 < len(chain) else a.write_chunks,
                    read_itemsize=a.itemsize,
                    fixed_touched=1,
                    fast=False,
                )
                for a in members
            ]
        )
    return stages


def _two_stage_memory(members: Sequence[ArrayInput], combo: Sequence[_Option]) -> int:
    """The larger of the two stages' largest-unit memory with these per-dimension options."""
    chunks = tuple(o.length for o in combo)
    touched = math.prod(o.touched1 for o in combo)
    # Stage 1 writes the intermediate grid: the fast path's slabs and encoders follow it.
    lengths1 = [o.unit1 for o in combo]
    mem1 = max(int(replace(a, write_chunks=chunks).memory(touched, lengths1)) for a in members)
    region2 = math.prod(o.unit2 for o in combo)
    itemsize = max(a.itemsize for a in members)
    return max(mem1, int(job_memory(region2, region2, itemsize, itemsize)))


def choose_intermediate(
    members: Sequence[ArrayInput], limits: Limits, floored: bool = True
) -> tuple[int, ...] | None:
    """Intermediate chunks of a two-stage plan for one group, or None when no choice fits.

    Among lengths per dimension whose stage units (whole in both grids of a stage) fit the
    memory budget on both sides, with chunks of at least :func:`chunk_floor` (when ``floored``),
    the largest chunk up to :data:`INTERMEDIATE_CHUNK_CAP`, then the smallest stage units; ties go
    to the first in order (deterministic). When only chunks below the floor fit among the thinned
    candidates, the largest of them is grown towards it (:func:`_grow_to_floor`).
    """
    lead = members[0]
    options = [_options(ax, w) for ax, w in zip(lead.axes, lead.write_chunks, strict=True)]
    best: tuple[tuple[int, int], tuple[int, ...]] | None = None
    below: list[tuple[_Option, ...]] = []  # combinations below the floor, tried if need be
    itemsize = max(a.itemsize for a in members)
    floor = chunk_floor(members) if floored else 0
    for combo in itertools.product(*options):
        elems = math.prod(o.length for o in combo)
        if elems * itemsize < floor:
            below.append(combo)
            continue
        if _two_stage_memory(members, combo) > limits.memory_budget:
            continue
        size = min(elems * itemsize, INTERMEDIATE_CHUNK_CAP)
        region1 = math.prod(o.unit1 for o in combo)
        key = (-size, region1 + math.prod(o.unit2 for o in combo))
        if best is None or key < best[0]:
            best = (key, tuple(o.length for o in combo))
    if best is not None:
        return best[1]
    # The largest combination below the floor that fits (stable sort: ties in order).
    below.sort(key=lambda c: -math.prod(o.length for o in c))
    for combo in below:
        if _two_stage_memory(members, combo) <= limits.memory_budget:
            return _grow_to_floor(members, limits, list(combo), floor)
    return None


def _grow_to_floor(
    members: Sequence[ArrayInput], limits: Limits, combo: list[_Option], floor: int
) -> tuple[int, ...] | None:
    """Chunks at least ``floor`` bytes grown from ``combo`` (which fits, below the floor), or None.

    Dimension by dimension, twice over, the longest length that still keeps both stages within
    the budget, among every length that nests with the source or the write grid (not only the
    thinned candidates the search tried): between two candidates may lie the length that lifts
    the chunk over the floor. A unit is at least one chunk long, so the scan along a dimension
    stops at the first length that would not fit even as its own unit.
    """
    lead = members[0]
    itemsize = max(a.itemsize for a in members)
    for _ in range(2):
        for d, (ax, w) in enumerate(zip(lead.axes, lead.write_chunks, strict=True)):
            for n in _nesting_lengths(ax.size, source_length(ax), w):
                if n <= combo[d].length:
                    continue
                bound = [*combo[:d], _Option(n, n, n, n), *combo[d + 1 :]]
                if _two_stage_memory(members, bound) > limits.memory_budget:
                    break
                trial = [*combo[:d], _option(ax, w, n), *combo[d + 1 :]]
                if _two_stage_memory(members, trial) <= limits.memory_budget:
                    combo = trial
        if math.prod(o.length for o in combo) * itemsize >= floor:
            return tuple(o.length for o in combo)
    return None


def unit_memory(inputs: Sequence[ArrayInput]) -> int:
    """Estimated memory of the largest unit (whole in the read and the write grid) of one
    group's stage: at most the budget, or the stage re-reads what it reads."""
    lead = inputs[0]
    lengths, touched = [], 1
    for ax, w in zip(lead.axes, lead.write_chunks, strict=True):
        bounds = unit_boundaries(ax, w)
        lengths.append(_max_unit(bounds))
        touched *= int(ax.touched(bounds[:-1], bounds[1:]).max())
    return max(int(a.memory(touched, lengths)) for a in inputs)


def choose_chain(
    members: Sequence[ArrayInput], limits: Limits, stages: int, floored: bool = True
) -> list[tuple[int, ...]] | None:
    """The intermediate chunk shapes of a ``stages``-stage plan of one group (source side
    first), or None when they do not fit: two stages by :func:`choose_intermediate`, more by
    geometric steps (:func:`~zarr_parallel.planning.chain.chain_chunks`) whose every stage's
    units fit the budget and whose every intermediate chunk is at least :func:`chunk_floor`
    (when ``floored``).
    """
    if stages == 2:
        picked = choose_intermediate(members, limits, floored)
        return None if picked is None else [picked]
    chain = chain_chunks(members, stages)
    itemsize = max(a.itemsize for a in members)
    floor = chunk_floor(members) if floored else 0
    if any(math.prod(c) * itemsize < floor for c in chain):
        return None
    if any(unit_memory(s) > limits.memory_budget for s in chain_inputs(members, chain)):
        return None
    return chain


def _groups(arrays: Sequence[ArrayInput]) -> list[list[ArrayInput]]:
    groups: dict[str, list[ArrayInput]] = {}
    for arr in sorted(arrays, key=lambda a: a.name):
        groups.setdefault(arr.signature(), []).append(arr)
    return list(groups.values())


def plan_staged(
    arrays: Sequence[ArrayInput], limits: Limits, request_digest: str = ""
) -> Plan | None:
    """The staged plan of ``arrays`` with the fewest stages (two to :data:`MAX_STAGES`) that
    keeps every stage within the budget, reading what it reads once, with intermediate chunks of
    at least :func:`chunk_floor`; failing that, the two-stage plan with the largest chunks that
    fit below the floor (many small files still beat re-reading the source), with a note saying
    so; None when not even that fits.

    The returned plan's jobs are the last stage's (the target's writes); ``Plan.stages`` holds
    the earlier ones, each with the chunks of the intermediate it writes. Its read figures are
    the source's (read amplification keeps meaning source re-reads); the intermediates' bytes
    are in :attr:`Plan.intermediate_bytes`.
    """
    groups = _groups(arrays)
    if any(not members[0].axes for members in groups):
        return None
    for stages in range(2, MAX_STAGES + 1):
        plan = _plan_stages(arrays, groups, limits, request_digest, stages)
        if plan is not None:
            return plan
    plan = _plan_stages(arrays, groups, limits, request_digest, 2, floored=False)
    if plan is None:
        return None
    small = [
        (",".join(a.name for a in members), dict(plan.stages[0].chunks)[members[0].name])
        for members in groups
        if math.prod(dict(plan.stages[0].chunks)[members[0].name]) * members[0].itemsize
        < chunk_floor(members)
    ]
    if not small:
        return plan
    note = (
        f"intermediate chunks {', '.join(f'{n}: {c}' for n, c in small)} are below "
        f"{INTERMEDIATE_CHUNK_FLOOR // 2**20} MiB (and below the source's or the target's "
        f"chunk): no staged plan of up to {MAX_STAGES} stages keeps every stage within the "
        "memory limit with larger ones; a larger memory_limit writes fewer, larger files"
    )
    return replace(plan, notes=(*plan.notes, note))


def _plan_stages(
    arrays: Sequence[ArrayInput],
    groups: Sequence[Sequence[ArrayInput]],
    limits: Limits,
    request_digest: str,
    stages: int,
    floored: bool = True,
) -> Plan | None:
    """The ``stages``-stage plan of every group, or None when a group's chain does not fit."""
    chains = [choose_chain(members, limits, stages, floored) for members in groups]
    found = [c for c in chains if c is not None]
    if len(found) < len(chains):
        return None
    return _plan_chain(arrays, groups, found, limits, request_digest)


def _plan_chain(
    arrays: Sequence[ArrayInput],
    groups: Sequence[Sequence[ArrayInput]],
    chains: Sequence[Sequence[tuple[int, ...]]],
    limits: Limits,
    request_digest: str,
) -> Plan | None:
    """Plan every stage of these chains (one per group); None when a stage would re-read."""
    n = len(chains[0]) + 1
    inputs: list[list[ArrayInput]] = [[] for _ in range(n)]
    chunks: dict[str, list[tuple[int, ...]]] = {}
    for members, chain in zip(groups, chains, strict=True):
        for k, stage in enumerate(chain_inputs(members, chain)):
            inputs[k] += stage
        chunks.update({a.name: list(chain) for a in members})
    try:
        plans = [
            plan_jobs(inputs[k], limits, fingerprint(request_digest, f"stage-{k + 1}"))
            for k in range(n)
        ]
    except PlanError:
        return None
    if max(p.read_amplification for p in plans) > 1.0 + 1e-9:
        # The unit bounds allowed it, the full cost model did not (e.g. the time budget):
        # a stage would re-read, which is not what an intermediate store is for.
        return None
    # A two-stage plan's fingerprint is what it was before plans had more stages.
    shown = {name: c[0] for name, c in chunks.items()} if n == 2 else chunks
    digest = fingerprint(*(p.fingerprint for p in plans), canonical_json(shown))
    stages = tuple(
        Stage(p, tuple(sorted((name, tuple(c[k])) for name, c in chunks.items())))
        for k, p in enumerate(plans[:-1])
    )
    return replace(
        plans[-1],
        read_bytes=plans[0].read_bytes,
        needed_bytes=plans[0].needed_bytes,
        fingerprint=digest,
        content_fingerprint=content_fingerprint(arrays, request_digest),
        strategy="staged",
        stages=stages,
        notes=tuple(note for p in plans for note in p.notes),
    )
