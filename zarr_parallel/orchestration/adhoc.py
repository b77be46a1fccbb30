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
- A request that names ``deploy_mode="dask_distributed"`` has its local cluster started as
  planning begins (:mod:`zarr_parallel.orchestration.early_cluster`); a run that will not use
  it closes it at once.
- ``zarr-parallel run`` and the Python API run the cache flow (:data:`CACHE_RUN`);
  ``zarr-parallel recache`` runs the re-cache flow on the same path (:class:`AdHocRun`,
  :mod:`zarr_parallel.orchestration.recache_command`).

Prefect is imported only when a flow runs (inside :func:`_run_flow`).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.faults import points_off
from zarr_parallel.logs import set_log_level
from zarr_parallel.orchestration.early_cluster import close_waiting, cluster_ahead
from zarr_parallel.orchestration.temporary_api import (
    TemporaryApi,
    api_url_configured,
    configured_api_url,
)
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.finish import finish
from zarr_parallel.run.phases import PhaseClock, clock_figures, enter_phase, timing
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


def command_api(wanted: bool) -> TemporaryApi | None:
    """A command's temporary API: the one its entry started early
    (:meth:`TemporaryApi.start_early`), else a new one when ``wanted`` and no API is
    configured; an early one the command does not need is stopped at once."""
    early = TemporaryApi.take_early()
    if not wanted or not needs_temporary_api():
        if early is not None:
            early.stop()
        return None
    return early or TemporaryApi.begin()


@dataclass(frozen=True)
class AdHocRun:
    """What a door's command runs on the start-up path: the request it plans ahead, its answer
    to a cache found up to date, and its flow.

    Attributes
    ----------
    flow
        Runs the flow on the request (imports Prefect: called only when a flow runs).
    planned
        The request as the flow's first plan sees it (the re-cache flow plans a full run).
    answer
        The summary of a cache found up to date before any flow run.
    cluster_ahead
        Whether a ``dask_distributed`` run's local cluster may start during planning.
    load
        Imports the flow's module (Prefect with it): called before the command waits for its
        temporary API, so that the import overlaps the server's start.
    """

    flow: Callable[[CacheRequest], dict[str, Any]]
    planned: Callable[[CacheRequest], CacheRequest] = lambda request: request
    answer: Callable[[CacheRequest, Prepared], dict[str, Any]] = lambda request, prepared: (
        up_to_date_answer(prepared)
    )
    cluster_ahead: bool = True
    load: Callable[[], object] = lambda: importlib.import_module(
        "zarr_parallel.orchestration.cache"
    )


def _cache_flow(request: CacheRequest) -> dict[str, Any]:
    # Deferred: the flow imports Prefect (seconds), which an up-to-date answer never needs.
    from zarr_parallel.orchestration.cache import cache_flow

    return dict(cache_flow(request))


#: ``zarr-parallel run`` and ``ZarrParallelAssembler.cache``: the cache flow.
CACHE_RUN = AdHocRun(flow=_cache_flow)


def run_ad_hoc(
    request: CacheRequest,
    clock: PhaseClock,
    api: TemporaryApi | None,
    run: AdHocRun = CACHE_RUN,
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
    run
        What the command runs (:data:`CACHE_RUN` by default).

    Returns
    -------
    dict
        The run summary with ``deploy_mode``, ``deploy_mode_reason``, ``flow_run``,
        ``seconds`` (the command's wall time), ``phases`` and ``timeline``.
    """
    with timing(clock):
        enter_phase("planning")
        with _cluster_ahead(request, api, run):
            prepared = plan_ahead(run.planned(request))
            if prepared is None or prepared.status == "up_to_date":
                close_waiting("no data to write" if prepared else "the plan halts")
            if prepared is not None and prepared.status == "up_to_date" and not _locked(prepared):
                summary = run.answer(request, prepared)
            else:
                enter_phase("start-up")
                summary = _run_flow(request, api, run)
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
        clock_figures(clock, summary)
    return summary


def _cluster_ahead(
    request: CacheRequest, api: TemporaryApi | None, run: AdHocRun
) -> AbstractContextManager[None]:
    """The local cluster of an explicit ``dask_distributed`` run, started while it plans."""
    if not run.cluster_ahead:
        return nullcontext()
    return cluster_ahead(request, api.api_url if api is not None else configured_api_url())


def _locked(prepared: Prepared) -> bool:
    """True when a lock file exists at the cache: another run may be replacing the version
    found up to date (or left its lock), so the flow's lock decides, as for any run."""
    return prepared.paths.lock.exists()


def _mode(prepared: Prepared | None, request: CacheRequest) -> str:
    return prepared.request.deploy_mode if prepared is not None else request.deploy_mode


def _run_flow(request: CacheRequest, api: TemporaryApi | None, run: AdHocRun) -> dict[str, Any]:
    # Deferred: the settings import Prefect (seconds), which an up-to-date answer never needs.
    from zarr_parallel.orchestration.control import temporary_api_settings
    from zarr_parallel.orchestration.heartbeat import door_heartbeat

    set_log_level(request.log_level)  # again: importing Prefect just set up its own logging

    if api is not None and not needs_temporary_api():
        # Prefect's settings name an API after all (read once Prefect is loaded).
        if api is not TemporaryApi.shared_instance():
            api.stop()
        api = None
    # The flow's imports (a second) while the temporary API may still be starting.
    run.load()
    # Against a lasting API the flow body sends the run's heartbeat, ending with it
    # (orchestration/heartbeat.py); a temporary API gets none.
    if api is None:
        with temporary_api_settings(), door_heartbeat():
            summary = run.flow(request)
    else:
        with api.settings(), door_heartbeat():
            summary = run.flow(request)
    summary["flow_run"] = True
    return summary


__all__ = [
    "CACHE_RUN",
    "AdHocRun",
    "command_api",
    "needs_temporary_api",
    "plan_ahead",
    "run_ad_hoc",
    "up_to_date_answer",
]
