"""The geometry of a plan picture: one variable's source chunk grid, target chunk grid and jobs.

Pure arithmetic over a planner input (:class:`~zarr_parallel.planning.inputs.ArrayInput`) and the
jobs that write it; the writers draw it (:mod:`zarr_parallel.planning.picture_svg` as SVG text,
``zarr_parallel.run.picture_files`` as PNG). Everything is in target index space, one 2-D
projection (*panel*) per pair of the variable's dimensions (docs/design.md §3.4 for the grids):

- the *source grid*: where the source chunk changes along each dimension;
- the *target grid*: the write grid (the Zarr chunk, or the shard when sharded);
- the jobs' regions, projected onto the panel's two dimensions (jobs that differ only along
  other dimensions coincide there);
- *cut* source chunks: a source chunk that more than one job reads (a job boundary falls inside
  it), the cause of read amplification the job split adds.

Above :data:`MAX_MARKS` jobs the picture groups neighbouring jobs (on a coarser grid of the jobs'
starts) into one mark each, and says so; grids finer than :data:`MAX_LINES` lines along a
dimension are left undrawn, and that is said too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from zarr_parallel.planning.grid import IntArray, write_grid
from zarr_parallel.planning.inputs import ArrayInput
from zarr_parallel.planning.jobs import Job

#: Above this many jobs, neighbouring jobs are drawn as one mark (a group).
MAX_MARKS = 300
#: Above this many grid lines along one dimension, that grid is not drawn there.
MAX_LINES = 200

Span = tuple[int, int]


@dataclass(frozen=True)
class Mark:
    """One job, or a group of neighbouring jobs, with its region ``{dim: (start, stop)}``."""

    index: int
    job_ids: tuple[int, ...]
    region: dict[str, Span]

    @property
    def label(self) -> str:
        """``job 3``, or ``36 jobs (3-47)`` for a group."""
        if len(self.job_ids) == 1:
            return f"job {self.job_ids[0]}"
        return f"{len(self.job_ids)} jobs ({min(self.job_ids)}-{max(self.job_ids)})"


@dataclass(frozen=True)
class Axis:
    """What one dimension shows: its length, grid lines and cut source chunks.

    ``source_lines``/``target_lines`` are inner boundaries (None when too many to draw);
    ``cut`` holds the index spans of source chunks a job boundary falls into, ``partial`` those
    of source chunks the selection takes only part of (adjacent ones merged); ``full_runs``
    counts the source chunks taken whole.
    """

    dim: str
    size: int
    source_chunks: int
    target_chunks: int
    source_lines: tuple[int, ...] | None
    target_lines: tuple[int, ...] | None
    cut: tuple[Span, ...]
    partial: tuple[Span, ...] = ()
    full_runs: int = 0


@dataclass(frozen=True)
class Panel:
    """One 2-D projection: ``rows`` is drawn downwards, ``cols`` across (``rows`` is None for a
    one-dimensional variable)."""

    rows: str | None
    cols: str | None


@dataclass(frozen=True)
class Picture:
    """Everything a writer draws, with the counts its legend prints."""

    variable: str
    axes: tuple[Axis, ...]
    panels: tuple[Panel, ...]
    marks: tuple[Mark, ...]
    jobs: int
    source_chunks: int
    target_chunks: int
    cut_chunks: int
    partial_chunks: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def grouped(self) -> bool:
        """True when marks stand for groups of jobs."""
        return len(self.marks) < self.jobs

    def axis(self, dim: str | None) -> Axis | None:
        """The axis of ``dim`` (None for None)."""
        return next((a for a in self.axes if a.dim == dim), None)

    def legend(self) -> list[tuple[str, str]]:
        """``(key, line)`` per legend line: the counts, then grouping and notes."""
        lines = [
            ("jobs", f"jobs: {self.jobs}"),
            ("source-chunks", f"source chunks: {self.source_chunks}"),
            ("target-chunks", f"target chunks: {self.target_chunks}"),
            ("cut-chunks", f"cut source chunks (read by more than one job): {self.cut_chunks}"),
            (
                "partial-chunks",
                f"source chunks partly read (the selection cuts them): {self.partial_chunks}",
            ),
        ]
        if self.grouped:
            size = max(len(m.job_ids) for m in self.marks)
            lines.append(
                (
                    "grouped",
                    f"jobs grouped: {self.jobs} jobs drawn as {len(self.marks)} marks of up to "
                    f"{size} neighbouring jobs",
                )
            )
        lines += [("note", n) for n in self.notes]
        return lines


def plan_picture(
    array: ArrayInput,
    jobs: Sequence[Job],
    max_marks: int = MAX_MARKS,
    max_lines: int = MAX_LINES,
) -> Picture:
    """The picture of how ``jobs`` write ``array``.

    Parameters
    ----------
    array
        The variable (its source chunk mapping and write grid).
    jobs
        The plan's jobs; those not writing ``array`` are left out.
    max_marks
        Above this many jobs, neighbouring jobs are grouped into at most this many marks.
    max_lines
        Grids with more lines along a dimension are not drawn there (a note says so).

    Examples
    --------
    >>> from zarr_parallel.planning.grid import AxisMap
    >>> arr = ArrayInput("t", (AxisMap.uniform("time", 10, 4),), (5,), 4, 4)
    >>> halves = [Job(i, ("t",), (("time", 5 * i, 5 * i + 5),), 1, 1, 1) for i in (0, 1)]
    >>> p = plan_picture(arr, halves)
    >>> p.jobs, p.source_chunks, p.target_chunks, p.cut_chunks
    (2, 3, 2, 1)
    """
    mine = [j for j in jobs if array.name in j.variables]
    starts = [_run_starts(array, d) for d in range(len(array.axes))]
    dims = [ax.dim for ax in array.axes]
    spans = _spans(mine, dims)
    axes, notes = [], []
    for d, ax in enumerate(array.axes):
        runs = starts[d]
        grid = write_grid(ax.size, array.write_chunks[d])
        axis = Axis(
            ax.dim,
            ax.size,
            len(runs) - 1,
            max(1, len(grid) - 1),
            _lines(runs, max_lines),
            _lines(grid, max_lines),
            _cut_spans(runs, spans[:, d, :].ravel()),
            *_partial(array, d, runs),
        )
        for kind, lines, count in (
            ("source", axis.source_lines, axis.source_chunks),
            ("target", axis.target_lines, axis.target_chunks),
        ):
            if lines is None:
                notes.append(f"{kind} grid along {ax.dim} not drawn ({count} chunks)")
        axes.append(axis)
    panels = (
        tuple(Panel(r, c) for r, c in itertools.combinations(dims, 2))
        if len(dims) >= 2
        else (Panel(None, dims[0] if dims else None),)
    )
    return Picture(
        variable=array.name,
        axes=tuple(axes),
        panels=panels,
        marks=_marks(mine, dims, spans, max_marks),
        jobs=len(mine),
        source_chunks=math.prod(a.source_chunks for a in axes),
        target_chunks=math.prod(a.target_chunks for a in axes),
        cut_chunks=_cut_count(spans, starts),
        partial_chunks=math.prod(a.source_chunks for a in axes)
        - math.prod(a.full_runs for a in axes),
        notes=tuple(notes),
    )


def _spans(jobs: Sequence[Job], dims: Sequence[str]) -> IntArray:
    """The jobs' regions as one array: ``[job, dim] = (start, stop)``."""
    out = np.zeros((len(jobs), len(dims), 2), dtype=np.int64)
    for i, job in enumerate(jobs):
        bounds = job.bounds
        for d, dim in enumerate(dims):
            out[i, d] = bounds[dim]
    return out


def _run_starts(array: ArrayInput, d: int) -> IntArray:
    """Boundaries of the source chunks along dimension ``d`` in target index space."""
    return np.asarray(array.axes[d].source_boundaries, dtype=np.int64)


def _lines(bounds: IntArray, max_lines: int) -> tuple[int, ...] | None:
    inner = bounds[1:-1]
    return None if inner.size > max_lines else tuple(int(b) for b in inner)


def _partial(array: ArrayInput, d: int, runs: IntArray) -> tuple[tuple[Span, ...], int]:
    """Spans of the source chunks only partly in the target along ``d``, and the whole ones."""
    ax = array.axes[d]
    if len(runs) < 2:
        return (), 0
    lengths = np.diff(runs)
    whole = ax.chunk_len[ax.chunk_of[runs[:-1]]]
    part = np.flatnonzero(lengths < whole)
    return _merged(runs, part), int(len(lengths) - len(part))


def _merged(runs: IntArray, which: Sequence[int] | IntArray) -> tuple[Span, ...]:
    """The spans of runs ``which`` (sorted), adjacent ones merged."""
    spans: list[Span] = []
    for i in which:
        a, z = int(runs[i]), int(runs[i + 1])
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], z)
        else:
            spans.append((a, z))
    return tuple(spans)


def _cut_spans(runs: IntArray, job_bounds: IntArray) -> tuple[Span, ...]:
    """Spans of the source chunks (``runs`` boundaries) a job boundary falls strictly inside."""
    if len(runs) < 2 or not job_bounds.size:
        return ()
    b = np.unique(np.asarray(job_bounds, dtype=np.int64))
    idx = np.searchsorted(runs, b, side="right") - 1
    inside = (idx >= 0) & (idx < len(runs) - 1)
    inside[inside] &= b[inside] > runs[idx[inside]]
    return _merged(runs, np.unique(idx[inside]))


def _cut_count(spans: IntArray, runs: Sequence[IntArray]) -> int:
    """Source chunks read by more than one job.

    The jobs tile the array, so every source chunk is read by at least one job; a chunk read by
    exactly one lies wholly inside it. Count those per job (per dimension, the runs inside the
    job's span) and subtract from all.
    """
    if not len(spans):
        return 0
    total = math.prod(len(r) - 1 for r in runs)
    inside = np.ones(len(spans), dtype=np.int64)
    for d, r in enumerate(runs):
        first = np.searchsorted(r, spans[:, d, 0], side="left")  # first run starting at/after
        last = np.searchsorted(r, spans[:, d, 1], side="right") - 1  # last boundary at/before
        inside *= np.maximum(0, last - first)
    return max(0, total - int(inside.sum()))


def _marks(
    jobs: Sequence[Job], dims: Sequence[str], spans: IntArray, max_marks: int
) -> tuple[Mark, ...]:
    """One mark per job, or per group of neighbouring jobs above ``max_marks`` jobs."""
    if len(jobs) <= max_marks:
        return tuple(Mark(i, (j.id,), j.bounds) for i, j in enumerate(jobs))
    # The jobs' starts along each dimension form a grid; coarsen it (double the factor of the
    # dimension with the most cells) until it has at most max_marks cells.
    starts = [np.unique(spans[:, d, 0]) for d in range(len(dims))]
    factor = [1] * len(dims)

    def cells() -> list[int]:
        return [math.ceil(len(s) / f) for s, f in zip(starts, factor, strict=True)]

    while math.prod(cells()) > max_marks:
        factor[int(np.argmax(cells()))] *= 2
    keys = np.stack(
        [np.searchsorted(starts[d], spans[:, d, 0]) // factor[d] for d in range(len(dims))],
        axis=1,
    )
    groups, which = np.unique(keys, axis=0, return_inverse=True)
    marks = []
    for g in range(len(groups)):
        members = np.flatnonzero(which.ravel() == g)
        region = {
            d: (int(spans[members, i, 0].min()), int(spans[members, i, 1].max()))
            for i, d in enumerate(dims)
        }
        marks.append(Mark(g, tuple(jobs[int(m)].id for m in members), region))
    return tuple(marks)
