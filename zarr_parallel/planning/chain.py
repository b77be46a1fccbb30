"""Chains of intermediate chunk shapes, for staged plans of more than two stages (docs/design.md
§3.4, "Strategies").

rechunker's multi-stage algorithm (``multistage_rechunking_plan``; cubed plans regular Zarr chunks
the same way): when no single intermediate keeps both of its stages within the memory limit with
chunks worth writing, the chunk shape moves from the source's chunks to the target's in ``k``
geometric steps, one intermediate store per step, and ``k`` grows until every stage fits. The
intermediates then stay near the geometric mean of the two ends, however tight the memory.

Along each dimension every step is a multiple of the step before it on the smaller end's side
(and, where one lies near, a divisor of the far end), so that neighbouring grids nest: a stage's
unit (whole in its read and its write grid) is then the larger of its two chunks, not their least
common multiple. Pure arithmetic; :mod:`zarr_parallel.planning.staged` plans and checks the stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput

#: A step nests with the far end only if it lies within this factor of its geometric goal;
#: otherwise the nearest multiple is taken (the planner sizes the larger units that follow).
_NEST_SLACK = 2.0


def source_length(axis: AxisMap) -> int:
    """The longest source chunk along ``axis``, in target index space (at least 1).

    >>> source_length(AxisMap.uniform("t", 10, 4))
    4
    """
    return max(1, int(np.diff(axis.source_boundaries).max())) if axis.size else 1


def _snap(previous: int, goal: float, far: int, size: int) -> int:
    """The step after ``previous`` nearest ``goal``: a multiple of ``previous`` up to the far end
    ``far`` (or the whole axis when the far end is), preferring one that divides ``far`` when
    such a one lies near the goal. Never beyond ``far``: the steps move one way.

    >>> _snap(1, 4.6, 96, 96), _snap(4, 21.0, 96, 96)
    (4, 24)
    >>> _snap(8, 17.8, 91, 91)  # no multiple of 8 divides 91: the nearest multiple
    16
    >>> _snap(5, 7.4, 9, 20)  # 10 would pass the far end
    5
    """
    options = [previous * m for m in range(1, far // previous + 1)]
    if far >= size:
        options.append(size)

    def distance(v: int) -> float:
        return abs(math.log(v / goal))

    near = math.log(_NEST_SLACK)
    nesting = [v for v in options if (v >= size or far % v == 0) and distance(v) <= near]
    return min(nesting or options, key=lambda v: (distance(v), v))


def step_lengths(size: int, source: int, write: int, stages: int) -> list[int]:
    """Chunk lengths along one dimension of the ``stages - 1`` intermediates, source side first.

    Geometric steps from the shorter end to the longer, each a multiple of the one before.

    >>> step_lengths(96, 1, 96, 3)
    [4, 24]
    >>> step_lengths(91, 91, 8, 3)  # the source side is the longer end: steps run down
    [48, 16]
    >>> step_lengths(10, 5, 5, 4)
    [5, 5, 5]
    """
    source, write = min(source, size), min(write, size)
    lo, hi = min(source, write), max(source, write)
    steps: list[int] = []
    previous = lo
    for i in range(1, stages):
        goal = lo * (hi / lo) ** (i / stages)
        previous = _snap(previous, goal, hi, size)
        steps.append(previous)
    return steps if source <= write else steps[::-1]


def chain_chunks(members: Sequence[ArrayInput], stages: int) -> list[tuple[int, ...]]:
    """The intermediate chunk shapes of a ``stages``-stage plan of one group, source side first.

    >>> axes = (AxisMap.uniform("t", 96, 1), AxisMap.uniform("y", 91, 91))
    >>> chain_chunks([ArrayInput("v", axes, (96, 8), 4, 4)], 3)
    [(4, 48), (24, 16)]
    """
    lead = members[0]
    per_dim = [
        step_lengths(ax.size, source_length(ax), w, stages)
        for ax, w in zip(lead.axes, lead.write_chunks, strict=True)
    ]
    return [tuple(d[j] for d in per_dim) for j in range(stages - 1)]
