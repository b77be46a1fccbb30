"""Where a command's wall time goes: the phases of a run, timed from the command's start.

The summary's wall time is the command's (from the process's start for ``zarr-parallel`` and
``python -m flows.cache``, from the call for the Python API), broken down into :data:`PHASES`,
the names the progress output uses too. A door starts a :class:`PhaseClock` and the flow marks
the phases it enters; time no phase claims is start-up before the first mark and teardown
after the last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import psutil

#: The phases of a run, in order (shared with the progress output).
PHASES = ("start-up", "planning", "initialise", "data", "finish", "teardown")


def process_start() -> float:
    """When this process started (epoch seconds): a command's wall time counts from here."""
    try:
        return float(psutil.Process().create_time())
    except psutil.Error:  # pragma: no cover - /proc unreadable
        return time.time()


@dataclass
class PhaseClock:
    """Seconds spent per phase since ``origin`` (epoch seconds).

    The clock is always in one phase: :meth:`enter` ends the current one. Time from ``origin``
    to the first :meth:`enter` is start-up.
    """

    origin: float = field(default_factory=time.time)
    current: str = "start-up"
    since: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    #: Every phase entered, with when (epoch seconds), in order: the run's timeline.
    entries: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.since = self.origin

    def enter(self, phase: str) -> None:
        """End the current phase now and start ``phase`` (one of :data:`PHASES`)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; the phases are {PHASES}")
        now = time.time()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + (now - self.since)
        self.current, self.since = phase, now
        self.entries.append((phase, now))

    def phase_at(self, when: float) -> str:
        """The phase the clock was in at ``when`` (epoch seconds)."""
        phase = "start-up"
        for name, entered in self.entries:
            if entered > when:
                break
            phase = name
        return phase

    def timeline(self) -> list[tuple[str, float]]:
        """Each phase entered and when, in seconds since the origin (rounded)."""
        return [(name, round(entered - self.origin, 3)) for name, entered in self.entries]

    def wall(self) -> float:
        """Seconds since the origin."""
        return time.time() - self.origin

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase so far (the current one up to now), every phase named, rounded."""
        now = time.time()
        spent = dict(self.seconds)
        spent[self.current] = spent.get(self.current, 0.0) + (now - self.since)
        return {p: round(spent.get(p, 0.0), 3) for p in PHASES}


def phases_text(phases: dict[str, float] | None) -> str:
    """``start-up 0.9, planning 0.4, data 2.1``: the phases that took time, in order.

    >>> phases_text({"start-up": 0.92, "planning": 0.0, "data": 2.14})
    'start-up 0.9, data 2.1'
    """
    phases = phases or {}
    return ", ".join(f"{name} {phases[name]:.1f}" for name in PHASES if phases.get(name))


def cluster_text(summary: dict[str, Any]) -> str | None:
    """When the run's cluster start was asked for and what it overlapped, e.g. ``0.6 s into
    the run, during planning (ready 3.1 s later)``; None when no cluster started."""
    at = summary.get("cluster_requested_at")
    if at is None:
        return None
    text = f"{at:.1f} s into the run, during {summary.get('cluster_requested_during')}"
    ready = summary.get("cluster_ready_seconds")
    return text + (f" (ready {ready:.1f} s later)" if ready is not None else "")


def clock_figures(clock: PhaseClock, summary: dict[str, Any]) -> dict[str, Any]:
    """Put the clock's figures in a run's summary: ``seconds`` (the wall time), ``phases``,
    ``timeline``, and, when the run started a cluster (``cluster_started``, epoch seconds),
    ``cluster_requested_at`` (seconds since the origin) and ``cluster_requested_during`` (the
    phase it overlapped)."""
    started = summary.pop("cluster_started", None)
    if started is not None:
        summary["cluster_requested_at"] = round(float(started) - clock.origin, 3)
        summary["cluster_requested_during"] = clock.phase_at(float(started))
    summary["seconds"] = round(clock.wall(), 3)
    summary["phases"] = clock.breakdown()
    summary["timeline"] = clock.timeline()
    return summary


_clock: ContextVar[PhaseClock | None] = ContextVar("zarr_parallel_phase_clock", default=None)


@contextmanager
def timing(clock: PhaseClock) -> Iterator[PhaseClock]:
    """Make ``clock`` the one :func:`enter_phase` marks, in this context."""
    token = _clock.set(clock)
    try:
        yield clock
    finally:
        _clock.reset(token)


def current_clock() -> PhaseClock | None:
    """The clock of the command running in this context, if a door started one."""
    return _clock.get()


#: Who else hears of each phase (the progress output, zarr_parallel.orchestration.progress).
PhaseListener = Callable[[str, "tuple[int, int] | None"], None]
_listeners: ContextVar[tuple[PhaseListener, ...]] = ContextVar(
    "zarr_parallel_phase_listeners", default=()
)


@contextmanager
def listening(listener: PhaseListener) -> Iterator[None]:
    """Call ``listener(phase, stage)`` for every :func:`enter_phase` in this context."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def enter_phase(phase: str, stage: tuple[int, int] | None = None) -> None:
    """Mark that the run enters ``phase`` (``stage=(k, n)``: stage k of a staged plan's n).

    The door's clock (if any) counts it, and listeners (the progress output) hear of it.
    """
    clock = _clock.get()
    if clock is not None:
        clock.enter(phase)
    for listener in _listeners.get():
        listener(phase, stage)


__all__ = [
    "PHASES",
    "PhaseClock",
    "clock_figures",
    "cluster_text",
    "current_clock",
    "enter_phase",
    "listening",
    "phases_text",
    "process_start",
    "timing",
]
