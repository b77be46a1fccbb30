"""Run write jobs in a long-lived child process, under a real deadline and memory limit.

A Prefect ``timeout_seconds`` on a synchronous task marks the run timed out but leaves its thread
running (docs/design.md §6), and a thread cannot be stopped from outside. So every write job of the
dask_distributed and SLURM modes runs in a *job process*: a child of the worker that imports the
libraries once and keeps its per-process caches of the opened source and target
(:func:`zarr_parallel.sources.target.cached_target`) from job to job. The worker sends it one job at
a time and waits with a deadline; a job that passes ``worker_timeout`` (or, where the caller asks,
grows past a memory limit) has its process killed — for real — and replaced, and the caller sees
:class:`JobTimedOut` (or :class:`JobMemoryExceeded`), which Prefect turns into a retry.

The job process holds no Prefect code: it cannot start a Prefect server of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

import psutil

from zarr_parallel.errors import ZarrParallelError
from zarr_parallel.planning.sizing import WORKER_OVERHEAD
from zarr_parallel.units import format_bytes, format_duration

logger = logging.getLogger(__name__)

#: Seconds a new job process may take to import its libraries (slow shared filesystems).
STARTUP_TIMEOUT = 300.0
#: How often the worker checks the job process's deadline and memory, in seconds.
POLL_INTERVAL = 0.1


def job_process_limit(deploy_mode: str, memory_limit: int) -> int | None:
    """Bytes a job process may hold before it is killed; None where SLURM enforces the limit.

    In series mode the job process is the whole worker; beside a dask worker process it gets
    the limit less :data:`WORKER_OVERHEAD`; in a SLURM job, SLURM itself polices ``--mem``.
    """
    if deploy_mode == "slurm":
        return None
    if deploy_mode == "series":
        return memory_limit
    return max(memory_limit - WORKER_OVERHEAD, memory_limit // 2)


class JobInterrupted(ZarrParallelError):
    """A write job was stopped before it finished; its chunks are rewritten on retry."""


class JobTimedOut(JobInterrupted):
    """The job passed its deadline; its process was killed."""


class JobMemoryExceeded(JobInterrupted):
    """The job process grew past its memory limit and was killed (not retried)."""


class JobProcessDied(JobInterrupted):
    """The job process ended without an answer (killed from outside, or crashed)."""


class WorkerClosing(JobInterrupted):
    """This worker is closing (its run ended, its SLURM job was cancelled or reached its
    lifetime): it starts no job, and the job it was running was stopped. The scheduler has
    given the work to another worker; a retry here would only run it twice at once."""


class JobError(ZarrParallelError):
    """A job raised an exception that could not be carried across processes as it was."""


class JobProcess:
    """One long-lived job process and the connection to it.

    Parameters
    ----------
    env
        Extra environment variables for the process (it inherits the caller's).
    source
        A run's source (a request's source fields, JSON) for the process to open as soon as it
        has started, before any job of the run arrives (:func:`reserve`).
    """

    def __init__(self, env: dict[str, str] | None = None, source: str | None = None) -> None:
        self._env = env or {}
        self._source = source
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._starting = threading.Lock()
        # Messages go out one at a time (a warming thread and the job's thread share the
        # connection); those queued before the process is ready follow its source's opening.
        self._sending = threading.Lock()
        self._ready = False
        self._queued: list[tuple[str, dict[str, Any]]] = []
        self._jobs_sent = 0
        self._started_env: dict[str, str] = {}
        self.jobs_run = 0

    @property
    def pid(self) -> int | None:
        """The process id, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the process and wait until it has imported the write path."""
        with self._starting:  # a prewarming thread may be starting it already
            if self.alive() and self._started_env != self._environment():
                # The caller's environment changed (credentials, PYTHONPATH...): a process
                # started before would read the source with the old one.
                self.close()
            if not self.alive():
                self._start(timeout)

    def _environment(self) -> dict[str, str]:
        return {
            **os.environ,
            **self._env,
            "ZARR_PARALLEL_JOB_PROCESS": "1",
            "ZARR_PARALLEL_WORKER_PID": str(os.getpid()),
        }

    def _start(self, timeout: float) -> None:
        ours, theirs = socket.socketpair()
        env = self._started_env = self._environment()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "zarr_parallel.run.job_child", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        t0 = time.monotonic()
        while not self._conn.poll(POLL_INTERVAL):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reset()
                raise JobProcessDied(f"the job process exited while starting ({_exit_text(code)})")
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise JobProcessDied(f"the job process did not start within {timeout:.0f} s")
        try:
            kind, _ = self._conn.recv()
        except (EOFError, OSError) as e:
            self.kill()
            raise JobProcessDied("the job process closed its connection while starting") from e
        if kind != "ready":  # pragma: no cover - protocol error
            self.kill()
            raise JobProcessDied(f"unexpected first message {kind!r} from the job process")
        with self._sending:
            self._ready = True
            if self._source is not None:
                # Sent under the start lock, so before any job's message; no answer comes. A
                # job arriving meanwhile waits for the opening, which it would have done itself.
                self._conn.send(("open", {"source": self._source}))
            self._send_queued()

    def queue(self, kind: str, payload: dict[str, Any]) -> bool:
        """Have the process do ``kind`` (``"warm"``) before its first job: sent by
        :meth:`flush`, at its start, or before that job, whichever comes first. False (and
        nothing queued) once a job has been sent: it would only delay the next one."""
        with self._sending:
            if self._jobs_sent:
                return False
            self._queued.append((kind, payload))
            return True

    def flush(self) -> None:
        """Send the queued messages now if the process is ready (else its start sends them)."""
        with self._sending:
            self._send_queued()

    def _send_queued(self) -> None:
        if not self._ready or self._conn is None:
            return
        queued, self._queued = self._queued, []
        for message in queued:
            try:
                self._conn.send(message)
            except OSError as e:  # the job, or the next start, reports a dead process
                logger.debug("could not send %s to the job process: %s", message[0], e)
                return

    def run(
        self,
        job: dict[str, Any],
        timeout: float,
        memory_limit: int | None = None,
        describe: str = "",
    ) -> dict[str, Any]:
        """Run one job (keyword arguments of :func:`zarr_parallel.run.job.run_job`).

        Returns the job's record, with ``job_process`` (pid, reader and encoder threads, peak
        RSS) added.

        Raises
        ------
        JobTimedOut
            The job passed ``timeout`` seconds; the process was killed.
        JobMemoryExceeded
            The process's resident memory passed ``memory_limit``; it was killed.
        JobProcessDied
            The process ended without answering (killed from outside, or crashed).
        Exception
            Whatever the job raised (the original type where it can be carried over).
        """
        self.start()
        assert self._proc is not None and self._conn is not None
        if _closing.is_set():  # closed while this process was starting
            self.kill()
            raise WorkerClosing("this worker is closing: it starts no more jobs")
        what = describe or f"job {job.get('job_id')}"
        proc = psutil.Process(self._proc.pid)
        try:
            with self._sending:
                self._send_queued()
                self._jobs_sent += 1
                self._conn.send(("run", job))
        except OSError as e:
            self.kill()
            raise JobProcessDied(f"{what}: the job process is gone ({e})") from e
        t0 = time.monotonic()
        deadline = t0 + timeout
        peak = 0
        while True:
            try:
                ready = self._conn.poll(POLL_INTERVAL)
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    kind, payload, *rest = self._conn.recv()
                except (EOFError, OSError):
                    code = self._wait_exit()
                    self._reset()
                    raise JobProcessDied(
                        f"{what}: the job process died after "
                        f"{format_duration(time.monotonic() - t0)} ({_exit_text(code)})"
                    ) from None
                break
            now = time.monotonic()
            if now >= deadline:
                self.kill()
                raise JobTimedOut(
                    f"{what} did not finish within worker_timeout={format_duration(timeout)}; "
                    "its process was killed"
                )
            if memory_limit is not None:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                peak = max(peak, rss)
                if rss > memory_limit:
                    self.kill()
                    raise JobMemoryExceeded(
                        f"{what} used {format_bytes(rss)}, more than its limit of "
                        f"{format_bytes(memory_limit)}; its process was killed. The job "
                        "outgrew its memory estimate: raise memory_limit, or report the request"
                    )
        self.jobs_run += 1
        if kind == "ok":
            return dict(payload)
        error: BaseException
        try:
            error = pickle.loads(payload)
        except Exception:
            error = JobError(str(rest[0] if rest else payload))
        if rest and isinstance(error, Exception):
            error.add_note(f"in the job process:\n{rest[0]}")
        raise error

    def _wait_exit(self) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def interrupt(self) -> None:
        """SIGKILL the process from another thread; the thread running its job sees it end
        (:class:`JobProcessDied`) and cleans up."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        """Kill the process (SIGKILL) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reset()

    def close(self) -> None:
        """Ask the process to stop; kill it if it does not."""
        if self._conn is not None and self.alive():
            with suppress(OSError):
                self._conn.send(("stop", None))
            try:
                assert self._proc is not None
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _reset(self) -> None:
        self._ready = False
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._proc = None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by {name}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------
# A pool per process: one job process per thread that runs jobs at once (one, on our workers).

_idle: list[JobProcess] = []
_busy: set[JobProcess] = set()
_lock = threading.Lock()
_closing = threading.Event()


@contextmanager
def job_process() -> Iterator[JobProcess]:
    """A job process for the calling thread: reused when idle, started when none is.

    Raises
    ------
    WorkerClosing
        This process is closing (:func:`close_worker`).
    """
    with _lock:
        if _closing.is_set():
            raise WorkerClosing("this worker is closing: it starts no more jobs")
        proc = _idle.pop() if _idle else JobProcess()
        _busy.add(proc)
    try:
        yield proc
    except JobProcessDied as e:
        if _closing.is_set():
            raise WorkerClosing(f"this worker is closing: its job was stopped ({e})") from e
        raise
    finally:
        with _lock:
            _busy.discard(proc)
            if not _closing.is_set():
                _idle.append(proc)


def closing() -> bool:
    """True once this process is closing (:func:`close_worker`)."""
    return _closing.is_set()


def close_worker() -> None:
    """This worker is closing: stop its job processes, the busy one too, and start no more.

    A dask worker that closes while it runs a job (its run ended, its SLURM job was cancelled
    or reached its ``--lifetime``) has been removed by the scheduler, which gives the job to
    another worker. The job must not go on writing here meanwhile, nor be retried here: two
    attempts of one job would write the same chunks at once. Its process is killed; its
    chunks are written again by the other attempt (a job's record is written only at its end).
    """
    with _lock:
        _closing.set()
        idle, _idle[:] = list(_idle), []
        busy = list(_busy)
    for proc in idle:
        proc.kill()
    for proc in busy:
        proc.interrupt()


def reserve(source: str | None = None) -> JobProcess | None:
    """A job process for this process's first job, made idle (not yet started, see
    :func:`start_reserved`) at once, so that a :func:`warm` right after finds it; None when this
    process has one or is closing.

    ``source`` (a request's source fields, JSON: ``CacheRequest.source_json``) is opened by the
    job process as soon as it has started, while the run still plans: its first job then finds
    it open, as every later job does.
    """
    with _lock:
        if _idle or _closing.is_set():
            return None
        proc = JobProcess(source=source)
        _idle.append(proc)
        return proc


def start_reserved(proc: JobProcess) -> None:
    """Start a job process from :func:`reserve` (a failure is the first job's to report)."""
    try:
        proc.start()
    except JobInterrupted as e:  # the first job will try again and report it
        logger.warning("could not start a job process ahead of time: %s", e)


def warm(request_json: str, version: str) -> list[JobProcess]:
    """Have this process's idle job processes ready the plan in ``version`` before their first
    job (:func:`zarr_parallel.run.warm.warm`); returns those it was queued for. Call
    :meth:`JobProcess.flush` on them (off the event loop: it may wait on a full pipe)."""
    payload = {"request_json": request_json, "version": version}
    with _lock:
        procs = [] if _closing.is_set() else list(_idle)
    return [proc for proc in procs if proc.queue("warm", payload)]


def run_job_isolated(
    request_json: str,
    version: str,
    job_id: int,
    generate_stats: bool,
    timeout: float,
    memory_limit: int | None = None,
    describe: str = "",
    log_level: int = 0,
    fence: str | None = None,
) -> dict[str, Any]:
    """Run :func:`zarr_parallel.run.job.run_job` in this process's job process, with a deadline.

    ``fence`` is the run's lock token, which the job checks before it records.
    """
    job = {
        "request_json": request_json,
        "version": version,
        "job_id": job_id,
        "generate_stats": generate_stats,
        "log_level": log_level,
        "fence": fence,
    }
    with job_process() as proc:
        return proc.run(job, timeout, memory_limit, describe)


def shutdown() -> None:
    """Stop every idle job process of this process (they also stop when it exits)."""
    with _lock:
        procs, _idle[:] = list(_idle), []
    for proc in procs:
        proc.close()


atexit.register(shutdown)
