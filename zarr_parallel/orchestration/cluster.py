"""The dask cluster of a write flow run: start it, hand it to Prefect, watch it, close it.

``dask_distributed`` starts a local dask cluster (one single-threaded worker process per
concurrent job) or connects to ``scheduler_address``; ``SLURM`` starts a dask-jobqueue
``SLURMCluster`` configured by :mod:`zarr_parallel.orchestration.slurm`, whose jobs are sized from
the plan (:mod:`zarr_parallel.planning.sizing`). The flow owns the cluster (:func:`open_cluster`)
and hands Prefect a ``DaskTaskRunner`` connected to it
(:func:`zarr_parallel.orchestration.runners.make_task_runner`), so that it can also watch it:
replace SLURM jobs that ended, explain why a worker was lost, and stop waiting when no worker can
come. No chunk arithmetic here.

dask, distributed and dask-jobqueue are imported when a cluster starts: a series run (the
default on small plans) never loads them. The workers' plugin is
:mod:`zarr_parallel.orchestration.prewarm`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zarr_parallel.orchestration.local_cluster import local_cluster
from zarr_parallel.orchestration.runners import worker_environment
from zarr_parallel.orchestration.slurm import (
    EndReason,
    is_loopback,
    log_directory,
    slurm_cluster_kwargs,
    slurm_end_reason,
    squeue_states,
    wait_until_gone,
)
from zarr_parallel.planning.sizing import WorkerSizing
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.fastread import process_cores

logger = logging.getLogger(__name__)

#: Seconds without any connected worker after which a local or external cluster is given up.
NO_WORKER_GRACE = 120.0
#: Least seconds between two ``squeue`` calls while some SLURM worker is missing.
SQUEUE_INTERVAL = 5.0
#: Seconds local workers may take to start and connect.
STARTUP_TIMEOUT = 120.0
#: dask settings while a cluster starts: let a dead worker's task fail at once (it then becomes
#: a Prefect retry) instead of being re-run up to three times behind Prefect's back, and hand a
#: worker a task only when its thread is free, so that a worker that dies takes no queued task
#: down with it and a slow job holds no other back. The scheduler runs in the flow process, beside
#: the jobs on the same cores: no work stealing (a task reaches a worker only when its thread is
#: free, so there is never a queued task to steal, yet the balancing ran every 0.1 s) and an
#: event-loop watchdog every 0.5 s instead of 20 ms (the local workers inherit it too): the flow
#: process spent about 0.2 CPU s less per 20 s of data phase (docs/benchmarks.md, "December 7,
#: evening").
CLUSTER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.deploy.lost-worker-timeout": "2s",
    "distributed.scheduler.worker-saturation": 1.0,
    "distributed.scheduler.work-stealing": False,
    "distributed.admin.tick.interval": "500ms",
}


@dataclass
class ClusterHandle:
    """The cluster of one write flow run, and what the flow learns while watching it."""

    mode: str
    address: str | None
    sizing: WorkerSizing
    cluster: Any = None
    client: Any = None
    logs: Path | None = None
    started: float = field(default_factory=time.time)
    ready_seconds: float = 0.0
    job_script: str | None = None
    _seen: set[str] = field(default_factory=set)
    _job_ids: dict[str, str] = field(default_factory=dict)
    _last_worker: float = field(default_factory=time.monotonic)
    _replaced: int = 0
    _replacing: dict[str, str] = field(default_factory=dict)
    _last_note: float = 0.0
    _squeue_at: float = 0.0

    @property
    def concurrency(self) -> int:
        """Write tasks running at once."""
        return self.sizing.workers

    def workers(self) -> dict[str, Any]:
        """Workers connected to the scheduler: address → info."""
        if self.cluster is not None:
            return dict(self.cluster.scheduler_info.get("workers", {}))
        if self.client is not None:
            return dict(self.client.scheduler_info().get("workers", {}))
        return {}

    def slurm_job_ids(self) -> dict[str, str]:
        """SLURM job id per worker name, of every job this run submitted so far."""
        if self.mode == "slurm" and self.cluster is not None:
            for name, job in list(self.cluster.workers.items()):
                if getattr(job, "job_id", None):
                    self._job_ids[str(name)] = str(job.job_id)
        return dict(self._job_ids)

    def check(self, max_replacements: int) -> str | None:
        """Watch the cluster between task completions; a message when no worker can come.

        SLURM jobs that ended (``scancel``, walltime, node failure) are replaced while the
        budget allows; a cluster with no worker and no job queued or running is given up.
        """
        if self.mode == "series":
            return None
        workers = self.workers()
        now = time.monotonic()
        names = {str(w.get("name")) for w in workers.values()}
        self._seen |= names
        if workers:
            self._last_worker = now
        if self.mode != "slurm":
            return self._check_connected(bool(workers), now)
        return self._check_slurm(bool(workers), names, now, max_replacements)

    def _check_connected(self, connected: bool, now: float) -> str | None:
        """A local or external cluster: given up after :data:`NO_WORKER_GRACE` without workers."""
        if not connected and now - self._last_worker > NO_WORKER_GRACE:
            return (
                f"no dask worker has been connected to {self.address} for "
                f"{NO_WORKER_GRACE:.0f} s; start workers or check the scheduler"
            )
        return None

    def _check_slurm(
        self, connected: bool, names: set[str], now: float, max_replacements: int
    ) -> str | None:
        """A SLURM cluster: replace the worker jobs that ended, or give up when none can come."""
        ids = self.slurm_job_ids()
        if len(names) >= self.sizing.workers:
            return None  # all workers connected: nothing to ask SLURM
        if now - self._squeue_at < SQUEUE_INTERVAL:
            return None
        self._squeue_at = now
        queued = squeue_states(set(ids.values()))
        if not connected and not queued and now - self._last_worker > NO_WORKER_GRACE:
            # Nothing connected, nothing queued or running for a while: submission fails
            # (sbatch errors are in the flow's log) or every job ended without a replacement.
            return (
                f"no SLURM worker has been connected for {NO_WORKER_GRACE:.0f} s and no worker "
                f"job of this run is queued or running (see the flow log for sbatch errors, "
                f"and the job logs in {self.logs})"
            )
        live = set(names)
        for name, job in list(self.cluster.workers.items()):
            job_id = getattr(job, "job_id", None)
            if job_id is None or str(job_id) in queued:
                live.add(str(name))
        # A name is missing when the job it last had ended (and no replacement is on its way).
        missing = [
            n
            for n in map(str, self.cluster.worker_spec)
            if n not in live and n in ids and self._replacing.get(n) != ids[n]
        ]
        if not missing:
            self._note_pending(connected, queued, now)
            return None
        return self._replace(missing, live, ids, max_replacements)

    def _note_pending(self, connected: bool, queued: dict[str, str], now: float) -> None:
        """Say, at most once a minute, which SLURM jobs the run waits for while none runs."""
        pending = sorted(f"{j} {s}" for j, s in queued.items() if s == "PENDING")
        if not connected and pending and now - self._last_note > 60:
            self._last_note = now
            logger.info("waiting for SLURM jobs to start: %s", ", ".join(pending))

    def _replace(
        self, missing: list[str], live: set[str], ids: dict[str, str], max_replacements: int
    ) -> str | None:
        """Submit replacements for the ended jobs of ``missing`` while the budget allows."""
        if self._replaced + len(missing) > max_replacements:
            if live:
                return None
            last = max(missing, key=lambda n: int(ids[n]))
            return (
                f"no SLURM worker job is running or queued: {self._replaced} replacement jobs "
                f"were used up and job {ids[last]} ended too. {self.explain(last) or ''} "
                f"Job logs: {self.logs}"
            ).strip()
        # Forget the ended jobs so that scale() submits replacements under the same names.
        for name in missing:
            self.cluster.workers.pop(name, None)
            self._replacing[name] = ids[name]
            self._replaced += 1
        logger.warning(
            "SLURM jobs %s ended; submitting %d replacement(s)",
            ", ".join(ids[n] for n in missing),
            len(missing),
        )
        self.cluster.scale(self.sizing.workers)
        return None

    def explain(self, worker_name: str | None, wait: float = 0.0) -> EndReason | None:
        """Why a worker went away, when SLURM said so in the job's log."""
        if self.mode != "slurm" or worker_name is None or self.logs is None:
            return None
        job_id = self.slurm_job_ids().get(str(worker_name))
        if job_id is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            reason = slurm_end_reason(self.logs, job_id)
            if reason or time.monotonic() >= deadline:
                return reason
            time.sleep(0.2)


_active: dict[str, ClusterHandle] = {}
_active_lock = threading.Lock()


def active_cluster(address: str | None) -> ClusterHandle | None:
    """The handle of a cluster opened by :func:`open_cluster` in this process."""
    if address is None:
        return None
    with _active_lock:
        return _active.get(address)


@dataclass
class StartedCluster:
    """A local cluster whose processes were started ahead of the run's plan
    (:func:`start_local_cluster`), not yet waited for."""

    cluster: Any
    workers: int
    env: dict[str, str]
    #: When its start was asked for (epoch seconds).
    requested: float

    def fits(self, req: CacheRequest, sizing: WorkerSizing, api_url: str | None) -> bool:
        """True when the run of ``req`` sized ``sizing`` would start the same workers (their
        count and environment: API URL, log level, cores each; the memory limit of a worker
        started ahead is the request's ``memory_limit``)."""
        return (
            req.deploy_mode == "dask_distributed"
            and req.scheduler_address is None
            and sizing.workers == self.workers
            and self.env == local_environment(req, api_url, sizing.workers)
        )

    def close(self) -> None:
        """Stop the scheduler and kill the worker processes (and their job processes)."""
        self.cluster.close()


def local_environment(req: CacheRequest, api_url: str | None, workers: int) -> dict[str, str]:
    """The environment of ``workers`` local worker processes sharing this machine's cores."""
    return worker_environment(req, api_url, process_cores() // workers)


def start_local_cluster(
    req: CacheRequest, sizing: WorkerSizing, api_url: str | None
) -> StartedCluster:
    """Start a local cluster's scheduler and worker processes without waiting for the workers
    (they import the stack meanwhile): a fraction of a second here."""
    import dask

    requested = time.time()
    env = local_environment(req, api_url, sizing.workers)
    with dask.config.set(CLUSTER_CONFIG):
        cluster = local_cluster(sizing, env, req.log_level)
    try:
        register_prewarm(cluster.scheduler_address, req.source_json())
    except BaseException:
        cluster.close()
        raise
    return StartedCluster(cluster, sizing.workers, env, requested)


@contextmanager
def open_cluster(
    req: CacheRequest,
    version: Path,
    sizing: WorkerSizing,
    api_url: str | None,
    started: StartedCluster | None = None,
) -> Iterator[ClusterHandle]:
    """Start (or connect to) the cluster of a run and close it afterwards.

    Parameters
    ----------
    req
        The request (deploy mode, limits, ``slurm:`` block).
    version
        The version being written (SLURM job logs go to its manifest by default).
    sizing
        How many workers, and how big
        (:func:`~zarr_parallel.orchestration.runners.worker_sizing`).
    api_url
        The flow's Prefect API URL, handed to the workers.
    started
        A local cluster started ahead that :meth:`StartedCluster.fits` the run: waited for and
        used instead of starting one.
    """
    mode = req.deploy_mode
    if mode == "series":
        yield ClusterHandle(mode, None, sizing)
        return
    import dask
    import distributed  # noqa: F401 - its config defaults must exist before dask.config.set

    # Local workers share this machine's cores (SLURM jobs get their own: slurm_cluster_kwargs).
    env = worker_environment(req, api_url, process_cores() // sizing.workers)
    requested = started.requested if started is not None else time.time()
    with dask.config.set(CLUSTER_CONFIG):
        stack_close: list[Any] = [started] if started is not None else []
        try:
            handle = _start(req, version, sizing, api_url, env, stack_close)
        except BaseException:
            for obj in stack_close:
                with suppress(Exception):
                    obj.close()
            raise
    assert handle.address is not None
    handle.started = requested
    handle.ready_seconds = time.time() - requested
    with _active_lock:
        _active[handle.address] = handle
    try:
        yield handle
    finally:
        with _active_lock:
            _active.pop(handle.address, None)
        for obj in stack_close:
            try:
                obj.close()
            except Exception as e:  # closing must not hide the run's own outcome
                logger.warning("closing %s failed: %s", type(obj).__name__, e)
        if handle.mode == "slurm":
            _wait_for_slurm_jobs(handle)


def _wait_for_slurm_jobs(handle: ClusterHandle) -> None:
    """Return only once SLURM has dropped the run's jobs (closing cancelled them)."""
    left = wait_until_gone(set(handle.slurm_job_ids().values()))
    if left:
        logger.warning(
            "SLURM still lists jobs %s after they were cancelled; check them with squeue",
            ", ".join(sorted(left)),
        )


@contextmanager
def cluster_in_background(
    req: CacheRequest,
    version: Path,
    sizing: WorkerSizing,
    api_url: str | None,
    started: StartedCluster | None = None,
) -> Iterator[Callable[[], ClusterHandle]]:
    """:func:`open_cluster` in a thread of its own, so that the caller goes on meanwhile (the
    store is initialised while worker processes start, or finish starting when ``started``
    began during planning); the function yielded waits for the cluster and returns it (or
    raises why it did not start). Closed when the block ends.
    """
    if req.deploy_mode != "dask_distributed":
        # Opened when asked for, after the store is initialised: series has nothing to start;
        # SLURM submits jobs (quick) whose log folder lies inside the version, which
        # initialisation creates (and refuses to find made by anyone else), and dask-jobqueue
        # installs a signal handler when imported, which only the main thread may do.
        with ExitStack() as later:
            opened: list[ClusterHandle] = []

            def get() -> ClusterHandle:
                if not opened:
                    opened.append(later.enter_context(open_cluster(req, version, sizing, api_url)))
                return opened[0]

            yield get
        return
    # Imported here, in the calling thread: module imports with side effects stay off the pool.
    import distributed  # noqa: F401

    stack = ExitStack()
    with ThreadPoolExecutor(1, thread_name_prefix="zarr-parallel-cluster") as pool:
        future = pool.submit(
            stack.enter_context, open_cluster(req, version, sizing, api_url, started)
        )
        try:
            yield future.result
        finally:
            # A start still going must end before the cluster can be closed; a start that
            # failed was either raised by the caller's get() or is beside the caller's own error.
            with suppress(BaseException):
                future.result()
            stack.close()


def _start(
    req: CacheRequest,
    version: Path,
    sizing: WorkerSizing,
    api_url: str | None,
    env: dict[str, str],
    stack_close: list[Any],
) -> ClusterHandle:
    """Start or connect to the cluster; what must be closed goes into ``stack_close`` at once."""
    from distributed import Client

    mode = req.deploy_mode
    if mode == "dask_distributed" and req.scheduler_address:
        client: Any = Client(req.scheduler_address, timeout="60s")  # type: ignore[no-untyped-call]
        stack_close.append(client)
        logger.info("using the dask scheduler at %s", req.scheduler_address)
        return ClusterHandle(mode, req.scheduler_address, sizing, client=client)
    if mode == "dask_distributed":
        if stack_close:  # started ahead, during planning: closed with the rest
            cluster = stack_close[0].cluster
        else:
            cluster = local_cluster(sizing, env, req.log_level)
            stack_close.append(cluster)
            register_prewarm(cluster.scheduler_address, req.source_json())
        cluster.wait_for_workers(sizing.workers, timeout=STARTUP_TIMEOUT)
        return ClusterHandle(mode, cluster.scheduler_address, sizing, cluster=cluster)
    if mode == "slurm":
        if is_loopback(api_url):
            logger.warning(
                "the Prefect API %s is on loopback: SLURM jobs on other nodes cannot reach "
                "it (fine for a single-node SLURM). Set PREFECT_API_URL to a server the "
                "compute nodes reach",
                api_url,
            )
        # dask-jobqueue only here: importing it installs a SIGINT handler (main thread only).
        from dask_jobqueue.slurm import SLURMCluster

        logs = log_directory(req, version)
        logs.mkdir(parents=True, exist_ok=True)
        slurm: Any = SLURMCluster(**slurm_cluster_kwargs(req, sizing, api_url, logs))
        stack_close.append(slurm)
        handle = ClusterHandle(mode, slurm.scheduler_address, sizing, cluster=slurm, logs=logs)
        handle.job_script = slurm.job_script()
        (logs / "job-script.sh").write_text(handle.job_script)
        register_prewarm(slurm.scheduler_address, req.source_json())
        slurm.scale(sizing.workers)
        return handle
    raise ValueError(f"unknown deploy_mode {mode!r}")  # pragma: no cover - validated before


def register_warm(address: str, request_json: str, version: str) -> None:
    """Have the cluster's job processes ready the plan in ``version`` before their first job
    (an optimisation, :mod:`zarr_parallel.run.warm`): workers joining later do it as they join.
    """
    # Deferred: the plugin's module imports distributed, loaded only when a cluster starts.
    from zarr_parallel.orchestration.prewarm import WarmPlugin

    _register(address, WarmPlugin(request_json, version))


def register_prewarm(address: str, source: str | None = None) -> None:
    """Have the cluster's workers import the task module as they join, and their job processes
    open ``source`` (``CacheRequest.source_json``) before the run's first job (an optimisation).
    """
    # Deferred: the plugin's module imports distributed, loaded only when a cluster starts.
    from zarr_parallel.orchestration.prewarm import PrewarmPlugin

    _register(address, PrewarmPlugin(source))


def _register(address: str, plugin: Any) -> None:
    """Register a worker plugin on the cluster at ``address`` (an optimisation: a failure is
    logged, and the jobs do without it)."""
    from distributed import Client

    try:
        with Client(address, timeout="30s") as client:  # type: ignore[no-untyped-call]
            client.register_plugin(plugin)
    except Exception as e:
        logger.debug("could not register the %s plugin: %s", plugin.name, e)
