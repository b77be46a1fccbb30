"""An ad hoc run (the command, the Python API), started like a script (docs/design.md §2b).

- The temporary Prefect API, when one is needed, starts first and in the background
  (:mod:`zarr_parallel.orchestration.temporary_api`); the run plans while it comes up.
- :func:`plan_ahead` plans before the flow: the one shared pre-flow planning of both doors. It
  is :func:`zarr_parallel.run.steps.prepare`, the function the flow's plan task runs, so it
  refuses a bad request or plan with the same error, before any flow run.
- A cache it finds up to date is answered there, before any flow run and without importing
  Prefect (a documented exception to the one path: nothing is written, so nothing is
  orchestrated). The checks are the flow's own: a complete published version whose content
  fingerprint matches, over the source's identity (files, sizes, modification times, layout).
- Otherwise the flow runs as always: it plans again under the cache's lock (the source may have
  changed meanwhile; planning is cached and cheap the second time) and publishes the plan.
- The summary's ``seconds`` is the command's wall time and ``phases`` its breakdown
  (:mod:`zarr_parallel.run.phases`).

Prefect is imported only when a flow runs (inside :func:`_run_flow`).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.faults import points_off
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.temporary_api import TemporaryApi, api_url_configured
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.finish import finish
from zarr_parallel.run.phases import PhaseClock, enter_phase, timing
from zarr_parallel.run.steps import Prepared, prepare


def plan_ahead(request: CacheRequest) -> Prepared | None:
    """Plan a request before its flow run; None when it halts on recommendations (the flow
    then halts on them itself, publishing them as it always does).

    Raises
    ------
    RequestError, PlanError
        A bad request or no plan within the limits: refused before any flow run.
    """
    try:
        with points_off():  # not the run's own `planned` step: no lock is held yet
            return prepare(request)
    except RecommendationsPending:
        return None
    except Exception:
        if request.log_level >= 2:
            # No flow run shows this refusal's traceback: at the debug level the command does.
            traceback.print_exc()
        raise


def up_to_date_answer(prepared: Prepared) -> dict[str, Any]:
    """The summary of a run that found its cache up to date (nothing written, no flow run)."""
    summary = finish(prepared, [], 0.0)
    summary["flow_run"] = False
    return summary


def needs_temporary_api() -> bool:
    """True when no Prefect API is configured (the environment, the profile, or Prefect's
    settings when Prefect is loaded already)."""
    if api_url_configured():
        return False
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL  # loaded already: costs nothing

        return not PREFECT_API_URL.value()
    return True


def run_ad_hoc(
    request: CacheRequest, clock: PhaseClock, api: TemporaryApi | None
) -> dict[str, Any]:
    """Run a request from a door: plan ahead, answer an up-to-date cache, else run the flow.

    Parameters
    ----------
    request
        The validated request.
    clock
        The command's clock (its origin is the command's start).
    api
        The temporary Prefect API started for this command, or None (an API is configured,
        or Prefect starts its own).

    Returns
    -------
    dict
        The run summary with ``deploy_mode``, ``deploy_mode_reason``, ``flow_run``,
        ``seconds`` (the command's wall time) and ``phases``.
    """
    with timing(clock):
        enter_phase("planning")
        prepared = plan_ahead(request)
        if prepared is not None and prepared.status == "up_to_date" and not _locked(prepared):
            summary = up_to_date_answer(prepared)
        else:
            enter_phase("start-up")
            summary = _run_flow(request, api)
        summary.setdefault("deploy_mode", _mode(prepared, request))
        if prepared is not None and not summary.get("deploy_mode_reason"):
            summary["deploy_mode_reason"] = prepared.mode_reason
        enter_phase("teardown")
        if api is not None and api.ready:
            # Seconds from the server's start until it answered (it overlapped the imports and
            # the planning): what start-up still waited for is the rest of it.
            summary["temporary_api_ready_seconds"] = round(api.ready_seconds, 3)
        if api is not None and api is not TemporaryApi.shared_instance():
            api.stop()
        summary["seconds"] = round(clock.wall(), 3)
        summary["phases"] = clock.breakdown()
    return summary


def _locked(prepared: Prepared) -> bool:
    """True when a lock file exists at the cache: another run may be replacing the version
    found up to date (or left its lock), so the flow's lock decides, as for any run."""
    return prepared.paths.lock.exists()


def _mode(prepared: Prepared | None, request: CacheRequest) -> str:
    return prepared.request.deploy_mode if prepared is not None else request.deploy_mode


def _run_flow(request: CacheRequest, api: TemporaryApi | None) -> dict[str, Any]:
    # Deferred: the flow imports Prefect (seconds), which an up-to-date answer never needs.
    from zarr_parallel.orchestration.cache import cache_flow
    from zarr_parallel.orchestration.control import temporary_api_settings

    set_log_level(request.log_level)  # again: importing Prefect just set up its own logging

    if api is not None and not needs_temporary_api():
        # Prefect's settings name an API after all (read once Prefect is loaded).
        if api is not TemporaryApi.shared_instance():
            api.stop()
        api = None
    if api is None:
        with temporary_api_settings():
            summary = dict(cache_flow(request))
    else:
        with api.settings():
            summary = dict(cache_flow(request))
    summary["flow_run"] = True
    return summary


__all__ = ["needs_temporary_api", "plan_ahead", "run_ad_hoc", "up_to_date_answer"]
