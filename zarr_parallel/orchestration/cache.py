"""The cache flow. Its command line (``python -m flows.cache [run|plan|verify] REQUEST.yaml``)
is :mod:`zarr_parallel.orchestration.command`.

One orchestration path: validate → plan → initialise → map writes → finish → report. The Python
API, the CLI and the Prefect deployments all run :func:`cache_flow`; an ad hoc run may answer an
up-to-date cache before it (:mod:`zarr_parallel.orchestration.adhoc`, docs/design.md §2b).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.cluster import cluster_in_background, register_warm
from zarr_parallel.orchestration.control import (
    cache_slot,
    checked_request,
    decide_on_recommendations,
    deployment_policy,
    in_deployment_run,
    without_flow_heartbeat,
)
from zarr_parallel.orchestration.early_cluster import take_started
from zarr_parallel.orchestration.halt import awaiting_decision, publish_recommendations
from zarr_parallel.orchestration.heartbeat import flow_heartbeat
from zarr_parallel.orchestration.plan_report import publish_plan_picture
from zarr_parallel.orchestration.run_phases import deployment_phases
from zarr_parallel.orchestration.runners import (
    current_api_url,
    make_task_runner,
    worker_settings,
    worker_sizing,
)
from zarr_parallel.orchestration.tasks import artifact_key, finish_task, initialise_task, plan_task
from zarr_parallel.orchestration.write_flow import group_jobs, write_stages
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.phases import enter_phase
from zarr_parallel.run.policy import enforced
from zarr_parallel.run.recommend import Recommendation, recommendations_markdown
from zarr_parallel.run.stages import strategy_lines
from zarr_parallel.run.steps import Prepared, run_lock
from zarr_parallel.store.paths import resolve_paths
from zarr_parallel.units import format_bytes

__all__ = ["cache_flow", "run_cache_steps"]


@flow(name="zarr-parallel-cache", log_prints=False)
def cache_flow(request: CacheRequest) -> dict[str, Any]:
    """Cache a source dataset into Zarr as the request says, and return the run summary.

    In a deployment run a plan that halts on recommendations pauses until someone decides in the UI
    (apply / proceed / cancel), and runs on one cache target queue behind each other
    (:mod:`zarr_parallel.orchestration.control`); ad hoc runs raise :class:`RecommendationsPending`
    instead.

    Args:
        request: What to cache and how (the request model of the Python API and the CLI).
    """
    set_log_level(request.log_level)  # deployments run the flow in a worker process
    # A deployment run times its own phases (an ad hoc run's door does).
    with deployment_phases() as report, flow_heartbeat():
        policy = deployment_policy()
        request = checked_request(request, policy)
        with enforced(policy):
            summary = _cache_until_decided(request)
        return report(summary)


def _cache_until_decided(request: CacheRequest) -> dict[str, Any]:
    """Run the cache steps; when they halt on recommendations, decide and plan again."""
    applied: Recommendation | None = None
    while True:
        try:
            # Deployment runs queue for the cache's slot; then the lock (taken before planning,
            # held until publish; a dead run's lock is broken, see zarr_parallel.store.lock) keeps
            # any other writer out. A pause for a decision happens outside both.
            with cache_slot(request), run_lock(request):
                summary = run_cache_steps(request)
        except RecommendationsPending as e:
            if not in_deployment_run():
                # Ad hoc: end in AwaitingDecision (one log line, no traceback); the caller
                # still gets the exception (exit 3 at the command line).
                return awaiting_decision(request, e)  # type: ignore[return-value]
            publish_recommendations(resolve_paths(request).final, e)
            outcome = decide_on_recommendations(request, e)
            if isinstance(outcome, State):
                # Cancelled in the UI: returning the state makes it the run's final state.
                return outcome  # type: ignore[return-value]
            request, applied = outcome
            continue
        if applied is not None:
            summary["applied_recommendation"] = applied.to_json()
        return summary


def run_cache_steps(
    request: CacheRequest,
    prepared: Prepared | None = None,
    after_initialise: Callable[[Prepared], Any] | None = None,
) -> dict[str, Any]:
    """One pass of the cache run's steps, inside the flow run: plan, initialise, write, finish.

    The re-cache flow (:mod:`zarr_parallel.orchestration.recache`) runs the same steps with its own
    ``prepared`` (an append's plan) and reuses the unchanged chunks ``after_initialise``.

    Parameters
    ----------
    request
        The checked request.
    prepared
        A plan made already (the re-cache flow's append); None plans ``request`` here.
    after_initialise
        Called with the prepared run once the store is initialised, before any write.

    Returns
    -------
    dict
        The run summary (:func:`zarr_parallel.run.finish.finish`), with the deploy mode, the
        workers and the per-job results when jobs ran.
    """
    logger = get_run_logger()
    started = time.time()
    enter_phase("planning")  # the phases of the summary and of the progress (run/phases.py)
    if prepared is None:
        planned = plan_task(request)
        if isinstance(planned, RecommendationsPending):
            raise planned  # decided by the flow (_cache_until_decided)
        prepared = planned
    _publish_plan(prepared)
    logger.info(
        "plan: %d jobs, read amplification %.2f, largest job %s (budget %s), %s",
        len(prepared.plan.jobs),
        prepared.plan.read_amplification,
        format_bytes(prepared.plan.max_job_memory),
        format_bytes(prepared.plan.memory_budget),
        prepared.status,
    )
    if prepared.mode_reason:
        logger.info("deploy_mode auto: %s (%s)", prepared.request.deploy_mode, prepared.mode_reason)
    if prepared.status == "up_to_date":
        enter_phase("finish")
        summary = finish_task(prepared, [], started)
        enter_phase("teardown")
        return summary
    req = prepared.request
    sizing = worker_sizing(req, prepared.plan.peak_job_memory, len(prepared.todo))
    enter_phase("initialise")
    api_url = current_api_url()
    # The cluster starts (worker processes import the stack) while the store is initialised,
    # unless it started during the door's planning (orchestration/early_cluster.py).
    ahead = take_started(req, sizing, api_url)
    with cluster_in_background(req, prepared.version, sizing, api_url, ahead) as get_cluster:
        initialise_task(prepared)
        if after_initialise is not None:
            after_initialise(prepared)
        groups = group_jobs(prepared.todo)
        cluster = get_cluster()
        first = prepared.first_write()
        if cluster.cluster is not None and cluster.address and first is not None:
            # The workers' job processes ready the plan while the first tasks are sent.
            register_warm(cluster.address, *first)
        logger.info(
            "%s: %d write jobs in %d tasks on %d workers of %s each (ready in %.1f s)",
            req.deploy_mode,
            len(prepared.todo),
            len(groups),
            cluster.concurrency,
            format_bytes(sizing.memory),
            cluster.ready_seconds,
        )
        with worker_settings(api_url), without_flow_heartbeat():
            runner = make_task_runner(cluster.mode, cluster.address)
            results = write_stages(prepared, runner, cluster.address)
        enter_phase("finish")
        summary = finish_task(prepared, results, started)
        enter_phase("teardown")  # closing the cluster is teardown
    summary.update(
        deploy_mode=req.deploy_mode,
        deploy_mode_reason=prepared.mode_reason,
        workers=cluster.concurrency,
        write_tasks=len(groups),
        worker_memory=sizing.memory,
        cluster_ready_seconds=round(cluster.ready_seconds, 3),
        cluster_started=cluster.started if cluster.mode != "series" else None,
        job_results=results,
    )
    return summary


def _publish_plan(prepared: Prepared) -> None:
    plan = prepared.plan
    rows = [
        {"figure": k, "value": v}
        for k, v in {
            "status": prepared.status,
            "jobs": len(plan.jobs),
            "jobs to run": len(prepared.todo),
            "read amplification": f"{plan.read_amplification:.2f}",
            "largest job estimate": format_bytes(plan.peak_job_memory),
            "memory budget per job": format_bytes(plan.memory_budget),
            "source bytes read": format_bytes(plan.read_bytes),
            "bytes written": format_bytes(plan.write_bytes),
            "fingerprint": plan.fingerprint[:12],
            "cache": str(prepared.paths.final),
            "notes": "; ".join(plan.notes) or "-",
            **dict(strategy_lines(plan)),
        }.items()
    ]
    create_table_artifact(rows, key=artifact_key("zp-plan", prepared), description="Cache plan")
    publish_plan_picture(prepared)  # the picture of the plan, inline in the UI
    if prepared.recommendations or prepared.applied:
        text = recommendations_markdown(plan, prepared.recommendations)
        if prepared.applied:
            text = f"Applied: {prepared.applied.sentence}\n\n" + text
        create_markdown_artifact(
            text, key=artifact_key("zp-recommendations", prepared), description="Recommendations"
        )
