"""The phases of a deployment run, measured by the flow itself (docs/design.md §2b, Start-up).

A command's wall time counts from its process's start (:mod:`zarr_parallel.run.phases`). A run
of a deployment has no command: a Prefect worker took it and started a process for it. Its clock
starts when the worker took the run, the flow run's latest *Pending* state as Prefect records it
(the worker sets it just before it starts the run's process). So in a deployment run:

- **start-up** is from then to planning: the flow run's process starting, its imports (Prefect
  and the stack), loading the flow, checking the operator's policy and waiting for the cache's
  slot behind other runs of the same cache;
- the time the run waited *Scheduled* for a worker is not in the wall time: it is reported as
  ``queued_seconds``, from the run's expected start time;
- **teardown** ends when the flow function returns (Prefect's last state report and the process's
  exit come after it).

Without a Pending state (a run started otherwise) the clock starts at the process's start. The
summary gets ``seconds``, ``phases`` and ``timeline`` like a command's, the flow's log one line
with them, and the ``zp-summary-<cache>`` markdown artifact shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext

from zarr_parallel.orchestration.control import in_deployment_run
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.run.phases import (
    PHASES,
    PhaseClock,
    clock_figures,
    cluster_text,
    current_clock,
    phases_text,
    process_start,
    timing,
)
from zarr_parallel.units import format_bytes

#: What a deployment run's start-up counts, said in its summary.
START_UP = (
    "from the worker taking the run (its Pending state) to planning: the run's process "
    "start, imports, loading the flow, the policy check and the wait for the cache's slot"
)

#: Puts the run's figures in its summary (a final state, e.g. cancelled, passes unchanged).
Report = Callable[[dict[str, Any]], dict[str, Any]]


@contextmanager
def deployment_phases() -> Iterator[Report]:
    """Time a deployment run's phases; yields ``report(summary)``, which puts the figures in
    the flow's summary, logs them and publishes the summary artifact.

    Outside a deployment run, or when a door's clock times the run already (an ad hoc run, or
    the cache flow inside a re-cache run), nothing is timed and ``report`` returns its argument.
    """
    if current_clock() is not None or not in_deployment_run():
        yield _unchanged
        return
    origin, queued = run_taken()
    clock = PhaseClock(origin)

    def report(summary: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(summary, dict):  # a final state (cancelled, awaiting a decision)
            return summary
        clock_figures(clock, summary)
        summary["start_up_from"] = START_UP
        if queued is not None:
            summary["queued_seconds"] = round(queued, 3)
        get_run_logger().info(
            "wall time %.1f s since a worker took the run (%s)%s",
            summary["seconds"],
            phases_text(summary["phases"]),
            f"; queued {queued:.1f} s before" if queued is not None else "",
        )
        create_markdown_artifact(
            summary_markdown(summary),
            key=artifact_key("zp-summary", Path(str(summary["cache"]))),
            description="Run summary: wall time and phases",
        )
        return summary

    with timing(clock):
        yield report


def _unchanged(summary: dict[str, Any]) -> dict[str, Any]:
    return summary


def run_taken() -> tuple[float, float | None]:
    """When a worker took this flow run (epoch seconds), and how long it was queued before.

    The latest Pending state of the flow run (a resumed run is taken again); the process's start
    when Prefect has none or cannot be asked.
    """
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        return process_start(), None
    try:
        with get_client(sync_client=True) as client:
            states = client.read_flow_run_states(run.id)
    except Exception:  # the API did not answer: the process's start is the next best thing
        return process_start(), None
    pending = [s.timestamp.timestamp() for s in states if s.type == StateType.PENDING]
    if not pending:
        return process_start(), None
    taken = min(max(pending), time.time())
    expected = run.expected_start_time
    queued = max(0.0, taken - expected.timestamp()) if expected is not None else None
    return taken, queued


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary artifact of a deployment run: outcome, wall time and its phases."""
    rows = [
        ("status", summary.get("status")),
        ("cache", f"`{summary.get('cache')}`"),
        (
            "jobs",
            f"{summary.get('jobs_run', 0)} run, {summary.get('jobs_skipped', 0)} skipped, "
            f"{summary.get('jobs', 0)} planned",
        ),
        ("written", format_bytes(int(summary.get("bytes_written") or 0))),
        ("wall time", f"{summary['seconds']:.1f} s"),
        *[(name, f"{summary['phases'][name]:.1f} s") for name in PHASES],
    ]
    if summary.get("queued_seconds") is not None:
        rows.append(("queued before a worker took it", f"{summary['queued_seconds']:.1f} s"))
    if summary.get("deploy_mode"):
        reason = summary.get("deploy_mode_reason")
        auto = f" (auto: {reason})" if reason else ""
        rows.append(("deploy mode", f"{summary['deploy_mode']}{auto}"))
    cluster = cluster_text(summary)
    if cluster:
        rows.append(("cluster start", cluster))
    recache = summary.get("recache")
    if recache:
        rows.append(("re-cache", f"{recache['action']}: {recache['reason']}"))
    lines = [
        f"# Run summary: {summary.get('status')}",
        "",
        "| figure | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        f"Start-up counts {START_UP}. The wall time ends when the flow function returns.",
    ]
    return "\n".join(lines)


__all__ = ["START_UP", "deployment_phases", "run_taken", "summary_markdown"]
