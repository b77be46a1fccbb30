"""Multi-stage plans through an intermediate Zarr store (docs/design.md §3.4, "Strategies").

When the target cuts every source chunk (maps read into time series), a direct plan either holds
too much or re-reads the source once per job. rechunker's answer: choose *intermediate* chunks
that both sides consolidate into within the memory limit. Stage 1 is a direct plan from the source
to an intermediate target with those chunks (every source chunk read once); stage 2 a direct plan
from the intermediate store (a Zarr source in target index space) to the real target (every
intermediate chunk read once). Pure arithmetic: the same planner plans each stage.

:func:`choose_intermediate` picks the chunks, :func:`plan_staged` plans the stages.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.planning.grid import AxisMap, IntArray, unit_boundaries
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.planning.plan import Plan, Stage, content_fingerprint, plan_jobs

#: Largest intermediate chunk sought (bytes): beyond this larger chunks save no file-system
#: calls worth having, and they make the stages' units (so their jobs) larger.
INTERMEDIATE_CHUNK_CAP = 64 * 2**20
#: Most candidate chunk lengths tried per dimension (thinned geometrically).
_CANDIDATES = 16


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidates(size: int, source: int, write: int) -> list[int]:
    """Intermediate chunk lengths worth trying along one dimension.

    Lengths whose grid nests with the source grid or with the write grid (divisors and
    multiples of either), thinned to :data:`_CANDIDATES`, always keeping both ends.

    >>> _candidates(12, 4, 6)
    [1, 2, 3, 4, 6, 8, 12]
    """
    found = {size}
    for base in {max(1, min(source, size)), max(1, min(write, size))}:
        found.update(d for d in _divisors(base))
        found.update(base * k for k in range(1, size // base + 1))
    values = sorted(v for v in found if 1 <= v <= size)
    if len(values) <= _CANDIDATES:
        return values
    picks = np.unique(np.geomspace(1, len(values), _CANDIDATES).astype(int) - 1)
    return sorted({values[0], values[-1], *(values[int(i)] for i in picks)})


def _max_unit(bounds: IntArray) -> int:
    return int(np.diff(bounds).max()) if bounds.size > 1 else 0


@dataclass(frozen=True)
class _Option:
    """One intermediate chunk length along one dimension and the units it makes."""

    length: int
    unit1: int  # longest stage-1 unit (source grid with the intermediate grid)
    touched1: int  # source elements it touches
    unit2: int  # longest stage-2 unit (intermediate grid with the write grid)


def _options(axis: AxisMap, write: int) -> list[_Option]:
    source = int(np.diff(axis.source_boundaries).max()) if axis.size else 1
    out = []
    for length in _candidates(axis.size, source, write):
        u1 = unit_boundaries(axis, length)
        touched = axis.touched(u1[:-1], u1[1:])
        u2 = unit_boundaries(AxisMap.uniform(axis.dim, axis.size, length), write)
        out.append(_Option(length, _max_unit(u1), int(touched.max()), _max_unit(u2)))
    return out


def stage_inputs(
    members: Sequence[ArrayInput], chunks: Sequence[int]
) -> tuple[list[ArrayInput], list[ArrayInput]]:
    """The planner's inputs of stage 1 (source → intermediate ``chunks``) and stage 2
    (intermediate → the members' write grid).

    Stage 2 reads the intermediate store through zarr: chunks ``chunks`` in target index space,
    stored items of the target's size, sized by the general memory model (no fast path).
    """
    first = [replace(a, write_chunks=tuple(chunks)) for a in members]
    second = [
        replace(
            a,
            axes=tuple(
                AxisMap.uniform(ax.dim, ax.size, c) for ax, c in zip(a.axes, chunks, strict=True)
            ),
            read_itemsize=a.itemsize,
            fixed_touched=1,
            fast=False,
        )
        for a in members
    ]
    return first, second


def choose_intermediate(members: Sequence[ArrayInput], limits: Limits) -> tuple[int, ...] | None:
    """Intermediate chunks for one group, or None when no choice fits both stages.

    Among lengths per dimension whose stage units (whole in both grids of a stage) fit the
    memory budget on both sides, the largest chunk up to :data:`INTERMEDIATE_CHUNK_CAP`, then the
    smallest stage units; ties go to the first in order (deterministic).
    """
    lead = members[0]
    options = [_options(ax, w) for ax, w in zip(lead.axes, lead.write_chunks, strict=True)]
    best: tuple[tuple[int, int], tuple[int, ...]] | None = None
    itemsize = max(a.itemsize for a in members)
    for combo in itertools.product(*options):
        chunks = tuple(o.length for o in combo)
        lengths1 = [o.unit1 for o in combo]
        lengths2 = [o.unit2 for o in combo]
        touched = math.prod(o.touched1 for o in combo)
        # Stage 1 writes the intermediate grid: the fast path's slabs and encoders follow it.
        mem1 = max(int(replace(a, write_chunks=chunks).memory(touched, lengths1)) for a in members)
        if mem1 > limits.memory_budget:
            continue
        region2 = math.prod(lengths2)
        mem2 = int(job_memory(region2, region2, itemsize, itemsize))
        if mem2 > limits.memory_budget:
            continue
        size = min(math.prod(chunks) * itemsize, INTERMEDIATE_CHUNK_CAP)
        key = (-size, math.prod(lengths1) + region2)
        if best is None or key < best[0]:
            best = (key, chunks)
    return best[1] if best is not None else None


def plan_staged(
    arrays: Sequence[ArrayInput], limits: Limits, request_digest: str = ""
) -> tuple[Plan, dict[str, tuple[int, ...]]] | None:
    """A two-stage plan of ``arrays``, and the intermediate chunks per variable; None when the
    intermediate cannot keep both stages within the budget.

    The returned plan's jobs are stage 2's (the target's writes); ``Plan.stages`` holds stage 1.
    Its read figures are the source's (read amplification keeps meaning source re-reads); the
    intermediate's bytes are in :attr:`Plan.intermediate_bytes`.
    """
    groups: dict[str, list[ArrayInput]] = {}
    for arr in sorted(arrays, key=lambda a: a.name):
        groups.setdefault(arr.signature(), []).append(arr)
    chunks: dict[str, tuple[int, ...]] = {}
    first: list[ArrayInput] = []
    second: list[ArrayInput] = []
    for members in groups.values():
        if not members[0].axes:
            return None
        picked = choose_intermediate(members, limits)
        if picked is None:
            return None
        s1, s2 = stage_inputs(members, picked)
        first += s1
        second += s2
        chunks.update({a.name: picked for a in members})
    try:
        stage1 = plan_jobs(first, limits, fingerprint(request_digest, "stage-1"))
        stage2 = plan_jobs(second, limits, fingerprint(request_digest, "stage-2"))
    except PlanError:
        return None
    if max(stage1.read_amplification, stage2.read_amplification) > 1.0 + 1e-9:
        # The unit bounds allowed it, the full cost model did not (e.g. the time budget):
        # a stage would re-read, which is not what an intermediate store is for.
        return None
    digest = fingerprint(stage1.fingerprint, stage2.fingerprint, canonical_json(chunks))
    rows = sorted((name, list(c)) for name, c in chunks.items())
    plan = replace(
        stage2,
        read_bytes=stage1.read_bytes,
        needed_bytes=stage1.needed_bytes,
        fingerprint=digest,
        content_fingerprint=content_fingerprint(arrays, request_digest),
        strategy="staged",
        stages=(Stage(stage1, tuple((n, tuple(c)) for n, c in rows)),),
        notes=tuple(stage1.notes) + tuple(stage2.notes),
    )
    return plan, chunks
