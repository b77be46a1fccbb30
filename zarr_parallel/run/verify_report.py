"""What :func:`~zarr_parallel.run.verify.verify_cache` reports: problems by variable and region.

:class:`Problem` is one thing wrong with a cache, :class:`VerifyReport` the outcome of a check,
and :class:`ProblemList` adds problems to a report without listing thousands of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Problems listed per variable and kind before the rest are counted only.
LISTED = 20

Region = tuple[tuple[str, int, int], ...]


def region_text(region: Region | None) -> str:
    """``time 0:12, latitude 0:40`` for a region."""
    return ", ".join(f"{d} {a}:{b}" for d, a, b in region or ())


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache.

    ``kind`` is one of ``manifest`` (records missing), ``stale`` (the request or source changed
    since the cache was made), ``missing`` (a chunk file is absent), ``unreadable`` (a chunk
    cannot be decoded), ``values`` (values differ from the source), ``checksum`` (values differ
    from what the job wrote), ``metadata`` (shape, dims or dtype differ) or ``extra`` (leftover
    temporary files).
    """

    kind: str
    message: str
    variable: str | None = None
    region: Region | None = None

    def text(self) -> str:
        """One line for the report."""
        where = ""
        if self.variable is not None:
            where = f"{self.variable}" + (f" [{region_text(self.region)}]" if self.region else "")
            where += ": "
        return f"{self.kind}: {where}{self.message}"


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_cache`; ``ok`` is True when no problem was found."""

    cache: Path
    version: Path | None
    mode: str
    problems: list[Problem] = field(default_factory=list)
    jobs: int = 0
    jobs_recorded: int = 0
    chunk_files: int = 0
    chunk_files_present: int = 0
    chunks_compared: int = 0
    chunks_total: int = 0
    #: Job regions (per variable) compared with the CRC32 their job recorded, and those whose
    #: job recorded none (full mode, when the jobs are those of this content).
    checksums_compared: int = 0
    checksums_missing: int = 0
    seed: int = 0
    seconds: float = 0.0
    omitted: int = 0

    @property
    def ok(self) -> bool:
        """True when the cache passed every check."""
        return not self.problems and not self.omitted

    def by_variable(self) -> dict[str | None, list[Problem]]:
        """Problems grouped by variable (None: the cache as a whole)."""
        out: dict[str | None, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.variable, []).append(p)
        return out

    def text(self) -> str:
        """The human-readable report."""
        sampled = (
            f"sample: {self.chunks_compared} of {self.chunks_total} chunks compared with the "
            f"source (seed {self.seed})"
            if self.mode == "sample"
            else f"full: {self.chunks_compared} of {self.chunks_total} chunks compared with the "
            "source"
        )
        lines = [
            f"verify {self.cache}" + (f" (version {self.version.name})" if self.version else ""),
            f"  manifest  {self.jobs_recorded} of {self.jobs} jobs recorded",
            f"  chunks    {self.chunk_files_present} of {self.chunk_files} chunk files present",
            f"  values    {sampled}",
        ]
        if self.checksums_compared or self.checksums_missing:
            missing = f", {self.checksums_missing} without one" if self.checksums_missing else ""
            lines.append(
                f"  checksums {self.checksums_compared} job regions compared with the CRC32 "
                f"their jobs recorded{missing}"
            )
        lines.append(f"  time      {self.seconds:.1f} s")
        if self.ok:
            lines.append("  result    OK")
        else:
            total = len(self.problems) + self.omitted
            lines.append(f"  result    FAILED ({total} problem{'s' if total != 1 else ''})")
            lines += [f"  - {p.text()}" for p in self.problems]
            if self.omitted:
                lines.append(f"  - ... and {self.omitted} more of the same kinds")
        return "\n".join(lines)


class ProblemList:
    """Adds problems to a report, listing at most :data:`LISTED` per variable and kind."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.counts: dict[tuple[str | None, str], int] = {}

    def add(self, problem: Problem) -> None:
        """Add ``problem`` to the report, or count it once its kind is listed often enough."""
        key = (problem.variable, problem.kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= LISTED:
            self.report.problems.append(problem)
        else:
            self.report.omitted += 1
