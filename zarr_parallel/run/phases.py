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

    def __post_init__(self) -> None:
        self.since = self.origin

    def enter(self, phase: str) -> None:
        """End the current phase now and start ``phase`` (one of :data:`PHASES`)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; the phases are {PHASES}")
        now = time.time()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + (now - self.since)
        self.current, self.since = phase, now

    def wall(self) -> float:
        """Seconds since the origin."""
        return time.time() - self.origin

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase so far (the current one up to now), every phase named, rounded."""
        now = time.time()
        spent = dict(self.seconds)
        spent[self.current] = spent.get(self.current, 0.0) + (now - self.since)
        return {p: round(spent.get(p, 0.0), 3) for p in PHASES}


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
    "current_clock",
    "enter_phase",
    "listening",
    "process_start",
    "timing",
]
