"""Pure planning: align jobs to target and source chunk grids, size them by the memory model.

Nothing here does I/O or imports an execution framework. The inputs describe, for each variable to
write, how every target index maps onto the source's on-disk chunk grid (:class:`AxisMap`); the
output is a :class:`Plan` of :class:`Job` values that tile the target exactly.

Terms (see docs/design.md §3.4): per dimension the *write grid* is the target chunk (or shard) grid;
the *source grid* is the source chunk grid mapped into target index space. A *unit* is the smallest
block whole in both grids. Jobs are hyper-rectangles of whole units, grown as large as the memory
and time budgets allow.

The pieces: :mod:`~zarr_parallel.planning.grid` (axes, grids, units),
:mod:`~zarr_parallel.planning.memory` (the memory model), :mod:`~zarr_parallel.planning.inputs`
(what the planner is given), :mod:`~zarr_parallel.planning.groups` (one group cut into jobs) and
this module (the whole plan, and its fingerprint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.groups import Group, GroupPlan
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import Job


@dataclass(frozen=True)
class Stage:
    """An earlier stage of a staged plan: its plan, writing an intermediate store with
    ``chunks`` (``(variable, chunk lengths)`` rows) in the target's index space."""

    plan: Plan
    chunks: tuple[tuple[str, tuple[int, ...]], ...]

    def to_json(self) -> dict[str, Any]:
        """The stage as stored in the manifest (its jobs included)."""
        return {**self.plan.to_json(), "chunks": {n: list(c) for n, c in self.chunks}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stage:
        """The stage :meth:`to_json` stored."""
        chunks = tuple((str(n), tuple(int(x) for x in c)) for n, c in data["chunks"].items())
        return cls(Plan.from_json(data), chunks)


@dataclass(frozen=True)
class Plan:
    """A complete plan: jobs tiling the target, with memory and read-cost figures.

    A *staged* plan (``strategy == "staged"``) writes through intermediate stores: ``stages``
    holds the earlier stages and ``jobs`` are the last stage's, which read the intermediate.
    Its ``read_bytes`` are still the source's (read amplification means source re-reads).
    """

    jobs: tuple[Job, ...]
    groups: tuple[GroupPlan, ...]
    memory_budget: int
    read_bytes: int
    needed_bytes: int
    write_bytes: int
    fingerprint: str
    notes: tuple[str, ...] = ()
    #: What the cache holds (request content, source state, arrays), whatever the job split:
    #: equal for runs of one request in any deploy mode, worker count or memory limit.
    content_fingerprint: str = ""
    #: "direct" (every source chunk read once), "streaming" (jobs hold their region and stream
    #: the source chunks through it, re-reading some) or "staged" (through intermediates).
    strategy: str = "direct"
    strategy_reason: str = ""
    stages: tuple[Stage, ...] = ()

    @property
    def intermediate_bytes(self) -> int:
        """Bytes the earlier stages write to intermediate stores (0 for a one-stage plan)."""
        return sum(s.plan.write_bytes for s in self.stages)

    def stage_rows(self) -> list[dict[str, Any]]:
        """Per stage: jobs, bytes read and written, the intermediate chunks it writes."""
        rows = [
            {
                "stage": i + 1,
                "jobs": len(s.plan.jobs),
                "read_bytes": s.plan.read_bytes,
                "write_bytes": s.plan.write_bytes,
                "intermediate_chunks": {n: list(c) for n, c in s.chunks},
            }
            for i, s in enumerate(self.stages)
        ]
        rows.append(
            {
                "stage": len(self.stages) + 1,
                "jobs": len(self.jobs),
                "read_bytes": sum(j.read_bytes for j in self.jobs),
                "write_bytes": self.write_bytes,
                "intermediate_chunks": None,
            }
        )
        return rows

    @property
    def read_amplification(self) -> float:
        """Source bytes read over source bytes needed (1.00 when aligned)."""
        return self.read_bytes / self.needed_bytes if self.needed_bytes else 1.0

    @property
    def max_job_memory(self) -> int:
        """Largest job estimate in bytes."""
        return max((j.memory for j in self.jobs), default=0)

    @property
    def peak_job_memory(self) -> int:
        """Largest job estimate over every stage (what a worker must hold)."""
        return max([self.max_job_memory, *(s.plan.max_job_memory for s in self.stages)])

    def job(self, job_id: int) -> Job:
        """The job with this id."""
        return self.jobs[job_id]

    def summary(self) -> dict[str, Any]:
        """Figures for reports and artifacts."""
        return {
            "jobs": len(self.jobs),
            "read_amplification": round(self.read_amplification, 4),
            "max_job_memory": self.max_job_memory,
            "memory_budget": self.memory_budget,
            "read_bytes": self.read_bytes,
            "needed_bytes": self.needed_bytes,
            "write_bytes": self.write_bytes,
            "fingerprint": self.fingerprint,
            "content_fingerprint": self.content_fingerprint,
            "notes": list(self.notes),
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "stages": self.stage_rows(),
            "intermediate_bytes": self.intermediate_bytes,
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (the manifest's copy of the plan)."""
        return {
            **self.summary(),
            "groups": [
                {
                    "variables": list(g.variables),
                    "dims": list(g.dims),
                    "unit_counts": list(g.unit_counts),
                    "units_per_job": list(g.units_per_job),
                    "split_dims": list(g.split_dims),
                }
                for g in self.groups
            ],
            "job_list": [j.to_row() for j in self.jobs],
            "stage_plans": [s.to_json() for s in self.stages],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """The plan a manifest stored (:meth:`to_json`), e.g. to continue an interrupted run."""
        jobs = tuple(Job.from_row(row) for row in data["job_list"])
        groups = tuple(
            GroupPlan(
                tuple(g["variables"]),
                tuple(g["dims"]),
                tuple(g["unit_counts"]),
                tuple(g["units_per_job"]),
                tuple(g["split_dims"]),
            )
            for g in data.get("groups", [])
        )
        return cls(
            jobs=jobs,
            groups=groups,
            memory_budget=int(data["memory_budget"]),
            read_bytes=int(data["read_bytes"]),
            needed_bytes=int(data["needed_bytes"]),
            write_bytes=int(data["write_bytes"]),
            fingerprint=str(data["fingerprint"]),
            notes=tuple(data.get("notes", ())),
            content_fingerprint=str(data.get("content_fingerprint", "")),
            strategy=str(data.get("strategy", "direct")),
            strategy_reason=str(data.get("strategy_reason", "")),
            stages=tuple(Stage.from_json(s) for s in data.get("stage_plans") or ()),
        )


def plan_jobs(arrays: Sequence[ArrayInput], limits: Limits, request_digest: str = "") -> Plan:
    """Plan the jobs that write ``arrays`` within ``limits``.

    Parameters
    ----------
    arrays
        The variables to write, with their mapping onto the source chunk grid.
    limits
        Memory and time budgets and the minimum number of jobs.
    request_digest
        Digest of the validated request, folded into the plan fingerprint.

    Returns
    -------
    Plan
        Jobs tiling every array exactly, each aligned to the write grid, grown to the budgets.

    Raises
    ------
    PlanError
        When even a single write chunk with the source chunks it touches exceeds the budget.
    """
    # By name: the order in which a request lists its variables changes neither the jobs nor
    # the fingerprint (the same content must be found up to date).
    arrays = sorted(arrays, key=lambda a: a.name)
    groups: dict[str, list[ArrayInput]] = {}
    for arr in arrays:
        groups.setdefault(arr.signature(), []).append(arr)
    planned = _plan_groups(list(groups.values()), limits)
    if limits.workers > 1 and any(len(m) > 1 for m in groups.values()):
        # Tail balance across variables: their chunks are separate, so jobs of one variable
        # each re-read nothing. 3 jobs of two variables on 2 workers leave one idle for a
        # third of the data phase; 6 jobs of one variable share evenly.
        alone = _plan_groups([[a] for a in arrays], limits)
        if makespan(alone[0], limits.workers) < makespan(planned[0], limits.workers) * 0.97:
            planned = alone
    jobs, group_plans, notes, (read, needed, written) = planned
    arrays_json = _arrays_json(arrays)
    digest = fingerprint(
        request_digest, arrays_json, canonical_json([[j.variables, j.region] for j in jobs])
    )
    return Plan(
        jobs=tuple(jobs),
        groups=tuple(group_plans),
        memory_budget=limits.memory_budget,
        read_bytes=read,
        needed_bytes=needed,
        write_bytes=written,
        fingerprint=digest,
        notes=tuple(notes),
        content_fingerprint=content_fingerprint(arrays, request_digest),
    )


_Planned = tuple[list[Job], list[GroupPlan], list[str], tuple[int, int, int]]


def _plan_groups(groups: Sequence[Sequence[ArrayInput]], limits: Limits) -> _Planned:
    """Jobs, group plans, notes and (read, needed, written) bytes of ``groups``, each planned
    as one :class:`Group`."""
    ordered = [Group.build(members, limits) for members in groups]
    ordered.sort(key=lambda g: g.members[0].name)
    shares = _share_jobs(
        limits.min_jobs,
        [_group_bytes(g.members) for g in ordered],
        [g.capacity for g in ordered],
    )
    jobs: list[Job] = []
    group_plans: list[GroupPlan] = []
    notes: list[str] = []
    read = needed = written = 0
    for group, share in zip(ordered, shares, strict=True):
        gplan, group_jobs, g_read, g_needed, g_notes = group.plan(limits, share, len(jobs))
        jobs.extend(group_jobs)
        group_plans.append(gplan)
        notes.extend(g_notes)
        read += g_read
        needed += g_needed
        written += sum(j.write_bytes for j in group_jobs)
    if not limits.min_jobs_derived and sum(g.capacity for g in ordered) < limits.min_jobs:
        notes.append(
            f"num_jobs={limits.min_jobs} asked, but whole aligned units allow only {len(jobs)} "
            "jobs; cutting units further would make jobs re-read source chunks"
        )
    return jobs, group_plans, notes, (read, needed, written)


def makespan(jobs: Sequence[Job], workers: int) -> int:
    """Bytes moved by the busiest of ``workers`` taking ``jobs`` in order, each job going to
    the first worker free (how the executors hand them out); a job's cost is its bytes read
    and written.

    >>> j = [Job(i, ("v",), (), 0, 10, 10) for i in range(3)]
    >>> makespan(j, 2), makespan(j + [Job(3, ("v",), (), 0, 10, 10)], 2), makespan(j, 1)
    (40, 40, 60)
    """
    loads = [0] * max(1, workers)
    for job in jobs:
        i = loads.index(min(loads))
        loads[i] += job.read_bytes + job.write_bytes
    return max(loads)


def _arrays_json(arrays: Sequence[ArrayInput]) -> str:
    ordered = sorted(arrays, key=lambda a: a.name)
    return canonical_json([[a.name, a.signature(), a.itemsize, a.read_itemsize] for a in ordered])


def content_fingerprint(arrays: Sequence[ArrayInput], request_digest: str) -> str:
    """What a cache of ``arrays`` holds, whatever the plan (:attr:`Plan.content_fingerprint`)."""
    return fingerprint(request_digest, _arrays_json(arrays))


def _group_bytes(members: Sequence[ArrayInput]) -> int:
    return sum(math.prod(a.shape) * a.itemsize for a in members)


def _share_jobs(min_jobs: int, weights: Sequence[int], capacities: Sequence[int]) -> list[int]:
    """Spread ``min_jobs`` over groups by weight, none above its capacity (its unit count).

    What a full group cannot take goes to the others, so the total reaches ``min_jobs``
    whenever the capacities allow.

    >>> _share_jobs(4, [4, 16], [2, 2])
    [2, 2]
    >>> _share_jobs(6, [1, 1, 1], [100, 1, 100])
    [3, 1, 3]
    """
    shares = [1] * len(weights)
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        remaining = min_jobs - sum(shares[i] for i in fixed)
        total = sum(max(1, weights[i]) for i in free)
        capped = False
        for i in free:
            want = max(1, math.ceil(remaining * max(1, weights[i]) / max(1, total)))
            shares[i] = min(want, max(1, capacities[i]))
            if want >= capacities[i]:
                fixed.add(i)
                capped = True
        if not capped or not free:
            return shares


def plan_jobs_from(
    arrays: Sequence[ArrayInput],
    limits: Limits,
    request_digest: str,
    dim: str,
    start: int,
) -> Plan:
    """Plan only the part of ``arrays`` from index ``start`` along ``dim`` (an append).

    Arrays without ``dim`` are left out: nothing of them is written. ``start`` must be a
    boundary of every remaining array's write grid, so the jobs stay aligned; the returned jobs'
    regions are in the full arrays' index space and tile ``[start, size)`` along ``dim``.

    >>> arr = ArrayInput("t2m", (AxisMap.uniform("time", 10, 3),), (4,), 4, 4)
    >>> [j.region for j in plan_jobs_from([arr], Limits(10**6), "", "time", 8).jobs]
    [(('time', 8, 10),)]

    Raises
    ------
    ValueError
        When no array has ``dim``, or ``start`` is outside it or not on its write grid.
    """
    tail: list[ArrayInput] = []
    for arr in arrays:
        if dim not in arr.dims:
            continue
        d = arr.dims.index(dim)
        axis = arr.axes[d]
        if not 0 <= start < axis.size:
            raise ValueError(f"{arr.name}: start {start} is outside {dim} of length {axis.size}")
        if start % arr.write_chunks[d]:
            raise ValueError(
                f"{arr.name}: start {start} is not on the write grid of {dim} "
                f"(chunk length {arr.write_chunks[d]})"
            )
        axes = list(arr.axes)
        axes[d] = AxisMap(dim, axis.chunk_of[start:], axis.chunk_len)
        tail.append(replace(arr, axes=tuple(axes)))
    if not tail:
        raise ValueError(f"no array has the dimension {dim!r}")
    sub = plan_jobs(tail, limits, request_digest)
    jobs = tuple(
        replace(
            job,
            region=tuple(
                (d, a + start, b + start) if d == dim else (d, a, b) for d, a, b in job.region
            ),
        )
        for job in sub.jobs
    )
    digest = fingerprint(sub.fingerprint, canonical_json(["from", dim, start]))
    return replace(sub, jobs=jobs, fingerprint=digest)
