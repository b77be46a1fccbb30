"""Recommendations of a cheaper target chunk shape (docs/design.md §3.5, "Recommend").

The pure search is :func:`zarr_parallel.planning.chunk_shapes.cheaper_shapes`; here each shape it
finds becomes a :class:`~zarr_parallel.run.recommend.Recommendation` whose ``changes`` are the
request's ``chunks`` with one length changed, re-planned from the request itself (the figures it
shows are those a run of the changed request gets) and kept only when that plan is clearly
cheaper by the planner's cost model. A staged plan reads each source chunk once, so it never
halts on these (docs/design.md §2b): they are listed beside the plan.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

from zarr_parallel.errors import ZarrParallelError
from zarr_parallel.planning.chunk_shapes import ShapeOption, cheaper_shapes, clearly_cheaper
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import Plan
from zarr_parallel.planning.strategy import plan_cost
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.recommend import Recommendation, Replanner
from zarr_parallel.sources.target import Target
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)


def shape_recommendations(
    req: CacheRequest,
    target: Target,
    arrays: Sequence[ArrayInput],
    limits: Limits,
    plan: Plan,
    replan: Replanner,
) -> list[Recommendation]:
    """Target chunk shapes whose plans are clearly cheaper than ``plan``, best first (as every
    recommendation: lowest read amplification, then least change).

    Parameters
    ----------
    req, target, plan
        The request, its target and its plan as asked.
    arrays, limits
        The planner's inputs and budgets ``plan`` was made from.
    replan
        Plans a changed request (:func:`zarr_parallel.run.steps.make_plan`).

    Sharded and tiled targets are not reshaped (their write grid is not the chunks alone).
    """
    if req.shards or target.tiling is not None or not plan.jobs:
        return []
    base: dict[str, Any] = {} if req.chunks == "auto" else dict(req.chunks)
    out: list[Recommendation] = []
    for option in cheaper_shapes(arrays, limits, plan):
        changes = {"chunks": {**base, option.dim: option.length}}
        try:
            _, alt = replan(req.model_copy(update=copy.deepcopy(changes)))
        except ZarrParallelError as e:
            logger.debug("chunk shape %s rejected: %s", changes, e)
            continue
        if not clearly_cheaper(alt, plan):
            continue
        out.append(
            Recommendation(
                changes,
                alt.read_amplification,
                alt.peak_job_memory,
                _sentence(option, plan, alt),
                keeps_region=True,
                magnitude=option.asked - option.length,
                jobs=len(alt.jobs),
                modelled_bytes=plan_cost(alt),
            )
        )
    out.sort(key=lambda r: (round(r.read_amplification, 4), r.magnitude))
    return out


def _sentence(option: ShapeOption, plan: Plan, alt: Plan) -> str:
    """What the shape is, what it costs a reader of the cache, and what it saves."""
    pieces = math.ceil(option.asked / option.length)
    how = (
        "each source chunk read once, no intermediate store"
        if alt.read_amplification <= 1.0 + 1e-9 and not alt.stages
        else f"a {alt.strategy} plan"
    )
    return (
        f"set chunks['{option.dim}'] to {option.length} ({option.asked} asked: {pieces} chunks "
        f"along {option.dim} where there was 1): {how}, moving {format_bytes(plan_cost(alt))} "
        f"through storage instead of {format_bytes(plan_cost(plan))}: read amplification "
        f"{alt.read_amplification:.2f} (now {plan.read_amplification:.2f}), {len(alt.jobs)} job"
        f"{'s' if len(alt.jobs) != 1 else ''} of at most {alt.peak_job_memory / 1e6:.0f} MB"
    )
