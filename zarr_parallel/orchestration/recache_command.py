"""The re-cache command: ``zarr-parallel recache REQUEST.yaml`` and ``python -m flows.recache``.

Started like ``zarr-parallel run`` (docs/design.md §2b, Start-up;
:mod:`zarr_parallel.orchestration.adhoc`): the temporary Prefect API starts first when none is
configured, the full run is planned while it comes up (the one shared pre-flow planning,
:func:`~zarr_parallel.orchestration.adhoc.plan_ahead`, of the request the re-cache flow plans:
:func:`~zarr_parallel.run.recache_outcome.full_run_request`), a cache found up to date is
answered before any flow run (only when no lock file is there), and the summary's wall time is
the command's, broken into phases. Otherwise the re-cache flow
(:mod:`zarr_parallel.orchestration.recache`) decides and runs as always. Nothing here imports
Prefect at module level.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.adhoc import (
    AdHocRun,
    command_api,
    run_ad_hoc,
    up_to_date_answer,
)
from zarr_parallel.orchestration.command import exit_code, format_summary
from zarr_parallel.orchestration.options import (
    add_overrides,
    add_progress_options,
    add_recache_options,
)
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.phases import PhaseClock
from zarr_parallel.run.recache_outcome import full_run_request, up_to_date_decision, with_pending
from zarr_parallel.run.steps import Prepared


def recache_run(allow_append: bool = True, check_only: bool = False) -> AdHocRun:
    """The re-cache command's run on the start-up path (:class:`AdHocRun`)."""
    return AdHocRun(
        flow=functools.partial(_recache_flow, allow_append=allow_append, check_only=check_only),
        planned=full_run_request,
        answer=functools.partial(_up_to_date, check_only=check_only),
        # A check writes nothing: no cluster.
        cluster_ahead=not check_only,
        load=lambda: importlib.import_module("zarr_parallel.orchestration.recache"),
    )


def _recache_flow(request: CacheRequest, allow_append: bool, check_only: bool) -> dict[str, Any]:
    # Deferred: the flow imports Prefect (seconds), which an up-to-date answer never needs.
    from zarr_parallel.orchestration.recache import recache_flow

    return dict(recache_flow(request, allow_append=allow_append, check_only=check_only))


def _up_to_date(request: CacheRequest, prepared: Prepared, check_only: bool) -> dict[str, Any]:
    """The re-cache flow's summary of an up-to-date cache, its decision included."""
    decision = with_pending(request, up_to_date_decision(prepared))
    return {**up_to_date_answer(prepared), "check_only": check_only, "recache": decision.to_json()}


def main(
    argv: Sequence[str] | None = None,
    prog: str = "python -m flows.recache",
    started: float | None = None,
) -> int:
    """``python -m flows.recache REQUEST.yaml [--set k=v] [--check] [--no-append]``.

    Exit codes as the cache command: 0 done or up to date, 1 failed, 2 invalid, 3 halted.
    ``zarr-parallel recache`` (:mod:`zarr_parallel.cli`) lands here with its ``prog``;
    ``started`` is when the command started (epoch seconds), else this call.
    """
    clock = PhaseClock(time.time() if started is None else started)
    p = argparse.ArgumentParser(
        prog=prog,
        description="Bring the cache of REQUEST.yaml up to date with its source.",
    )
    p.add_argument("request", help="request file (YAML or JSON)")
    add_overrides(p)
    add_recache_options(p)
    add_progress_options(p)
    args = p.parse_args(argv)

    def run() -> int:
        # First: the temporary API's start overlaps everything that follows.
        api = command_api(True)
        try:
            req = load_request_file(args.request, args.overrides)
            set_log_level(req.log_level)
            # Deferred with the progress output (rich), as in the cache command.
            from zarr_parallel.orchestration.progress import reporting

            todo = recache_run(allow_append=not args.no_append, check_only=args.check)
            with reporting(False if args.quiet else None, since=clock.origin):
                summary = run_ad_hoc(req, clock, api, todo)
        finally:
            if api is not None:
                api.stop()
        print(format_summary(summary))
        recache = summary["recache"]
        print(f"  re-cache            {recache['action']}: {recache['reason']}")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
