"""Target chunk shapes that make a cheaper plan (docs/design.md §3.5, "Recommend").

When a target cuts every source chunk (maps read into time series), the plan a request gets
either re-reads the source or writes and reads an intermediate store: about twice the bytes
through storage of a plan that reads each source chunk once. A shorter target chunk along one
dimension can make the *units* (blocks whole in both the source and the write grid) small enough
for one job, and then a direct plan reads each source chunk once, with no intermediate.
:func:`cheaper_shapes` finds, per dimension, the longest such chunk length and keeps it when the
planner's own cost model (:func:`~zarr_parallel.planning.strategy.plan_cost`) says its plan is
clearly cheaper (:func:`clearly_cheaper`). Pure arithmetic: at most one plan per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.grid import AxisMap, unit_boundaries
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import Plan
from zarr_parallel.planning.strategy import choose_plan, plan_cost

#: A suggested shape's plan must move at most 1/CHEAPER_BY of the requested plan's modelled bytes,
#: or re-read the source at most 1/CHEAPER_BY as often: smaller gains are not worth a different
#: chunk shape than the one asked for.
CHEAPER_BY = 1.5


@dataclass(frozen=True)
class ShapeOption:
    """One suggested target chunk length and the plan it makes.

    ``dim`` is the dimension whose chunk length changes from ``asked`` to ``length`` (the
    other dimensions keep theirs), ``source`` the source chunk length along it, ``plan`` the
    plan the planner makes with it and ``cost`` that plan's modelled bytes through storage.
    """

    dim: str
    length: int
    asked: int
    source: int
    plan: Plan
    cost: int


def clearly_cheaper(alt: Plan, current: Plan) -> bool:
    """True when ``alt`` re-reads the source no more than ``current`` and moves at most
    1/:data:`CHEAPER_BY` of its modelled bytes, or re-reads at most 1/:data:`CHEAPER_BY` as
    often."""
    if alt.read_amplification > current.read_amplification + 1e-9:
        return False
    fewer_bytes = plan_cost(current) >= CHEAPER_BY * plan_cost(alt)
    fewer_reads = current.read_amplification >= CHEAPER_BY * alt.read_amplification
    return fewer_bytes or fewer_reads


def smooth_numbers(below: int) -> list[int]:
    """The numbers ``2**a * 3**b`` below ``below``, ascending: chunk lengths people pick
    (24 and 48 steps, 72 or 144 rows), and few of them (a few dozen below a million).

    >>> smooth_numbers(30)
    [1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 27]
    """
    out = []
    power3 = 1
    while power3 < below:
        n = power3
        while n < below:
            out.append(n)
            n *= 2
        power3 *= 3
    return sorted(out)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def length_candidates(size: int, asked: int, source: int) -> list[int]:
    """Chunk lengths shorter than ``asked`` worth trying along one dimension, ascending.

    Whole numbers of source chunks (``source`` times a :func:`smooth_numbers` number) and the
    divisors of ``asked`` among them; where ``asked`` is below the source chunk, the divisors of
    the source chunk (a unit is then one source chunk, not a common multiple).

    >>> length_candidates(96, 96, 1)[-4:]
    [54, 64, 72, 81]
    >>> length_candidates(91, 8, 91)
    [1, 7]
    """
    asked = min(asked, size)
    found = {d for d in _divisors(max(1, source)) if d < asked}
    if asked > source:
        found.update(source * m for m in smooth_numbers(-(-asked // source)))
        found.update(d for d in _divisors(asked) if d % source == 0)
    return sorted(v for v in found if 1 <= v < asked)


def _axis_unit(axis_map: AxisMap, chunk: int) -> tuple[int, int]:
    """Longest unit along an axis with this write chunk, and the most source elements a unit
    touches along it (both upper bounds, as the planner's memory bounds are)."""
    bounds = unit_boundaries(axis_map, chunk)
    if bounds.size < 2:
        return 0, 0
    touched = axis_map.touched(bounds[:-1], bounds[1:])
    return int(np.diff(bounds).max()), int(touched.max())


def _unit_fits(members: Sequence[ArrayInput], dim: str, length: int, budget: int) -> bool:
    """Whether a unit of every member, with write chunks ``length`` along ``dim``, fits."""
    for arr in members:
        chunks = tuple(
            length if ax.dim == dim else int(c)
            for ax, c in zip(arr.axes, arr.write_chunks, strict=True)
        )
        units = [_axis_unit(ax, c) for ax, c in zip(arr.axes, chunks, strict=True)]
        touched = math.prod(t for _, t in units)
        lengths = [n for n, _ in units]
        if int(replace(arr, write_chunks=chunks).memory(touched, lengths)) > budget:
            return False
    return True


def _longest_fitting(
    members: Sequence[ArrayInput], dim: str, candidates: Sequence[int], budget: int
) -> int | None:
    """The longest candidate whose units fit, by bisection (shorter chunks make shorter units;
    a handful of checks even for a dimension of a million steps)."""
    lo, hi = 0, len(candidates)
    best: int | None = None
    while lo < hi:
        mid = (lo + hi) // 2
        if _unit_fits(members, dim, candidates[mid], budget):
            best = candidates[mid]
            lo = mid + 1
        else:
            hi = mid
    return best


def _dims(arrays: Sequence[ArrayInput]) -> list[str]:
    out: list[str] = []
    for arr in arrays:
        out += [d for d in arr.dims if d not in out]
    return out


def _with_length(arrays: Sequence[ArrayInput], dim: str, length: int) -> list[ArrayInput]:
    return [
        replace(
            a,
            write_chunks=tuple(
                length if ax.dim == dim else c for ax, c in zip(a.axes, a.write_chunks, strict=True)
            ),
        )
        for a in arrays
    ]


def cheaper_shapes(
    arrays: Sequence[ArrayInput],
    limits: Limits,
    current: Plan,
    request_digest: str = "",
    allow_staged: bool = True,
) -> list[ShapeOption]:
    """Target chunk lengths, one dimension at a time, whose plans are clearly cheaper than
    ``current`` (:func:`clearly_cheaper`), cheapest first.

    Along each dimension the longest shorter length (:func:`length_candidates`) whose units fit
    the memory budget is planned with :func:`~zarr_parallel.planning.strategy.choose_plan`; the
    region written is the same (only the write grid changes).

    Parameters
    ----------
    arrays, limits, request_digest, allow_staged
        As :func:`~zarr_parallel.planning.strategy.choose_plan` was given for ``current``; the
        ``write_chunks`` are the target chunks (not shards: a sharded target is not reshaped).
    current
        The plan of the request as asked.
    """
    out: list[ShapeOption] = []
    for dim in _dims(arrays):
        members = [a for a in arrays if dim in a.dims]
        axes = [a.axes[a.dims.index(dim)] for a in members]
        asked = max(int(a.write_chunks[a.dims.index(dim)]) for a in members)
        size = max(ax.size for ax in axes)
        source = max(int(ax.chunk_len.max()) if ax.chunk_len.size else 1 for ax in axes)
        candidates = length_candidates(size, asked, source)
        length = _longest_fitting(members, dim, candidates, limits.memory_budget)
        if length is None:
            continue
        try:
            plan = choose_plan(
                _with_length(arrays, dim, length), limits, request_digest, allow_staged
            )
        except PlanError:
            continue
        if clearly_cheaper(plan, current):
            out.append(ShapeOption(dim, length, asked, source, plan, plan_cost(plan)))
    out.sort(key=lambda o: (o.cost, round(o.plan.read_amplification, 4), o.asked - o.length))
    return out
