"""Whether a fast-path job reads its next slab while this one is written.

Overlapping the two stages fills the time reading waits on a cold or remote file system. Where
nothing waits (chunks in the page cache, every core of the process already busy), the stages
only take turns on the same cores: on a 2-core host, reading and writing in turn made the data
phase 3.7 % shorter in series mode and about 2.5 % on a local cluster (docs/benchmarks.md,
"December 7, night"). A job measures the idle time of its cores over its first slab's read
(:func:`core_times` before and after) and overlaps only where there was some to fill
(:func:`overlaps`).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: Idle share of its cores, over the first slab's read, from which writing overlaps reading.
IDLE_TO_OVERLAP = 0.25

#: Idle and total clock ticks of some cores so far, from ``/proc/stat``.
CoreTimes = tuple[int, int]


def core_times(cpus: frozenset[int] | None = None) -> CoreTimes | None:
    """Idle (idle and I/O wait) and total clock ticks of ``cpus`` (default: the ones this
    process may run on) since boot; None where ``/proc/stat`` cannot be read (not Linux).

    The cores' idle time, rather than this process's CPU time, says whether another stage
    would find a free core: a process on cores that other processes keep busy waits as much
    as one whose file system is slow, but only the second leaves cores idle. Time stolen by
    the hypervisor counts as busy.
    """
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        allowed = cpus if cpus is not None else frozenset(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return None
    idle = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in allowed:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        ticks = [int(v) for v in rest.split()[:8]]
        idle += ticks[3] + ticks[4]
        total += sum(ticks)
    return idle, total


def overlaps(before: CoreTimes | None, after: CoreTimes | None) -> bool:
    """Whether to overlap writing with reading, from :func:`core_times` around a slab's read.

    True where the cores were idle for at least :data:`IDLE_TO_OVERLAP` of the read, and where
    nothing could be measured (no ``/proc/stat``, or a read shorter than a clock tick: then the
    choice costs nothing).

    >>> overlaps((100, 1000), (150, 1100)), overlaps((100, 1000), (105, 1100))
    (True, False)
    """
    if before is None or after is None or after[1] <= before[1]:
        return True
    idle = (after[0] - before[0]) / (after[1] - before[1])
    logger.debug(
        "first slab read: cores %.0f %% idle, writes %s",
        100 * idle,
        "overlapped" if idle >= IDLE_TO_OVERLAP else "in turn",
    )
    return idle >= IDLE_TO_OVERLAP


__all__ = ["IDLE_TO_OVERLAP", "core_times", "overlaps"]
