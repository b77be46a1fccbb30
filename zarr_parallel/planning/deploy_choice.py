"""What ``deploy_mode="auto"`` chooses (docs/design.md §2b, Start-up and the default mode).

A pure function over a few figures of the plan and the machine, written as a table of rules
read top to bottom: the first rule that matches decides, and its sentence says why. ``auto``
never chooses SLURM (a cluster is asked for, never guessed); it chooses ``dask_distributed``
when a scheduler is named, and otherwise series unless a local cluster of worker processes
can pay for its start (about 3 s and 10 CPU seconds here: two worker processes and their job
processes importing the stack).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zarr_parallel.units import format_bytes

#: A plan that writes less than this is done by one process before a local cluster would be
#: ready: at ~150 MB/s per process a second process saves at most half of ~7 s, while the
#: cluster's start costs ~3 s of wall time and ~10 CPU s on the same cores.
SMALL_PLAN_BYTES = 10**9
#: Cores one process keeps busy on its own: the fast HDF5 path reads and inflates chunks in
#: :data:`~zarr_parallel.planning.memory.FAST_READ_THREADS` threads while zarr encodes in
#: others, so on a machine with this many cores a second process only competes for them.
ONE_PROCESS_CORES = 2


@dataclass(frozen=True)
class ModeFacts:
    """What the choice looks at.

    Attributes
    ----------
    scheduler_address
        True when the request names a dask scheduler.
    cores
        Cores this process may use.
    local_workers
        Local worker processes of ``memory_limit`` the machine's memory holds at once.
    jobs
        Jobs of the plan (planned for one process).
    write_bytes
        Bytes the plan writes.
    """

    scheduler_address: bool
    cores: int
    local_workers: int
    jobs: int
    write_bytes: int


@dataclass(frozen=True)
class ModeChoice:
    """The deploy mode chosen, and one sentence saying why."""

    mode: str
    reason: str


Rule = tuple[str, Callable[[ModeFacts], bool], str, Callable[[ModeFacts], str]]

#: The rules, first match wins: (name, applies, mode, reason).
RULES: tuple[Rule, ...] = (
    (
        "scheduler",
        lambda f: f.scheduler_address,
        "dask_distributed",
        lambda f: "scheduler_address names a dask scheduler: the jobs run on its workers",
    ),
    (
        "one job",
        lambda f: f.jobs <= 1,
        "series",
        lambda f: "the plan has one job: a cluster of worker processes would have nothing to share",
    ),
    (
        "small plan",
        lambda f: f.write_bytes < SMALL_PLAN_BYTES,
        "series",
        lambda f: (
            f"the plan writes {format_bytes(f.write_bytes)}, less than "
            f"{format_bytes(SMALL_PLAN_BYTES)}: one process finishes it before a local cluster "
            "would be ready"
        ),
    ),
    (
        "few cores",
        lambda f: f.cores <= ONE_PROCESS_CORES,
        "series",
        lambda f: (
            f"this machine gives {f.cores} core(s), which one process's reader and "
            "encoder threads already keep busy"
        ),
    ),
    (
        "memory",
        lambda f: f.local_workers <= 1,
        "series",
        lambda f: "this machine's memory holds one worker of memory_limit at a time",
    ),
    (
        "cluster",
        lambda f: True,
        "dask_distributed",
        lambda f: (
            f"{f.jobs} jobs writing {format_bytes(f.write_bytes)} on {f.cores} cores: "
            f"a local cluster of {min(f.cores, f.local_workers, f.jobs)} worker processes"
        ),
    ),
)


def choose_deploy_mode(facts: ModeFacts) -> ModeChoice:
    """The deploy mode ``auto`` runs, by the first rule of :data:`RULES` that applies.

    >>> facts = ModeFacts(False, cores=2, local_workers=4, jobs=3, write_bytes=6 * 10**6)
    >>> choose_deploy_mode(facts).mode
    'series'
    >>> big = ModeFacts(False, cores=16, local_workers=16, jobs=40, write_bytes=4 * 10**9)
    >>> choose_deploy_mode(big).mode
    'dask_distributed'
    """
    for _name, applies, mode, reason in RULES:
        if applies(facts):
            return ModeChoice(mode, reason(facts))
    raise AssertionError("the last rule always applies")  # pragma: no cover


__all__ = [
    "ONE_PROCESS_CORES",
    "RULES",
    "SMALL_PLAN_BYTES",
    "ModeChoice",
    "ModeFacts",
    "choose_deploy_mode",
]
