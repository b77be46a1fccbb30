"""A test hook that stops the process for real at a named point of a run.

Inert unless the environment variable ``ZARR_PARALLEL_FAULT`` is set; then it reads
``ACTION@POINT`` or ``ACTION@POINT#N`` (the N-th time the point is reached, default the first),
with ACTION ``kill`` (the process sends itself SIGKILL: nothing is cleaned up, exactly as if the
machine or the scheduler had killed it) or ``stop`` (SIGSTOP: the process freezes, holding
whatever it holds, until someone sends SIGCONT). Points, in run order:

``init``
    Store metadata written, ``plan.json`` not yet (the version is not initialised).
``job-written``
    A job's chunks are written and synced, its record is not yet written.
``job-recorded``
    A job's record is written.
``before-finalise``
    Every job recorded; metadata not yet consolidated, version not marked complete.
``before-publish``
    Version marked complete; the final path not yet switched to it.

The tests use it to kill whole runs at deterministic points (see tests/test_kill_resume.py).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "ZARR_PARALLEL_FAULT"
POINTS = ("init", "job-written", "job-recorded", "before-finalise", "before-publish")
_counts: dict[str, int] = {}
_guard = threading.Lock()


def fault_point(name: str) -> None:
    """Kill or stop this process here if ``ZARR_PARALLEL_FAULT`` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    point, _, nth = where.partition("#")
    if point != name:
        return
    with _guard:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(nth or 1)
    if hit:
        sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
        if os.environ.get("ZARR_PARALLEL_JOB_PROCESS") == "1":
            # In a job process (zarr_parallel.execution) the run is its parent, the worker:
            # that is what dies or freezes. A frozen parent simply gets no further job from it;
            # a killed one takes this process with it.
            os.kill(os.getppid(), sig)
            if action != "kill":
                return
        os.kill(os.getpid(), sig)
