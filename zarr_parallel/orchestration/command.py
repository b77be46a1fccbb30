"""The cache command line: ``python -m flows.cache [run|plan|verify] REQUEST.yaml`` (and
``zarr-parallel run|plan|verify``), its exit codes and its summary.

Started like a script (docs/design.md §2b): ``run`` starts the temporary Prefect API before
anything else (when no API is configured), then loads the request and plans while the server
comes up (:mod:`zarr_parallel.orchestration.adhoc`). Nothing here imports Prefect at module
level: an up-to-date cache is answered without it.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from zarr_parallel.errors import (
    PlanError,
    RecommendationsPending,
    RequestError,
    RunFailed,
    ZarrParallelError,
)
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.adhoc import command_api, run_ad_hoc
from zarr_parallel.orchestration.options import (
    add_overrides,
    add_plan_options,
    add_progress_options,
    add_verify_options,
)
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.phases import PhaseClock, cluster_text, phases_text
from zarr_parallel.run.verify import verify_cache
from zarr_parallel.units import format_bytes

__all__ = ["exit_code", "format_summary", "main"]


def _parser(prog: str = "python -m flows.cache") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cache a dataset into Zarr as REQUEST.yaml says.",
    )
    p.add_argument("command", nargs="?", default="run", help="run (default), plan or verify")
    p.add_argument("request", nargs="?", help="request file (YAML or JSON)")
    add_overrides(p)
    add_progress_options(p)
    p.add_argument("--plan-only", action="store_true", help="same as the plan command")
    add_verify_options(p, prefix="verify: ")
    add_plan_options(p, prefix="plan: ")
    return p


def main(
    argv: Sequence[str] | None = None,
    prog: str = "python -m flows.cache",
    started: float | None = None,
) -> int:
    """Run the CLI; returns the exit code (0 done, 1 failed, 2 invalid, 3 halted).

    ``zarr-parallel run|plan|verify`` (:mod:`zarr_parallel.cli`) lands here with its ``prog``.
    ``started`` is when the command started (epoch seconds; the commands pass their process's
    start): the summary's wall time counts from there, else from this call.
    """
    clock = PhaseClock(time.time() if started is None else started)
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
    if (args.picture or args.picture_variable) and command != "plan":
        parser.print_usage(sys.stderr)
        print("error: --picture and --picture-variable belong to the plan command", file=sys.stderr)
        return 2

    def run() -> int:
        # First: the temporary API's start overlaps everything that follows (started before
        # this module's imports by the command's entry, when it could tell).
        api = command_api(command == "run")
        try:
            req = load_request_file(request_path, args.overrides)
            set_log_level(req.log_level)
            if command == "plan":
                # Deferred: the plan view imports Prefect (its picture artifact) and
                # dask-jobqueue (the SLURM job script); run and an up-to-date answer need neither.
                from zarr_parallel.orchestration.plan_report import plan_command

                return plan_command(req, args.picture, args.picture_variable)
            if command == "verify":
                report = verify_cache(req, args.verify_mode, args.sample, args.seed)
                print(report.text())
                return 0 if report.ok else 1
            # Deferred with the progress output (rich): not needed by plan or verify.
            from zarr_parallel.orchestration.progress import reporting

            with reporting(False if args.quiet else None, since=clock.origin):
                summary = run_ad_hoc(req, clock, api)
        finally:
            if api is not None:
                api.stop()
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
        f"  wall time           {summary['seconds']:.1f} s" + _phases_text(summary),
    ]
    if summary.get("deploy_mode"):
        mode = f"  deploy mode         {summary['deploy_mode']}"
        if summary.get("deploy_mode_reason"):
            mode += f" (auto: {summary['deploy_mode_reason']})"
        lines.append(mode)
    if summary.get("workers"):
        lines.append(
            f"  ran on              {summary['workers']} {summary['deploy_mode']} worker(s), "
            f"{summary['write_tasks']} write tasks"
        )
    cluster = cluster_text(summary)
    if cluster:
        lines.append(f"  cluster start       {cluster}")
    if summary.get("flow_run") is False:
        lines.append("  flow run            none: the cache was found up to date before it")
    if summary.get("applied_recommendation"):
        lines.append(f"  applied             {summary['applied_recommendation']['sentence']}")
    # Plan notes (e.g. steps left out until every variable has them) are worth a line each.
    lines += [f"  note                {note}" for note in summary.get("notes") or []]
    return "\n".join(lines)


def _phases_text(summary: dict[str, Any]) -> str:
    text = phases_text(summary.get("phases"))
    return f" ({text})" if text else ""


if __name__ == "__main__":
    sys.exit(main())
