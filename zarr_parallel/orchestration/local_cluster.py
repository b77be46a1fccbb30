"""The local dask cluster of a ``dask_distributed`` run: its scheduler in the flow's process, one
worker process (under a nanny) per job slot, each started as ``python -m dask spec``.

distributed is imported only when a cluster starts.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from zarr_parallel.planning.sizing import WorkerSizing


def local_cluster(sizing: WorkerSizing, env: dict[str, str], log_level: int) -> Any:
    """A local dask cluster: the scheduler in this process, one worker process per job slot.

    This is ``LocalCluster(processes=True, threads_per_worker=1)`` with one difference: each
    worker is started as ``python -m dask spec`` (dask's ``SubprocessWorker``) rather than by
    multiprocessing's *spawn*, which re-imports the caller's ``__main__`` in every worker and so
    breaks (or re-runs) any script that calls ``cache()`` outside ``if __name__ ==
    "__main__":``. The nanny inside restarts a worker process that dies. Both the nanny and the
    worker get ``env``, its quiet dask settings included (:func:`_spec_worker_class`).
    """
    from distributed import Scheduler
    from distributed.deploy.spec import SpecCluster

    level = {0: logging.WARNING, 1: logging.INFO}.get(log_level, logging.DEBUG)
    # No dashboard; the scheduler's HTTP server (health and metrics routes) listens on a free
    # loopback port rather than dask's 8787, which another cluster may hold ("Port 8787 is
    # already in use" would be printed at every log level).
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": 0,
            "dashboard": False,
            "dashboard_address": "127.0.0.1:0",
            "allowed_failures": 0,
        },
    }
    workers = {
        f"worker-{i}": {
            "cls": _spec_worker_class(),
            "options": {
                "env": env,
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


@lru_cache(maxsize=1)
def _spec_worker_class() -> type:
    """dask's ``SubprocessWorker``, its ``python -m dask spec`` process started with the worker
    environment (dask's own passes none on).

    The nanny in that process reads its dask settings (:data:`~zarr_parallel.orchestration.
    runners.QUIET_DASK_ENV`) from there, and hands its whole configuration to the worker
    process it spawns, over whatever that process's environment says.
    """
    import asyncio
    import json
    import sys

    from distributed.deploy.subprocess import SubprocessWorker

    class EnvSubprocessWorker(SubprocessWorker):
        def __init__(self, *args: Any, env: dict[str, str], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.env = env

        async def _start(self) -> None:
            # As SubprocessWorker._start (distributed 2026.8), plus env.
            spec = {"cls": self.worker_class, "opts": {**self.worker_kwargs}}
            cmd = [sys.executable, "-m", "dask", "spec", self.scheduler, "--spec"]
            self.process = await asyncio.create_subprocess_exec(
                *cmd, json.dumps(spec), env={**os.environ, **self.env}
            )

    return EnvSubprocessWorker


__all__ = ["local_cluster"]
