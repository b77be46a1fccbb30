"""The cache flow and its command line: ``python -m flows.cache [run|plan|verify] REQUEST.yaml``.

One orchestration path: validate → plan → initialise → map writes → finish → report. The Python
API, the CLI and the Prefect deployments all run :func:`cache_flow`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from zarr_parallel.errors import (
    PlanError,
    RecommendationsPending,
    RequestError,
    RunFailed,
    ZarrParallelError,
)
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.cluster import open_cluster
from zarr_parallel.orchestration.control import (
    cache_slot,
    checked_request,
    decide_on_recommendations,
    deployment_policy,
    temporary_api_settings,
    without_flow_heartbeat,
)
from zarr_parallel.orchestration.options import add_overrides, add_verify_options
from zarr_parallel.orchestration.runners import (
    current_api_url,
    make_task_runner,
    worker_settings,
    worker_sizing,
)
from zarr_parallel.orchestration.tasks import artifact_key, finish_task, initialise_task, plan_task
from zarr_parallel.orchestration.write_flow import group_jobs, write_stages
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.policy import enforced
from zarr_parallel.run.recommend import Recommendation
from zarr_parallel.run.stages import strategy_lines
from zarr_parallel.run.steps import (
    Prepared,
    prepare,
    recommendations_message,
    run_lock,
    worker_note,
)
from zarr_parallel.run.verify import verify_cache
from zarr_parallel.store.paths import resolve_paths
from zarr_parallel.units import format_bytes

__all__ = ["cache_flow", "main", "run_cache_steps"]


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
    policy = deployment_policy()
    request = checked_request(request, policy)
    with enforced(policy):
        return _cache_until_decided(request)


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
    if prepared is None:
        try:
            prepared = plan_task(request)
        except RecommendationsPending as e:
            _publish_recommendations(request, e)
            raise
    _publish_plan(prepared)
    logger.info(
        "plan: %d jobs, read amplification %.2f, largest job %s (budget %s), %s",
        len(prepared.plan.jobs),
        prepared.plan.read_amplification,
        format_bytes(prepared.plan.max_job_memory),
        format_bytes(prepared.plan.memory_budget),
        prepared.status,
    )
    if prepared.status == "up_to_date":
        return finish_task(prepared, [], started)
    req = prepared.request
    sizing = worker_sizing(req, prepared.plan.peak_job_memory, len(prepared.todo))
    initialise_task(prepared)
    if after_initialise is not None:
        after_initialise(prepared)
    groups = group_jobs(prepared.todo)
    api_url = current_api_url()
    with open_cluster(req, prepared.version, sizing, api_url) as cluster:
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
    summary = finish_task(prepared, results, started)
    summary.update(
        deploy_mode=req.deploy_mode,
        workers=cluster.concurrency,
        write_tasks=len(groups),
        worker_memory=sizing.memory,
        cluster_ready_seconds=round(cluster.ready_seconds, 3),
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
    if prepared.recommendations or prepared.applied:
        text = recommendations_message(plan, prepared.recommendations)
        if prepared.applied:
            text = f"Applied: {prepared.applied.sentence}\n\n" + text
        create_markdown_artifact(
            text, key=artifact_key("zp-recommendations", prepared), description="Recommendations"
        )


def _publish_recommendations(request: CacheRequest, e: RecommendationsPending) -> None:
    final = resolve_paths(request).final
    md = "# Run halted on recommendations\n\n" + str(e).replace("\n  ", "\n- ")
    create_markdown_artifact(
        md, key=artifact_key("zp-recommendations", final), description="Recommendations"
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _parser(prog: str = "python -m flows.cache") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cache a dataset into Zarr as REQUEST.yaml says.",
    )
    p.add_argument("command", nargs="?", default="run", help="run (default), plan or verify")
    p.add_argument("request", nargs="?", help="request file (YAML or JSON)")
    add_overrides(p)
    p.add_argument("--plan-only", action="store_true", help="same as the plan command")
    add_verify_options(p, prefix="verify: ")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m flows.cache") -> int:
    """Run the CLI; returns the exit code (0 done, 1 failed, 2 invalid, 3 halted).

    ``zarr-parallel run|plan|verify`` (:mod:`zarr_parallel.cli`) lands here with its ``prog``.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    command, request_path = args.command, args.request
    if request_path is None and command not in ("run", "plan", "verify"):
        command, request_path = "run", command
    if args.plan_only:
        command = "plan"
    if command not in ("run", "plan", "verify") or request_path is None:
        parser.print_usage(sys.stderr)
        print("error: give a command (run, plan, verify) and a request file", file=sys.stderr)
        return 2

    def run() -> int:
        req = load_request_file(request_path, args.overrides)
        set_log_level(req.log_level)
        if command == "plan":
            _print_plan(prepare(req))
            return 0
        if command == "verify":
            report = verify_cache(req, args.verify_mode, args.sample, args.seed)
            print(report.text())
            return 0 if report.ok else 1
        with temporary_api_settings():
            summary = cache_flow(req)
        print(format_summary(summary))
        return 0

    return exit_code(run)


def exit_code(run: Callable[[], int]) -> int:
    """Run a command-line body; zarr-parallel's errors become the documented exit codes.

    0 done or up to date (what ``run`` returns), 1 run failed (or any other error of ours, or a
    plain ``ValueError``: a bug), 2 invalid request (:class:`RequestError`, :class:`PlanError`),
    3 halted on recommendations; each error is printed to stderr. Shared by ``zarr-parallel``,
    ``flows.cache`` and ``flows.recache``.
    """
    try:
        return run()
    except RecommendationsPending as e:
        print(str(e), file=sys.stderr)
        return 3
    except RunFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    except (RequestError, PlanError) as e:  # a request file that cannot be read is one too
        print(f"invalid request: {e}", file=sys.stderr)
        return 2
    except ZarrParallelError as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        # Not the request's fault (those are RequestError/PlanError): a bug, whose traceback
        # belongs in the report.
        traceback.print_exc()
        print(f"failed: {e!r}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "ephemeral Prefect API" not in str(e):
            raise
        print(
            f"failed: {e}\nStart a Prefect server and set PREFECT_API_URL, or allow the temporary "
            "API more time with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
            file=sys.stderr,
        )
        return 1


def _print_plan(prepared: Prepared) -> None:
    plan = prepared.plan
    print(f"cache:               {prepared.paths.final} ({prepared.status})")
    print(f"jobs:                {len(plan.jobs)} ({len(prepared.todo)} to run)")
    print(f"read amplification:  {plan.read_amplification:.2f}")
    print(
        f"largest job:         {format_bytes(plan.peak_job_memory)} of "
        f"{format_bytes(plan.memory_budget)} budget"
    )
    for key, text in strategy_lines(plan):
        print(f"{key + ':':<21}{text}")
    workers, why = worker_note(prepared.request)
    print(f"workers:             up to {workers} at once ({prepared.request.deploy_mode})")
    for note in [*plan.notes, *([why] if why else [])]:
        print(f"note:                {note}")


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run summary."""
    lines = [
        f"zarr-parallel: {summary['status']}",
        f"  cache               {summary['cache']}",
        f"  jobs                {summary['jobs_run']} run, {summary['jobs_skipped']} skipped, "
        f"{summary['jobs']} planned",
        f"  read amplification  {summary['read_amplification']:.2f}",
        f"  memory per job      estimate up to {format_bytes(summary['max_job_memory'])}"
        + (
            f", measured peak {format_bytes(summary['max_peak_memory'])}"
            if summary.get("max_peak_memory")
            else ""
        ),
        f"  written             {format_bytes(summary['bytes_written'])}",
        f"  wall time           {summary['seconds']:.1f} s",
    ]
    if summary.get("workers"):
        lines.append(
            f"  ran on              {summary['workers']} {summary['deploy_mode']} worker(s), "
            f"{summary['write_tasks']} write tasks"
        )
    if summary.get("applied_recommendation"):
        lines.append(f"  applied             {summary['applied_recommendation']['sentence']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
