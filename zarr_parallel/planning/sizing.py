"""How big and how many workers a run gets (docs/design.md §2a, Sizing): pure arithmetic, no I/O.

A *worker* is one dask worker process with its job process (:mod:`zarr_parallel.run.job_process`):
a local worker in ``dask_distributed`` mode, one SLURM job in ``SLURM`` mode. It runs one write
job at a time. ``memory_limit`` bounds a whole worker, so a job's budget is the limit minus the
job process's interpreter reserve (``memory_reserve``) and, outside series mode, the worker
process beside it (:data:`WORKER_OVERHEAD`, :func:`worker_overhead`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zarr_parallel.units import format_bytes

#: Extra share of the largest job estimate a SLURM job asks for (docs/design.md §2a: about 10 %).
MEMORY_MARGIN = 0.10
#: Seconds of walltime beyond the jobs themselves: queue-to-worker start-up and retirement.
WALLTIME_MARGIN = 300.0
#: A worker retires this many seconds before its walltime, so SLURM never kills a running job
#: for time (dask ``--lifetime``; running work moves to a replacement job).
RETIRE_BEFORE = 120.0
#: Resident memory of a dask worker process that runs Prefect tasks, beside its job process.
#: Measured here at 184-189 MB (Python 3.11, Prefect 3.8, distributed 2026.8, after several
#: tasks); counted inside ``memory_limit`` in the dask_distributed and SLURM modes.
WORKER_OVERHEAD = 250 * 10**6


def worker_overhead(deploy_mode: str) -> int:
    """Bytes ``memory_limit`` holds back for the dask worker process beside each job process.

    None in series mode: there the job process is the whole worker (no worker overhead in
    series).

    >>> worker_overhead("series"), worker_overhead("dask_distributed") == WORKER_OVERHEAD
    (0, True)
    """
    return 0 if deploy_mode == "series" else WORKER_OVERHEAD


@dataclass(frozen=True)
class WorkerSizing:
    """What each worker of a run gets.

    Attributes
    ----------
    workers
        Workers at once: ``min(simultaneous_worker_limit or cores, jobs)``.
    memory
        Bytes one worker may hold (a SLURM job's ``--mem``; a local worker's limit).
    walltime
        Seconds a SLURM job asks for: the jobs one worker runs, each within
        ``worker_timeout``, plus :data:`WALLTIME_MARGIN`.
    lifetime
        Seconds after which a SLURM worker retires (``walltime - RETIRE_BEFORE``).
    """

    workers: int
    memory: int
    walltime: float
    lifetime: float


def size_workers(
    *,
    jobs: int,
    max_workers: int,
    max_job_estimate: int,
    memory_limit: int,
    reserve: int,
    worker_overhead: int,
    timeout: float,
    max_walltime: float | None = None,
) -> WorkerSizing:
    """Size the workers of a run.

    Memory: the largest job estimate plus :data:`MEMORY_MARGIN`, the job process's reserve and
    the worker process's overhead, capped at ``memory_limit`` (the planner already kept every
    estimate within the limit minus reserve and overhead).

    >>> s = size_workers(jobs=10, max_workers=4, max_job_estimate=10**9, memory_limit=4 * 10**9,
    ...                  reserve=256 * 10**6, worker_overhead=250 * 10**6, timeout=1800)
    >>> s.workers, s.memory, s.walltime, s.lifetime
    (4, 1606000000, 5700.0, 5580.0)
    >>> size_workers(jobs=1, max_workers=4, max_job_estimate=35 * 10**8, memory_limit=4 * 10**9,
    ...              reserve=256 * 10**6, worker_overhead=250 * 10**6, timeout=60).memory
    4000000000
    """
    workers = max(1, min(max_workers, jobs))
    wanted = math.ceil(max_job_estimate * (1 + MEMORY_MARGIN)) + reserve + worker_overhead
    memory = min(memory_limit, wanted)
    per_worker = math.ceil(max(jobs, 1) / workers)
    walltime = per_worker * timeout + WALLTIME_MARGIN
    if max_walltime is not None:
        walltime = min(walltime, max_walltime)
    lifetime = max(walltime - RETIRE_BEFORE, walltime / 2)
    return WorkerSizing(workers, memory, walltime, lifetime)


def local_workers(
    requested: int | None, cores: int, machine_memory: int, worker_memory: int
) -> tuple[int, str | None]:
    """Local worker processes at once, and a note when that is not what was asked or usual.

    Each local worker may use ``worker_memory`` (``memory_limit``), so no more start than the
    machine's memory holds: more would swap or be killed by the kernel. More workers than cores
    are allowed with a warning, since workers reading remote sources mostly wait on the network.

    >>> local_workers(5000, 2, 25 * 10**9, 2 * 10**9)[0], local_workers(None, 8, 10**10, 10**9)
    (12, (8, None))
    >>> local_workers(6, 2, 10**11, 10**9)[0]
    6
    """
    wanted = requested or cores
    asked = (
        f"simultaneous_worker_limit={requested}" if requested else f"one worker per core ({cores})"
    )
    fit = max(1, machine_memory // max(worker_memory, 1))
    if wanted > fit:
        return fit, (
            f"{asked} local workers of {format_bytes(worker_memory)} (memory_limit) would need "
            f"{format_bytes(wanted * worker_memory)}, more than this machine's "
            f"{format_bytes(machine_memory)}: running {fit} at once"
            + (f" (more than its {cores} cores)" if fit > cores else "")
        )
    if wanted > cores:
        return wanted, (
            f"{asked} runs more local workers than this machine's {cores} cores; that helps "
            "only when reads wait on the network (remote sources)"
        )
    return wanted, None


def slurm_duration(seconds: float) -> str:
    """SLURM's ``--time`` format, rounded up to whole minutes.

    >>> slurm_duration(5700), slurm_duration(61), slurm_duration(90061)
    ('1:35:00', '0:02:00', '25:02:00')
    """
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}:00"
