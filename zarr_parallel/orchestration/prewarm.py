"""The dask worker plugin of a run's cluster: import the task code and start the job process as
a worker joins, and make a closing worker really end.

dask workers import this module when they unpickle :class:`PrewarmPlugin`: it imports no Prefect
at module level (the plugin imports the task module in a thread of its own, see :func:`_prewarm`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from zarr_parallel.run.job_process import close_worker, reserve, start_reserved, warm

logger = logging.getLogger(__name__)

#: Seconds a closing worker gets to exit by itself before it is ended (``os._exit``).
EXIT_GRACE_SECONDS = 30.0


class PrewarmPlugin(WorkerPlugin):
    """dask worker plugin: import the task code and start the job process as a worker joins,
    so that the first write task does not wait for them.

    Parameters
    ----------
    source
        The run's source (``CacheRequest.source_json``), opened by the job process once it has
        started, while the run still plans, instead of by its first job.
    """

    name = "zarr-parallel-prewarm"

    def __init__(self, source: str | None = None) -> None:
        self.source = source

    def setup(self, worker: Any) -> None:
        # The task module (and Prefect with it) is imported here, in the worker's own thread,
        # before any task can arrive: imported in a second thread while the first task's
        # unpickling imported Prefect too, Python's import locks reported a deadlock and
        # Prefect printed "Failed to initialize plugins" on the run's stderr.
        import zarr_parallel.orchestration.tasks  # noqa: F401 - Prefect and the task module

        # What the first task run would import otherwise (about 0.3 s, measured), on a worker
        # whose job process is starting its first job beside it: Prefect's task engine and the
        # task runner the task's unpickling needs.
        for name in ("prefect.task_engine", "prefect.artifacts", "prefect_dask.task_runners"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        # Made idle here, started in a thread: a WarmPlugin set up right after (a worker that
        # joins a running run gets both at once) finds it.
        proc = reserve(self.source)
        if proc is not None:
            threading.Thread(
                target=start_reserved, args=(proc,), name="zarr-parallel-prewarm", daemon=True
            ).start()
        # While the job process starts: the write flow's module, which a first task's
        # unpickling imports (its Prefect context names the flow it runs in), with dask-jobqueue
        # and its YAML config, about 0.1 s on the worker's event loop while both cores waited
        # for the run's first jobs; then the rest of Prefect's first task run.
        with contextlib.suppress(ImportError):
            importlib.import_module("zarr_parallel.orchestration.write_flow")
        _warm_task_engine()

    def teardown(self, worker: Any) -> None:
        # The worker is closing: its job processes go now, a busy one too (the scheduler has
        # given its job to another worker), and it starts no more. And the worker must really
        # end: SLURM workers (no nanny) were seen stuck after a scancel, cancelling event-loop
        # tasks for ever, outliving their job where SLURM tracks processes by parentage
        # (proctrack/linuxproc) and holding their memory on the node.
        close_worker()
        threading.Thread(
            target=_exit_after, args=(EXIT_GRACE_SECONDS,), name="zarr-parallel-exit", daemon=True
        ).start()


class WarmPlugin(WorkerPlugin):
    """dask worker plugin: have the worker's job process ready a run's plan before its first
    job (:mod:`zarr_parallel.run.warm`), registered once the plan is written.

    Parameters
    ----------
    request_json
        The request, as the write tasks get it.
    version
        The folder whose ``plan.json`` the first write tasks run.
    """

    name = "zarr-parallel-warm"

    def __init__(self, request_json: str, version: str) -> None:
        self.request_json = request_json
        self.version = version

    def setup(self, worker: Any) -> None:
        # Queued here, before any task of the run can reach this worker (the flow registers
        # the plugin before it submits them); sent from a thread, as a large request may not
        # fit the pipe at once.
        procs = warm(self.request_json, self.version)
        if procs:
            threading.Thread(
                target=_flush, args=(procs,), name="zarr-parallel-warm", daemon=True
            ).start()


def _warm_task_engine() -> None:
    """Pay Prefect's first-task-run costs in this worker now, while the run plans.

    A worker's first task run rebuilt Prefect's context models, set up its logging, built its
    settings and loaded the installed collections' entry points: about 0.1 s more than later
    runs, while both cores waited for the run's first jobs. Done here, on a context of no flow
    run: no task run is created and nothing is sent to the API.
    """
    # Deferred: Prefect loads in setup, after the task module (see the import-lock note there).
    from prefect.context import SettingsContext, hydrated_context
    from prefect.plugins import load_prefect_collections
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Without an API URL, Prefect's client would start a temporary API server of its own.
        return
    try:
        load_prefect_collections()
        settings = SettingsContext.get()
        with hydrated_context({"settings_context": settings.serialize() if settings else {}}):
            pass
    except Exception as e:  # an optimisation: the first task pays for it instead
        logger.debug("could not warm Prefect's task engine: %s", e)


def _flush(procs: list[Any]) -> None:
    for proc in procs:
        proc.flush()


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.warning(
        "worker pid %d still running %.0f s after closing: ending it", os.getpid(), seconds
    )
    logging.shutdown()
    os._exit(0)


__all__ = ["EXIT_GRACE_SECONDS", "PrewarmPlugin", "WarmPlugin"]
