"""The figures of a run's progress: phase names, jobs done, bytes written, rate and ETA.

Pure arithmetic and text (no I/O, no clock): :mod:`zarr_parallel.orchestration.progress`
measures and renders them. The phase names are the ones the start-up breakdown of the summary
uses too (docs/design.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

from zarr_parallel.units import format_bytes

#: The phases of a run, in order (shared with the summary's start-up breakdown).
PHASES = ("start-up", "planning", "initialise", "data", "finish", "teardown")


def phase_label(name: str, stage: tuple[int, int] | None = None) -> str:
    """A phase's name as shown, with its stage in a multi-stage plan.

    >>> phase_label("data", (1, 2))
    'data (stage 1/2)'
    >>> phase_label("planning")
    'planning'
    """
    if name not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}; got {name!r}")
    if stage is None or name != "data":
        return name
    k, n = stage
    return f"{name} (stage {k}/{n})"


def format_clock(seconds: float) -> str:
    """A duration as a clock, ``m:ss`` or ``h:mm:ss``.

    >>> format_clock(65.4), format_clock(3725)
    ('1:05', '1:02:05')
    """
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class DataFigures:
    """Where the data phase stands after ``elapsed`` seconds.

    Attributes
    ----------
    done, total
        Write jobs finished and to run in this phase.
    written
        Bytes the finished jobs wrote (the data, before compression, as their records say).
    elapsed
        Seconds since the phase began.
    """

    done: int
    total: int
    written: int
    elapsed: float

    @property
    def fraction(self) -> float:
        """Share of the jobs done, 0 to 1 (1 when there is nothing to do)."""
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)

    @property
    def rate(self) -> float | None:
        """Bytes written per second so far; None before anything was written.

        >>> DataFigures(2, 4, 100_000_000, 4.0).rate
        25000000.0
        """
        if self.written <= 0 or self.elapsed <= 0:
            return None
        return self.written / self.elapsed

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace of the jobs done so far; None before the first job.

        >>> DataFigures(2, 4, 0, 10.0).eta
        10.0
        >>> DataFigures(0, 4, 0, 10.0).eta is None
        True
        """
        if self.done >= self.total:
            return 0.0
        if self.done <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed / self.done * (self.total - self.done)

    def text(self) -> str:
        """``3/10 jobs, 120.00 MB, 40.00 MB/s, ETA 0:07``: the figures for a progress line.

        >>> DataFigures(3, 10, 120_000_000, 3.0).text()
        '3/10 jobs, 120.00 MB, 40.00 MB/s, ETA 0:07'
        """
        rate = self.rate
        eta = self.eta
        return (
            f"{self.done}/{self.total} jobs, {format_bytes(self.written)}, "
            f"{format_bytes(rate) + '/s' if rate is not None else '- MB/s'}, "
            f"ETA {format_clock(eta) if eta is not None else '-'}"
        )


def phase_line(label: str, seconds: float, figures: DataFigures | None = None) -> str:
    """The one line a finished phase prints when the output is not a terminal.

    >>> phase_line("planning", 0.42)
    'zarr-parallel: planning 0.4 s'
    >>> phase_line("data", 3.0, DataFigures(10, 10, 120_000_000, 3.0))
    'zarr-parallel: data 3.0 s: 10/10 jobs, 120.00 MB, 40.00 MB/s'
    """
    line = f"zarr-parallel: {label} {seconds:.1f} s"
    if figures is None:
        return line
    rate = figures.rate
    speed = f", {format_bytes(rate)}/s" if rate is not None else ""
    return f"{line}: {figures.done}/{figures.total} jobs, {format_bytes(figures.written)}{speed}"
