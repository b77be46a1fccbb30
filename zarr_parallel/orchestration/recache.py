"""The re-cache flow. Its command line (``zarr-parallel recache REQUEST.yaml``, ``python -m
flows.recache``) is :mod:`zarr_parallel.orchestration.recache_command`.

Keeps a published cache current with its source doing the least work
(:mod:`zarr_parallel.run.recache_decision`): *up to date* → no writes; *append* → only the new
region is written into a copy-on-write new version; *full* → the cache flow runs (new version,
published atomically). The decision and its reason are published as the ``zp-recache-<cache>``
artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.cache import cache_flow, run_cache_steps
from zarr_parallel.orchestration.control import cache_slot, checked_request, deployment_policy
from zarr_parallel.orchestration.halt import awaiting_decision
from zarr_parallel.orchestration.heartbeat import flow_heartbeat
from zarr_parallel.orchestration.run_phases import deployment_phases
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.chunk_reuse import AppendNotPossible, link_unchanged
from zarr_parallel.run.phases import enter_phase
from zarr_parallel.run.policy import enforced
from zarr_parallel.run.recache_decision import AppendPrepared, decide
from zarr_parallel.run.recache_outcome import Decision
from zarr_parallel.run.steps import run_lock


@task(name="decide", cache_policy=NO_CACHE)
def decide_task(
    request: CacheRequest, allow_append: bool = True
) -> tuple[Decision, AppendPrepared | None]:
    """Compare the source with the published cache: up to date, append or full (no writes)."""
    return decide(request, allow_append)


@task(name="link-unchanged-chunks", cache_policy=NO_CACHE)
def link_task(prepared: AppendPrepared) -> dict[str, Any]:
    """Hard-link the unchanged chunk files of the published version into the new one."""
    return link_unchanged(prepared).to_json()


@flow(name="zarr-parallel-recache", log_prints=False)
def recache_flow(
    request: CacheRequest, allow_append: bool = True, check_only: bool = False
) -> dict[str, Any]:
    """Bring a cache up to date with its source: no writes, an append, or a full re-cache.

    Args:
        request: The cache to keep current (the same request model as the cache flow).
        allow_append: Append new steps when the source only grew; False re-caches in full.
        check_only: Only decide and report what a run would do; write nothing.
    """
    started = time.time()
    set_log_level(request.log_level)  # deployments run the flow in a worker process
    # A deployment run times its own phases (an ad hoc run's door does).
    with deployment_phases() as report, flow_heartbeat():
        policy = deployment_policy()
        request = checked_request(request, policy)
        with enforced(policy):
            summary = _recache(request, allow_append, check_only, started)
        return report(summary)


def _recache(
    request: CacheRequest, allow_append: bool, check_only: bool, started: float
) -> dict[str, Any]:
    """The re-cache flow's steps, on a checked request."""
    logger = get_run_logger()
    # The decision and an append happen under the cache's slot and lock, as a cache run's steps
    # do; a full re-cache is the cache flow, which takes them itself.
    with cache_slot(request), run_lock(request):
        enter_phase("planning")  # the phases of the summary and of the progress (run/phases.py)
        decision, prepared = decide_task(request, allow_append)
        _publish_decision(decision)
        logger.info("re-cache: %s: %s", decision.action, decision.reason)
        if check_only or decision.action == "up_to_date":
            enter_phase("finish")
            return _report(decision, started, check_only)
        if decision.action == "append":
            assert prepared is not None
            try:
                summary = _append(prepared)
            except AppendNotPossible as e:
                decision = Decision(
                    "full",
                    f"the append was abandoned ({e}); re-caching in full",
                    decision.cache,
                    base_version=decision.base_version,
                )
                _publish_decision(decision)
                logger.warning("%s", decision.reason)
            else:
                return {**summary, "status": "appended", "recache": decision.to_json()}
    # A full re-cache is the cache flow itself (it takes the slot again, checks the policy
    # again, pauses on recommendations in deployment runs, and publishes a new version
    # atomically).
    try:
        summary = cache_flow(request)
    except RecommendationsPending as e:
        # The cache flow ended in AwaitingDecision (an ad hoc run): so does this run.
        return awaiting_decision(request, e)  # type: ignore[return-value]
    return {**summary, "recache": decision.to_json()}


def _append(prepared: AppendPrepared) -> dict[str, Any]:
    """The cache flow's steps with the append's plan; unchanged chunks are reused first."""
    reused: dict[str, Any] = {}

    def reuse(p: Any) -> None:
        reused.update(link_task(p))

    summary = run_cache_steps(prepared.request, prepared=prepared, after_initialise=reuse)
    return {**summary, "reused_chunks": reused}


def _report(decision: Decision, started: float, check_only: bool) -> dict[str, Any]:
    status = {
        "up_to_date": "up to date",
        "append": "would append",
        "full": "would re-cache in full",
    }[decision.action]
    return {
        "status": status,
        "cache": decision.cache,
        "version": decision.base_version,
        "jobs": 0,
        "jobs_run": 0,
        "jobs_skipped": 0,
        "read_amplification": 1.0,
        "max_job_memory": 0,  # format_summary prints it: without it the CLI ended in a KeyError
        "bytes_written": 0,
        "seconds": round(time.time() - started, 3),
        "check_only": check_only,
        "recache": decision.to_json(),
    }


def _publish_decision(decision: Decision) -> None:
    create_markdown_artifact(
        decision.markdown(),
        key=artifact_key("zp-recache", Path(decision.cache)),
        description=f"Re-cache decision: {decision.action}",
    )
