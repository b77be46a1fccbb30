"""The unit of work that crosses the planner/executor seam: :class:`Job`, and its stored rows.

A plan's jobs reach the executors through the version's manifest (``plan.json``'s ``job_list``),
one row per job. :meth:`Job.to_row` writes a row and :func:`read_jobs` reads them back: the one
place that knows the row's layout, so no executor indexes a row by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """One unit of work: a region of some variables, written by one task.

    ``region`` holds ``(dim, start, stop)`` per dimension in target index space. The value is
    frozen and hashable, cheap to ship to a worker.
    """

    id: int
    variables: tuple[str, ...]
    region: tuple[tuple[str, int, int], ...]
    memory: int
    read_bytes: int
    write_bytes: int

    @property
    def slices(self) -> dict[str, slice]:
        """The region as ``{dim: slice}``."""
        return {d: slice(a, b) for d, a, b in self.region}

    @property
    def bounds(self) -> dict[str, tuple[int, int]]:
        """The region as ``{dim: (start, stop)}``."""
        return {d: (a, b) for d, a, b in self.region}

    def describe(self) -> str:
        """Short human-readable region, e.g. ``t2m,d2m[time 0:48, latitude 0:721]``."""
        dims = ", ".join(f"{d} {a}:{b}" for d, a, b in self.region)
        return f"{','.join(self.variables)}[{dims}]"

    def to_row(self) -> list[Any]:
        """The job as one row of ``plan.json``'s ``job_list`` (JSON types only)."""
        return [
            self.id,
            list(self.variables),
            [list(r) for r in self.region],
            self.memory,
            self.read_bytes,
            self.write_bytes,
        ]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Job:
        """The job a ``job_list`` row describes (rows written before ``write_bytes`` have 5 items).

        >>> Job.from_row([3, ["t2m"], [["time", 0, 24]], 100, 50]).describe()
        't2m[time 0:24]'
        """
        return cls(
            int(row[0]),
            tuple(str(v) for v in row[1]),
            tuple((str(d), int(a), int(b)) for d, a, b in row[2]),
            int(row[3]),
            int(row[4]),
            int(row[5]) if len(row) > 5 else 0,
        )


def read_jobs(plan_json: Mapping[str, Any] | None) -> dict[int, Job]:
    """The jobs of a stored plan (``plan.json``), by id; empty when there is no job list."""
    rows = (plan_json or {}).get("job_list") or []
    jobs = (Job.from_row(row) for row in rows)
    return {job.id: job for job in jobs}
