"""Whether a job overlaps writing with reading (zarr_parallel/run/overlap.py), from real
``/proc/stat`` figures and from given ones."""

from __future__ import annotations

import os
import time

import pytest

from zarr_parallel.run.overlap import IDLE_TO_OVERLAP, core_times, overlaps


def test_the_cores_ticks_are_read_for_this_processes_cores_only() -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    before = core_times()
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:  # at least one core busy for 10 clock ticks
        pass
    after = core_times()
    assert before is not None and after is not None
    assert 0 <= before[0] <= before[1] and after[1] > before[1] and after[0] >= before[0]
    # One core of several counts less than all of them; a core this process cannot use, none.
    one = core_times(frozenset([min(cpus)]))
    assert one is not None and 0 < one[1] <= after[1]
    assert core_times(frozenset([10**6])) == (0, 0)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((0, 1000), (50, 1100), True),  # half of the read's core time idle: fill it
        ((0, 1000), (25, 1100), IDLE_TO_OVERLAP <= 0.25),
        ((0, 1000), (5, 1100), False),  # the cores stayed busy: take turns
        ((0, 1000), (0, 1000), True),  # shorter than a clock tick: nothing to judge
        (None, (5, 1100), True),  # no /proc/stat: as before this module
    ],
)
def test_reads_overlap_writes_only_where_the_cores_had_idle_time(
    before: tuple[int, int] | None, after: tuple[int, int], expected: bool
) -> None:
    assert overlaps(before, after) is expected
