"""A run's progress on stderr: a live line in a terminal, one line per phase otherwise, or none.

The doors (``zarr-parallel run``, ``python -m flows.cache``, ``.cache()``) open a
:func:`reporting` block around the flow; the flow marks its phases
(:func:`zarr_parallel.run.phases.enter_phase`) and
watches the write jobs finish (:func:`watch_jobs`). The job events come from the run itself: a
thread of the flow's process reads the job records the manifest gets as each job's chunks are
durable (:mod:`zarr_parallel.store.manifest`), which every deploy mode writes, series, a local
cluster or SLURM jobs on a shared file system alike. Without a reporting block (deployment runs
in a Prefect worker) nothing is shown here; the UI's progress artifact counts the jobs there.

The summary stays on stdout; this writes to stderr only. Figures and phase names are
:mod:`zarr_parallel.run.progress_figures`'s.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import psutil
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table

from zarr_parallel.run.phases import listening
from zarr_parallel.run.progress_figures import (
    DataFigures,
    format_clock,
    phase_label,
    phase_line,
)
from zarr_parallel.store.disk_names import manifest_dir
from zarr_parallel.store.files import read_json

#: How the progress shows: ``auto`` picks ``live`` in a terminal (or a notebook), else ``lines``.
Mode = Literal["auto", "live", "lines", "off"]
#: How often the job records are read (seconds).
POLL_SECONDS = 0.5
#: Without a terminal, a long data phase also prints where it stands this often (seconds).
LINE_EVERY_SECONDS = 60.0
#: The phases in which a request can still be refused (invalid, or halted on recommendations).
UNCHECKED = ("start-up", "planning")

_CURRENT: ContextVar[Reporter | None] = ContextVar("zarr_parallel_progress", default=None)


class Reporter:
    """The progress of one run: its phases and, in the data phase, the jobs done.

    Parameters
    ----------
    mode
        ``live`` (a line redrawn in place), ``lines`` (a line per finished phase) or ``off``.
    since
        When the run began (``time.time()``), the start of its ``start-up`` phase.
    console
        Where the live line goes (stderr's console by default).
    """

    def __init__(self, mode: Mode, since: float | None = None, console: Console | None = None):
        self.mode = mode
        self.phases: list[tuple[str, float]] = []  # finished phases: label, seconds
        self._lock = threading.Lock()
        self._label = "start-up"
        self._began = time.time() if since is None else since
        self._data: DataFigures | None = None
        self._jobs_began = self._began
        self._last_line = 0.0
        # Lines of the phases before a plan exists, held until a later phase begins: a request
        # refused (or halted) while planning prints its one message (exit 2 or 3) alone.
        self._held: list[str] | None = []
        self._live: _LiveLine | None = None
        if mode == "live":
            self._live = _LiveLine(self, console or Console(stderr=True))

    def enter(self, name: str, stage: tuple[int, int] | None = None) -> None:
        """End the current phase and begin ``name`` (``data (stage k/n)`` with ``stage``)."""
        label = phase_label(name, stage)
        if self._live is not None:
            self._live.refresh()  # the phase's last figures (e.g. all jobs done) are shown
        now = time.time()
        with self._lock:
            if name not in UNCHECKED:
                self._release()
            self._finish_phase(now)
            self._label, self._began, self._data = label, now, None
            self._last_line = now

    def start_jobs(self, total: int) -> None:
        """The write jobs were handed out (workers are up): rate and ETA count from now."""
        with self._lock:
            self._jobs_began = time.time()
            self._data = DataFigures(0, total, 0, 0.0)

    def jobs(self, done: int, total: int, written: int) -> None:
        """The data phase's jobs: ``done`` of ``total`` finished, ``written`` bytes so far."""
        now = time.time()
        with self._lock:
            self._data = DataFigures(done, total, written, now - self._jobs_began)
            if now - self._last_line >= LINE_EVERY_SECONDS:
                self._last_line = now
                line = phase_line(self._label, now - self._began, self._data)
                self._say(f"{line}, ETA {_eta(self._data)}")

    def close(self, failed: bool = False) -> None:
        """End the last phase (a failed run says which phase it stopped in) and the live line."""
        if self._live is not None:
            self._live.stop()
        now = time.time()
        with self._lock:
            if failed:
                self.phases.append((self._label, now - self._began))
                if self._held is None:  # past planning: say where the run stopped
                    self._say(
                        f"zarr-parallel: stopped in {self._label} after {now - self._began:.1f} s"
                    )
                self._held = []  # refused or halted while planning: the door's message alone
            else:
                self._finish_phase(now)
                self._release()
            self._label = ""

    def snapshot(self) -> tuple[str, float, DataFigures | None]:
        """The current phase's label, its seconds so far and the data figures (if data)."""
        with self._lock:
            return self._label, time.time() - self._began, self._data

    def _finish_phase(self, now: float) -> None:
        if not self._label:
            return
        seconds = now - self._began
        self.phases.append((self._label, seconds))
        self._say(phase_line(self._label, seconds, self._data))

    def _say(self, line: str) -> None:
        """Print a line (``lines`` mode), or hold it while the request may still be refused."""
        if self.mode != "lines":
            return
        if self._held is not None:
            self._held.append(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def _release(self) -> None:
        """The run got past planning: print the lines held so far, and the rest as they come."""
        held, self._held = self._held, None
        for line in held or []:
            self._say(line)


def _eta(figures: DataFigures) -> str:
    eta = figures.eta
    return format_clock(eta) if eta is not None else "-"


class _LiveLine:
    """The live line: rich redraws it a few times a second from the reporter's figures.

    Prefect's console log lines are routed above it while it shows (its handler writes to the
    console it was made with, not to ``sys.stderr``), so a log line does not tear the line.
    """

    def __init__(self, reporter: Reporter, console: Console) -> None:
        self._reporter = reporter
        self._spinner = Spinner("dots", style="cyan")
        self._live = Live(
            get_renderable=self._render,
            console=console,
            transient=True,
            refresh_per_second=8,
            redirect_stdout=False,  # stdout is the summary's
            redirect_stderr=True,
        )
        self._handlers: list[tuple[Any, Any]] = []
        for handler in logging.getLogger().handlers:
            inner = getattr(handler, "console", None)
            if type(handler).__name__ == "PrefectConsoleHandler" and inner is not None:
                self._handlers.append((handler, inner))
                setattr(handler, "console", _PrintAbove(console, inner))  # noqa: B010
        self._live.start()

    def refresh(self) -> None:
        """Draw the line now."""
        self._live.refresh()

    def stop(self) -> None:
        self._live.stop()
        for handler, inner in self._handlers:
            handler.console = inner

    def _render(self) -> RenderableType:
        label, seconds, data = self._reporter.snapshot()
        grid = Table.grid(padding=(0, 1))
        if data is None:
            grid.add_row(self._spinner, f"zarr-parallel: {label}", format_clock(seconds))
            return grid
        grid.add_row(
            self._spinner,
            f"zarr-parallel: {label}",
            ProgressBar(total=max(1, data.total), completed=data.done, width=30),
            data.text(),
        )
        return grid


class _PrintAbove:
    """Stands in for a Prefect console handler's console while the live line shows: its lines
    print through the live line's console, which puts them above the line (plain text: the
    handler's colours are its own console's)."""

    def __init__(self, console: Console, replaced: Console) -> None:
        self._console = console
        self._replaced = replaced

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self._console.print(*objects, **{**kwargs, "markup": False, "highlight": False})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._replaced, name)


def choose_mode(progress: bool | str | None, console: Console | None = None) -> Mode:
    """The mode for a door's ``progress`` setting: None or True or ``auto`` picks by the output.

    ``False`` (``--quiet``) or ``off`` shows nothing; ``lines`` and ``live`` are taken as given.
    """
    if progress is False or progress == "off":
        return "off"
    if progress in ("lines", "live"):
        return progress
    if progress not in (None, True, "auto"):
        raise ValueError(
            f"progress must be True, False, None or auto/live/lines/off; got {progress!r}"
        )
    console = console or Console(stderr=True)
    return "live" if console.is_terminal or console.is_jupyter else "lines"


@contextmanager
def reporting(progress: bool | str | None = None, since: float | None = None) -> Iterator[Reporter]:
    """Show the progress of the run(s) in this block on stderr (see :func:`choose_mode`).

    ``since`` is when the command began (``time.time()``): its start-up counts from there.
    """
    reporter = Reporter(choose_mode(progress), since)
    token = _CURRENT.set(reporter if reporter.mode != "off" else None)
    failed = True
    try:
        if reporter.mode == "off":
            yield reporter
        else:
            with listening(reporter.enter):  # the run's phases (run/phases.enter_phase)
                yield reporter
        failed = False
    finally:
        _CURRENT.reset(token)
        reporter.close(failed)


def command_started() -> float:
    """When this process began (``time.time()``): a command's start-up counts from there."""
    return float(psutil.Process().create_time())


def current_reporter() -> Reporter | None:
    """The reporter of the door that started this run, if any."""
    return _CURRENT.get()


@contextmanager
def watch_jobs(version: Path, job_ids: Sequence[int]) -> Iterator[None]:
    """Count ``job_ids`` finishing in ``version`` while the block runs, from the manifest.

    A thread reads the job records as they appear (each is written once the job's chunks are
    durable) and feeds the reporter jobs done and bytes written. Nothing without a reporter.
    """
    reporter = _CURRENT.get()
    if reporter is None:
        yield
        return
    watch = _JobWatch(version, set(job_ids))
    reporter.start_jobs(len(watch.ids))
    stop = threading.Event()

    def poll() -> None:
        while True:
            reporter.jobs(*watch.read())
            if stop.wait(POLL_SECONDS):
                return

    thread = threading.Thread(target=poll, name="zarr-parallel-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        reporter.jobs(*watch.read())


class _JobWatch:
    """The job records of one version: each new one read once."""

    def __init__(self, version: Path, ids: set[int]) -> None:
        self.folder = manifest_dir(version) / "jobs"
        plan = read_json(manifest_dir(version) / "plan.json") or {}
        self.fingerprint = plan.get("fingerprint")
        self.ids = ids
        self.seen: set[str] = set()
        self.done = 0
        self.written = 0

    def read(self) -> tuple[int, int, int]:
        """``(done, total, bytes written)`` now."""
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(".json")]
        except FileNotFoundError:
            names = []
        for name in names:
            if name in self.seen:
                continue
            record = read_json(self.folder / name)
            if not record:
                continue  # being written: read it next time
            self.seen.add(name)
            if int(record.get("id", -1)) not in self.ids:
                continue
            if self.fingerprint and record.get("fingerprint") != self.fingerprint:
                continue
            self.done += 1
            self.written += int(record.get("bytes") or 0)
        return self.done, len(self.ids), self.written


__all__ = [
    "Mode",
    "Reporter",
    "choose_mode",
    "command_started",
    "current_reporter",
    "reporting",
    "watch_jobs",
]
