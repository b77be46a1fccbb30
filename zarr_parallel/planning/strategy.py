"""Choosing how to write a target by modelled cost: direct, streaming or staged (docs/design.md
§3.4, "Strategies").

Bytes moved through storage dominate on shared file systems, so the cost of a plan is the bytes
it reads (source and intermediate) plus the bytes it writes (intermediate and target). A direct
plan that reads every source chunk once is never beaten; one that re-reads is compared with a
staged plan through an intermediate store (:mod:`zarr_parallel.planning.staged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import Plan, plan_jobs
from zarr_parallel.planning.staged import plan_staged
from zarr_parallel.units import format_bytes

#: A direct plan reading up to this many times the source it needs is kept without trying a
#: staged one: an intermediate store costs a full write and read of the data itself.
STAGE_ABOVE = 2.0


def plan_cost(plan: Plan) -> int:
    """Modelled bytes through storage: everything read and written, intermediates included.

    A staged plan reads the source (its ``read_bytes``), writes the intermediate once and reads
    it in its last stage's jobs, then writes the target.
    """
    intermediate_read = sum(j.read_bytes for j in plan.jobs) if plan.stages else 0
    return plan.read_bytes + plan.intermediate_bytes + intermediate_read + plan.write_bytes


def _label(plan: Plan, arrays: Sequence[ArrayInput]) -> Plan:
    amp = plan.read_amplification
    if amp <= 1.0 + 1e-9:
        return replace(plan, strategy="direct", strategy_reason="every source chunk is read once")
    if all(a.fast for a in arrays):
        return replace(
            plan,
            strategy="streaming",
            strategy_reason=(
                f"jobs hold their target region and stream the source chunks through it, "
                f"reading the source {amp:.2f}x"
            ),
        )
    return replace(
        plan,
        strategy="direct",
        strategy_reason=f"jobs hold the source chunks they touch, reading the source {amp:.2f}x",
    )


def choose_plan(
    arrays: Sequence[ArrayInput],
    limits: Limits,
    request_digest: str = "",
    allow_staged: bool = True,
) -> Plan:
    """The cheapest plan of ``arrays`` within ``limits`` (:func:`plan_cost`).

    Parameters
    ----------
    arrays, limits, request_digest
        As :func:`~zarr_parallel.planning.plan.plan_jobs`.
    allow_staged
        Whether an intermediate store may be used (not for tiled targets or appends).

    Raises
    ------
    PlanError
        When neither a direct nor a staged plan fits the budget (the direct plan's error).
    """
    try:
        direct: Plan | None = _label(plan_jobs(arrays, limits, request_digest), arrays)
        error: PlanError | None = None
    except PlanError as e:
        direct, error = None, e
    if not allow_staged or (direct is not None and direct.read_amplification <= STAGE_ABOVE):
        if direct is None:
            raise error  # type: ignore[misc]
        return direct
    staged = plan_staged(arrays, limits, request_digest)
    if staged is None:
        if direct is None:
            raise error  # type: ignore[misc]
        return direct
    plan, _ = staged
    if direct is not None and plan_cost(direct) <= plan_cost(plan):
        return direct
    if direct is None:
        why = "a direct plan does not fit the memory limit"
    else:
        why = (
            f"a direct plan would read the source {direct.read_amplification:.1f}x "
            f"({format_bytes(plan_cost(direct))} through storage, against "
            f"{format_bytes(plan_cost(plan))} staged)"
        )
    reason = (
        f"{why}; an intermediate store of {format_bytes(plan.intermediate_bytes)} lets stage 1 "
        "read each source chunk once and stage 2 each intermediate chunk once"
    )
    return replace(plan, strategy_reason=reason)
