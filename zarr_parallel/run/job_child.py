"""The job process itself: ``python -m zarr_parallel.run.job_child FD``, started and fed by
:class:`zarr_parallel.run.job_process.JobProcess`.

It imports the job stack once, opens a run's source when told to (before the run's first job),
and runs one job at a time, answering each with its record or its error.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from zarr_parallel.run.job_process import JobError

logger = logging.getLogger(__name__)


def _watch_parent(parent: int) -> None:
    # A worker killed with SIGKILL cannot stop its job process: leave when the parent is gone.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def _portable(error: BaseException) -> bytes:
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(JobError(f"{type(error).__name__}: {error}"))


def _share_cores() -> None:
    """Give zarr's encoding threads this process's cores, unless the user configured them.

    zarr encodes chunks on a thread pool sized by ``threading.max_workers`` (by default, a
    thread per core plus four). Two workers on two cores would each start six: more threads
    than cores, and the time lost switching between them.
    """
    if "ZARR_THREADING__MAX_WORKERS" in os.environ:
        return
    import zarr

    # Deferred like the job stack below: this module is loaded by every dask worker as it joins.
    from zarr_parallel.sources.fastread import process_cores

    zarr.config.set({"threading.max_workers": process_cores()})


def _open_source(source: str) -> None:
    """Open a run's source ahead of its jobs (an optimisation: a failure is the jobs' to report)."""
    # Deferred: the job stack (xarray) loads in the job process only (see serve). The policy
    # module installs the kerchunk-reference check of a policed (deployment) run: a source opened
    # ahead is checked as a job's is.
    from zarr_parallel.request.model import CacheRequest
    from zarr_parallel.run import policy  # noqa: F401
    from zarr_parallel.run.warm import read_indexes_ahead
    from zarr_parallel.sources.target import cached_source

    try:
        req = CacheRequest.model_validate_json(source)
        read_indexes_ahead(cached_source(req), req.open_options.get("group"))
    except Exception as e:
        logger.debug("could not open the source ahead of the jobs: %s", e)


def _warm(payload: dict[str, Any]) -> None:
    """Ready a run's plan ahead of its jobs (an optimisation: a failure is the jobs' to report)."""
    # Deferred: the job stack loads in the job process only (see serve).
    from zarr_parallel.run.warm import warm

    try:
        warm(payload["request_json"], payload["version"])
    except Exception as e:
        logger.debug("could not ready the plan ahead of the jobs: %s", e)


def serve(fd: int) -> None:
    """Serve the worker at the other end of ``fd``: open sources, run jobs, until it stops."""
    conn = Connection(fd)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import resource

    import zarr

    # Deferred: the job stack (xarray, zarr, h5py) loads in the job process only; this module is
    # also loaded by every dask worker as it joins (the prewarm plugin), which must stay quick.
    from zarr_parallel.run.job import prewarm_job_stack, run_job
    from zarr_parallel.sources.fastread import reader_threads

    _share_cores()
    prewarm_job_stack()

    conn.send(("ready", os.getpid()))
    while True:
        try:
            kind, job = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if kind == "open":
            _open_source(job["source"])
            continue
        if kind == "warm":
            _warm(job)
            continue
        level = {0: logging.WARNING, 1: logging.INFO}.get(int(job.pop("log_level", 0)), 10)
        logging.getLogger("zarr_parallel").setLevel(level)
        try:
            record = run_job(**job)
            record["job_process"] = {
                "pid": os.getpid(),
                # The threads it read and encoded with (its share of the cores).
                "readers": reader_threads(),
                "encoders": zarr.config.get("threading.max_workers"),
                # ru_maxrss is in KiB on Linux: the most this process has held so far.
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
            message: tuple[Any, ...] = ("ok", record)
        except BaseException as e:
            message = ("error", _portable(e), traceback.format_exc())
        try:
            conn.send(message)
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    # Serve from the imported module, not ``__main__``, so that errors raised here pickle
    # under their real module path.
    from zarr_parallel.run import job_child

    job_child.serve(int(sys.argv[1]))
