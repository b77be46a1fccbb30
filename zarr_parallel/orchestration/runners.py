"""Where write tasks run, per deploy mode: the workers' size and settings, Prefect's task runner.

``series`` runs tasks in the flow process (one thread); ``dask_distributed`` and ``SLURM`` run
them on the run's dask cluster (:mod:`zarr_parallel.orchestration.cluster`), whose workers are
sized from the plan (:func:`worker_sizing`, :mod:`zarr_parallel.planning.sizing`) and get the
flow's Prefect API in their settings and environment. No chunk arithmetic here.

Prefect is imported inside the functions that use it: dask workers import this module (through
the prewarm plugin of :mod:`zarr_parallel.orchestration.cluster`) and import Prefect in a thread
of their own, not while they join.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.sizing import (
    RETIRE_BEFORE,
    WorkerSizing,
    size_workers,
    worker_overhead,
)
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.policy import POLICED_ENV, POLICY_ENV
from zarr_parallel.run.steps import worker_count
from zarr_parallel.units import format_duration, parse_duration

#: dask's log level per request ``log_level``.
_DASK_LEVELS = {0: "warning", 1: "info", 2: "debug"}
#: dask settings of worker (and nanny) processes. No statistical profiler: it samples every
#: thread every 10 ms for a dashboard that none of our clusters has. Calmer event-loop and
#: memory watchdogs: a worker only waits on its job process, which holds the data and whose
#: memory is watched by :mod:`zarr_parallel.run.job_process` every 0.1 s. Together these took
#: ~1 CPU s of a 17 s data phase on 2 cores (docs/benchmarks.md, "December 7, noon").
QUIET_DASK_ENV = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "500ms",
    "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "500ms",
}


def worker_sizing(req: CacheRequest, max_job_estimate: int, jobs: int) -> WorkerSizing:
    """Sizing of this run's workers (checked before anything is written).

    Raises
    ------
    RequestError
        ``slurm.walltime`` leaves no room for one job within ``worker_timeout``.
    """
    overhead = worker_overhead(req.deploy_mode)
    max_walltime = None
    if req.slurm.walltime is not None:
        max_walltime = parse_duration(req.slurm.walltime, "slurm.walltime")
        if req.deploy_mode == "slurm" and max_walltime < req.timeout_seconds + RETIRE_BEFORE:
            raise RequestError(
                "slurm.walltime",
                req.slurm.walltime,
                f"is shorter than one job's worker_timeout ({format_duration(req.timeout_seconds)})"
                f" plus the {RETIRE_BEFORE:.0f} s a worker needs to retire",
                "Raise slurm.walltime or lower worker_timeout (the plan then makes smaller jobs)",
            )
    return size_workers(
        jobs=jobs,
        max_workers=worker_count(req),
        max_job_estimate=max_job_estimate,
        memory_limit=req.memory_bytes,
        reserve=req.reserve_bytes,
        worker_overhead=overhead,
        timeout=req.timeout_seconds,
        max_walltime=max_walltime,
    )


@contextmanager
def worker_settings(api_url: str | None) -> Iterator[None]:
    """Prefect settings that task runs carry to the workers: this API, no temporary server.

    Prefect ships the flow's settings with each task to the worker; when the flow talks to a
    temporary server those settings hold no URL, and the worker would start a server of its
    own (docs/design.md §6). Within this block they name the flow's API instead.
    """
    if not api_url:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    with temporary_settings(
        updates={PREFECT_API_URL: api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
    ):
        yield


def worker_environment(req: CacheRequest, api_url: str | None, cores: int) -> dict[str, str]:
    """Environment of worker processes: the flow's Prefect API, no temporary server, quiet dask,
    and the cores each worker may use.

    A worker that finds no API URL would start a temporary Prefect server of its own (docs/design.md
    §6), so the URL of the flow's API — the temporary one too — is handed over explicitly.
    ``cores`` becomes ``ZARR_PARALLEL_THREADS``: workers sharing a node each get their share,
    so that their readers and encoders do not start a thread per core of the whole node. A
    ``ZARR_PARALLEL_THREADS`` set in the flow's environment wins (the user knows the nodes).
    In a policed (deployment) run, the policed state and the policy file's path go along.
    """
    env = {
        **QUIET_DASK_ENV,
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "DASK_LOGGING__DISTRIBUTED": _DASK_LEVELS.get(req.log_level, "warning"),
        "ZARR_PARALLEL_THREADS": os.environ.get("ZARR_PARALLEL_THREADS") or str(max(1, cores)),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if os.environ.get(POLICED_ENV):
        # A deployment run's workers check kerchunk references again, against the same policy
        # file (zarr_parallel.run.policy). Said here, not left to inheritance: a site's sbatch
        # may not pass the submitter's environment on (--export=NONE).
        for name in (POLICED_ENV, POLICY_ENV):
            if os.environ.get(name):
                env[name] = os.environ[name]
    return env


def make_task_runner(deploy_mode: str, address: str | None) -> Any:
    """The Prefect task runner that executes a run's write tasks: in the flow process in
    ``series`` mode, else on the dask cluster whose scheduler is at ``address``."""
    if deploy_mode == "series":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask.task_runners import DaskTaskRunner

    return DaskTaskRunner(address=address)


def current_api_url() -> str | None:
    """The Prefect API this flow run talks to (the temporary one too), if any."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.client is not None:
            url = str(ctx.client.api_url)
            return None if "ephemeral-prefect" in url else url.rstrip("/")
    except Exception:  # outside a flow run
        pass
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
