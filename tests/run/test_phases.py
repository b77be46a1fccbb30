"""The command's clock: phases add up to the wall time, and a phase entered twice adds up."""

from __future__ import annotations

import time

import pytest

from zarr_parallel.run.phases import PHASES, PhaseClock, enter_phase, process_start, timing


def test_the_phases_add_up_to_the_wall_time() -> None:
    clock = PhaseClock(time.time() - 1.0)  # a command that started a second ago
    with timing(clock):
        enter_phase("planning")
        time.sleep(0.05)
        enter_phase("start-up")
        time.sleep(0.02)
        enter_phase("data")
        time.sleep(0.05)
        enter_phase("teardown")
    spent = clock.breakdown()
    assert list(spent) == list(PHASES)
    assert spent["start-up"] >= 1.02
    assert spent["planning"] >= 0.05 and spent["data"] >= 0.05
    assert spent["initialise"] == 0.0
    assert sum(spent.values()) == pytest.approx(clock.wall(), abs=0.02)


def test_marks_outside_a_clock_do_nothing_and_unknown_phases_are_refused() -> None:
    enter_phase("data")  # no door started a clock: nothing to mark
    with pytest.raises(ValueError, match="unknown phase 'writing'"):
        PhaseClock().enter("writing")


def test_the_process_started_before_now() -> None:
    assert 0 < time.time() - process_start() < 24 * 3600
