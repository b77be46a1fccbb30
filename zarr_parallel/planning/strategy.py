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
from zarr_parallel.planning.staged import INTERMEDIATE_CHUNK_FLOOR, MAX_STAGES, plan_staged
from zarr_parallel.units import format_bytes

#: A direct plan reading up to this many times the source it needs is kept without trying a
#: staged one: an intermediate store costs a full write and read of the data itself.
STAGE_ABOVE = 2.0


def plan_cost(plan: Plan) -> int:
    """Modelled bytes through storage: everything read and written, intermediates included.

    A staged plan reads the source (its ``read_bytes``), writes each intermediate once and reads
    it once in the next stage's jobs, then writes the target.
    """
    if not plan.stages:
        return plan.read_bytes + plan.write_bytes
    intermediate_read = sum(s.plan.read_bytes for s in plan.stages[1:])
    intermediate_read += sum(j.read_bytes for j in plan.jobs)
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
    plan = plan_staged(arrays, limits, request_digest)
    if plan is None:
        if direct is None:
            raise error  # type: ignore[misc]
        return replace(direct, strategy_reason=f"{direct.strategy_reason}; {NO_STAGES}")
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
    return replace(plan, strategy_reason=f"{why}; {_staged_reason(plan)}")


#: The smallest intermediate chunk, in words.
_FLOOR = (
    f"{INTERMEDIATE_CHUNK_FLOOR / 2**20:g} MiB (or the source's or the target's chunk, if smaller)"
)
#: Why a plan that re-reads the source is kept although staging was tried.
NO_STAGES = (
    f"no staged plan (of up to {MAX_STAGES} stages) keeps every stage within the memory and "
    "time limits reading what it reads once"
)


def _staged_reason(plan: Plan) -> str:
    """What a staged plan's intermediates do, in words (the end of its ``strategy_reason``)."""
    size = format_bytes(plan.intermediate_bytes)
    if len(plan.stages) == 1:
        return (
            f"an intermediate store of {size} lets stage 1 read each source chunk once and "
            "stage 2 each intermediate chunk once"
        )
    n = len(plan.stages) + 1
    return (
        f"{n - 1} intermediate stores ({size} in all) let stage 1 read each source chunk once and "
        f"stages 2-{n} each intermediate chunk once; {n} stages because a single intermediate "
        f"keeping both of its stages within the memory limit would need chunks below {_FLOOR}"
    )
