"""The command's clock: phases add up to the wall time, and a phase entered twice adds up."""

from __future__ import annotations

import time

import pytest

from zarr_parallel.run.phases import (
    PHASES,
    PhaseClock,
    clock_figures,
    cluster_text,
    enter_phase,
    process_start,
    timing,
)


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


def test_the_timeline_says_which_phase_a_moment_fell_in() -> None:
    clock = PhaseClock(time.time() - 1.0)
    with timing(clock):
        enter_phase("planning")
        asked = time.time()  # e.g. a cluster's start, asked for while planning
        time.sleep(0.02)
        enter_phase("start-up")
        enter_phase("planning")  # the flow plans again
        enter_phase("initialise")
    assert clock.phase_at(clock.origin) == "start-up"
    assert clock.phase_at(asked) == "planning"
    assert clock.phase_at(time.time()) == "initialise"
    timeline = clock.timeline()
    assert [name for name, _ in timeline] == ["planning", "start-up", "planning", "initialise"]
    assert timeline[0][1] <= asked - clock.origin < timeline[1][1]
    summary = clock_figures(clock, {"cluster_started": asked})
    assert "cluster_started" not in summary
    assert summary["cluster_requested_during"] == "planning"
    assert summary["cluster_requested_at"] == pytest.approx(asked - clock.origin, abs=0.002)
    assert summary["timeline"] == timeline
    assert sum(summary["phases"].values()) == pytest.approx(summary["seconds"], abs=0.02)
    assert cluster_text(summary) == (
        f"{summary['cluster_requested_at']:.1f} s into the run, during planning"
    )
    assert cluster_text({}) is None


def test_a_run_without_a_cluster_gets_no_cluster_figures() -> None:
    summary = clock_figures(PhaseClock(), {"cluster_started": None})
    assert "cluster_requested_at" not in summary and "cluster_started" not in summary
