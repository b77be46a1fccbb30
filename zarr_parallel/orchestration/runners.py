"""Where write tasks run, per deploy mode: configuration of Prefect, dask and dask-jobqueue.

``series`` runs tasks in the flow process (one thread); ``dask_distributed`` starts a local dask
cluster (one single-threaded worker process per concurrent job) or connects to
``scheduler_address``; ``SLURM`` starts a dask-jobqueue ``SLURMCluster`` whose jobs are sized
from the plan (:mod:`zarr_parallel.planning.sizing`). The flow owns the cluster
(:func:`open_cluster`) and hands Prefect a ``DaskTaskRunner`` connected to it, so that it can also
watch it: replace SLURM jobs that ended, explain why a worker was lost, and stop waiting when no
worker can come. No chunk arithmetic here.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distributed.diagnostics.plugin import WorkerPlugin

from zarr_parallel.planning.sizing import WorkerSizing, size_workers, slurm_duration
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.job_process import WORKER_OVERHEAD
from zarr_parallel.store.layout import manifest_dir

logger = logging.getLogger(__name__)

#: Seconds without any connected worker after which a local or external cluster is given up.
NO_WORKER_GRACE = 120.0
#: Least seconds between two ``squeue`` calls while some SLURM worker is missing.
SQUEUE_INTERVAL = 5.0
#: Seconds local workers may take to start and connect.
STARTUP_TIMEOUT = 120.0
#: dask's log level per request ``log_level``.
_DASK_LEVELS = {0: "warning", 1: "info", 2: "debug"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def worker_sizing(req: CacheRequest, max_job_estimate: int, jobs: int) -> WorkerSizing:
    """Sizing of this run's workers (checked before anything is written).

    Raises
    ------
    RequestError
        ``slurm.walltime`` leaves no room for one job within ``worker_timeout``.
    """
    from zarr_parallel.errors import RequestError
    from zarr_parallel.planning.sizing import RETIRE_BEFORE
    from zarr_parallel.run.steps import worker_count
    from zarr_parallel.units import format_duration, parse_duration

    overhead = 0 if req.deploy_mode == "series" else WORKER_OVERHEAD
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
    own (DESIGN §6). Within this block they name the flow's API instead.
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

    A worker that finds no API URL would start a temporary Prefect server of its own (DESIGN
    §6), so the URL of the flow's API — the temporary one too — is handed over explicitly.
    ``cores`` becomes ``ZARR_PARALLEL_THREADS``: workers sharing a node each get their share,
    so that their readers and encoders do not start a thread per core of the whole node. A
    ``ZARR_PARALLEL_THREADS`` set in the flow's environment wins (the user knows the nodes).
    """
    env = {
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "DASK_LOGGING__DISTRIBUTED": _DASK_LEVELS.get(req.log_level, "warning"),
        "ZARR_PARALLEL_THREADS": os.environ.get("ZARR_PARALLEL_THREADS") or str(max(1, cores)),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def is_loopback(url: str | None) -> bool:
    """True when ``url`` points at this machine only."""
    return bool(url) and (urlparse(str(url)).hostname or "") in _LOOPBACK


def log_directory(req: CacheRequest, version: Path) -> Path:
    """Where SLURM job scripts write their output: ``slurm.log_directory`` or the manifest's."""
    if req.slurm.log_directory:
        return Path(req.slurm.log_directory).expanduser()
    return manifest_dir(version) / "slurm-logs"


def slurm_cluster_kwargs(
    req: CacheRequest, sizing: WorkerSizing, api_url: str | None, logs: Path
) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for this run.

    One worker process per SLURM job, one thread, ``--mem`` from the plan's largest job,
    ``--time`` from ``worker_timeout``, workers retiring before the walltime, the environment
    in the job script's prologue, and the site's partition, account, QOS, directives and
    prologue from the request's ``slurm:`` block.
    """
    s = req.slurm
    # A SLURM job has the cores it asked for (--cpus-per-task), whatever the node has.
    env = worker_environment(req, api_url, s.cores)
    prologue = [*s.prologue, *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))]
    directives = [*([f"--qos={s.qos}"] if s.qos else []), *s.directives]
    mem_mib = -(-sizing.memory // 2**20)
    scheduler_options: dict[str, Any] = {"allowed_failures": 0, "dashboard_address": None}
    if s.interface:
        scheduler_options["interface"] = s.interface
    return {
        "cores": s.cores,
        "processes": 1,
        "memory": str(sizing.memory),
        # dask-jobqueue rounds --mem up to whole GiB above 1 GiB; ask for what was derived.
        "job_mem": f"{mem_mib}M",
        "walltime": slurm_duration(sizing.walltime),
        "queue": s.partition,
        "account": s.account,
        "job_extra_directives": directives,
        "job_script_prologue": prologue,
        "interface": s.interface,
        "log_directory": str(logs),
        "job_name": "zarr-parallel",
        "python": sys.executable,
        # The job process lives beside the worker; a nanny would only add memory to the job.
        "nanny": False,
        # A worker whose flow is gone stops, and so does its SLURM job.
        "death_timeout": 60,
        "worker_extra_args": [
            "--lifetime",
            f"{int(sizing.lifetime)}s",
            "--lifetime-stagger",
            "10s",
        ],
        "scheduler_options": scheduler_options,
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
            if not workers and now - self._last_worker > NO_WORKER_GRACE:
                return (
                    f"no dask worker has been connected to {self.address} for "
                    f"{NO_WORKER_GRACE:.0f} s; start workers or check the scheduler"
                )
            return None
        ids = self.slurm_job_ids()
        if len(names) >= self.sizing.workers:
            return None  # all workers connected: nothing to ask SLURM
        if now - self._squeue_at < SQUEUE_INTERVAL:
            return None
        self._squeue_at = now
        queued = squeue_states(set(ids.values()))
        if not workers and not queued and now - self._last_worker > NO_WORKER_GRACE:
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
            pending = sorted(f"{j} {s}" for j, s in queued.items() if s == "PENDING")
            if not workers and pending and now - self._last_note > 60:
                self._last_note = now
                logger.info("waiting for SLURM jobs to start: %s", ", ".join(pending))
            return None
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


_MEM_RE = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")


@dataclass(frozen=True)
class EndReason:
    """Why SLURM ended a worker job: ``kind`` is memory, walltime or cancelled."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


def slurm_end_reason(logs: Path, job_id: str) -> EndReason | None:
    """What SLURM wrote about the end of job ``job_id`` in its log."""
    from zarr_parallel.units import format_bytes

    text = ""
    for path in logs.glob(f"*-{job_id}.err"):
        try:
            text += path.read_text(errors="replace")
        except OSError:
            continue
    if not text:
        return None
    m = _MEM_RE.search(text)
    if m or "Exceeded job memory limit" in text:
        used = f" ({format_bytes(int(m.group(1)))} > {format_bytes(int(m.group(2)))})" if m else ""
        return EndReason(
            "memory",
            f"SLURM job {job_id} was killed by SLURM for exceeding its memory limit{used}: "
            "the job used more than its estimate; raise memory_limit or report the request",
        )
    if "DUE TO TIME LIMIT" in text:
        return EndReason("walltime", f"SLURM job {job_id} was killed by SLURM at its walltime")
    if "CANCELLED" in text:
        return EndReason(
            "cancelled", f"SLURM job {job_id} was cancelled (scancel, preemption or node failure)"
        )
    return None


def squeue_states(job_ids: set[str]) -> dict[str, str]:
    """State of each of ``job_ids`` still known to ``squeue`` (PENDING, RUNNING...)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        # squeue unreachable: assume the jobs live rather than replace them blindly.
        return dict.fromkeys(job_ids, "UNKNOWN")
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in job_ids:
            states[parts[0]] = parts[1]
    return states


_active: dict[str, ClusterHandle] = {}
_active_lock = threading.Lock()


def active_cluster(address: str | None) -> ClusterHandle | None:
    """The handle of a cluster opened by :func:`open_cluster` in this process."""
    if address is None:
        return None
    with _active_lock:
        return _active.get(address)


@contextmanager
def open_cluster(
    req: CacheRequest, version: Path, sizing: WorkerSizing, api_url: str | None
) -> Iterator[ClusterHandle]:
    """Start (or connect to) the cluster of a run and close it afterwards.

    Parameters
    ----------
    req
        The request (deploy mode, limits, ``slurm:`` block).
    version
        The version being written (SLURM job logs go to its manifest by default).
    sizing
        How many workers, and how big (:func:`worker_sizing`).
    api_url
        The flow's Prefect API URL, handed to the workers.
    """
    import dask
    import distributed  # noqa: F401 - its config defaults must exist before dask.config.set

    mode = req.deploy_mode
    if mode == "series":
        yield ClusterHandle(mode, None, sizing)
        return
    from zarr_parallel.sources.fastread import process_cores

    # Local workers share this machine's cores (SLURM jobs get their own, above).
    env = worker_environment(req, api_url, process_cores() // sizing.workers)
    t0 = time.monotonic()
    # Quiet dask in this process as well, and let a dead worker's task fail at once (it then
    # becomes a Prefect retry) instead of being re-run up to three times behind Prefect's back.
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 0,
            "distributed.deploy.lost-worker-timeout": "2s",
            # Hand a worker a task only when its thread is free, so that a worker that dies
            # takes no queued task down with it and a slow job holds no other back.
            "distributed.scheduler.worker-saturation": 1.0,
        }
    ):
        stack_close: list[Any] = []
        try:
            handle = _start(req, version, sizing, api_url, env, stack_close)
        except BaseException:
            for obj in stack_close:
                with suppress(Exception):
                    obj.close()
            raise
    assert handle.address is not None
    handle.ready_seconds = time.monotonic() - t0
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


def _start(
    req: CacheRequest,
    version: Path,
    sizing: WorkerSizing,
    api_url: str | None,
    env: dict[str, str],
    stack_close: list[Any],
) -> ClusterHandle:
    """Start or connect to the cluster; what must be closed goes into ``stack_close`` at once."""
    mode = req.deploy_mode
    if mode == "dask_distributed" and req.scheduler_address:
        from distributed import Client

        client: Any = Client(req.scheduler_address, timeout="60s")  # type: ignore[no-untyped-call]
        stack_close.append(client)
        logger.info("using the dask scheduler at %s", req.scheduler_address)
        return ClusterHandle(mode, req.scheduler_address, sizing, client=client)
    if mode == "dask_distributed":
        cluster = _local_cluster(sizing, env, req.log_level)
        stack_close.append(cluster)
        _register_prewarm(cluster.scheduler_address)
        cluster.wait_for_workers(sizing.workers, timeout=STARTUP_TIMEOUT)
        return ClusterHandle(mode, cluster.scheduler_address, sizing, cluster=cluster)
    if mode == "slurm":
        from dask_jobqueue.slurm import SLURMCluster

        if is_loopback(api_url):
            logger.warning(
                "the Prefect API %s is on loopback: SLURM jobs on other nodes cannot reach "
                "it (fine for a single-node SLURM). Set PREFECT_API_URL to a server the "
                "compute nodes reach",
                api_url,
            )
        logs = log_directory(req, version)
        logs.mkdir(parents=True, exist_ok=True)
        slurm: Any = SLURMCluster(**slurm_cluster_kwargs(req, sizing, api_url, logs))
        stack_close.append(slurm)
        handle = ClusterHandle(mode, slurm.scheduler_address, sizing, cluster=slurm, logs=logs)
        handle.job_script = slurm.job_script()
        (logs / "job-script.sh").write_text(handle.job_script)
        _register_prewarm(slurm.scheduler_address)
        slurm.scale(sizing.workers)
        return handle
    raise ValueError(f"unknown deploy_mode {mode!r}")  # pragma: no cover - validated before


def _local_cluster(sizing: WorkerSizing, env: dict[str, str], log_level: int) -> Any:
    """A local dask cluster: the scheduler in this process, one worker process per job slot.

    This is ``LocalCluster(processes=True, threads_per_worker=1)`` with one difference: each
    worker is started as ``python -m dask spec`` (dask's ``SubprocessWorker``) rather than by
    multiprocessing's *spawn*, which re-imports the caller's ``__main__`` in every worker and so
    breaks (or re-runs) any script that calls ``cache()`` outside ``if __name__ ==
    "__main__":``. The nanny inside restarts a worker process that dies.
    """
    from distributed import Scheduler
    from distributed.deploy.spec import SpecCluster
    from distributed.deploy.subprocess import SubprocessWorker

    level = {0: logging.WARNING, 1: logging.INFO}.get(log_level, logging.DEBUG)
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "port": 0, "dashboard": False, "allowed_failures": 0},
    }
    workers = {
        f"worker-{i}": {
            "cls": SubprocessWorker,
            "options": {
                "worker_class": "distributed.Nanny",
                "worker_kwargs": {
                    "name": f"worker-{i}",
                    "host": "127.0.0.1",
                    "nthreads": 1,
                    "memory_limit": sizing.memory,
                    "silence_logs": level,
                    "env": env,
                },
            },
        }
        for i in range(sizing.workers)
    }
    return SpecCluster(  # type: ignore[no-untyped-call]
        workers=workers,
        scheduler=scheduler,
        name="zarr-parallel",
        silence_logs=level,
    )


def _prewarm() -> None:
    import zarr_parallel.orchestration.tasks  # noqa: F401 - Prefect and the task module, before the first task
    from zarr_parallel.run.job_process import prewarm

    prewarm()


class PrewarmPlugin(WorkerPlugin):
    """dask worker plugin: import the task code and start the job process as a worker joins,
    so that the first write task does not wait for them."""

    name = "zarr-parallel-prewarm"

    def setup(self, worker: Any) -> None:
        threading.Thread(target=_prewarm, name="zarr-parallel-prewarm", daemon=True).start()

    def teardown(self, worker: Any) -> None:
        # The worker is closing: its job processes go now, a busy one too (the scheduler has
        # given its job to another worker), and it starts no more. And the worker must really
        # end: SLURM workers (no nanny) were seen stuck after a scancel, cancelling event-loop
        # tasks for ever, outliving their job where SLURM tracks processes by parentage
        # (proctrack/linuxproc) and holding their memory on the node.
        from zarr_parallel.run import job_process as execution

        execution.close_worker()
        threading.Thread(
            target=_exit_after, args=(EXIT_GRACE_SECONDS,), name="zarr-parallel-exit", daemon=True
        ).start()


#: Seconds a closing worker gets to exit by itself before it is ended (``os._exit``).
EXIT_GRACE_SECONDS = 30.0


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.warning(
        "worker pid %d still running %.0f s after closing: ending it", os.getpid(), seconds
    )
    logging.shutdown()
    os._exit(0)


def _register_prewarm(address: str) -> None:
    from distributed import Client

    try:
        with Client(address, timeout="30s") as client:  # type: ignore[no-untyped-call]
            client.register_plugin(PrewarmPlugin())
    except Exception as e:  # an optimisation only
        logger.debug("could not register the prewarm plugin: %s", e)


def make_task_runner(handle: ClusterHandle) -> Any:
    """The Prefect task runner that executes this run's write tasks on ``handle``'s cluster."""
    if handle.mode == "series":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask.task_runners import DaskTaskRunner

    return DaskTaskRunner(address=handle.address)


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
