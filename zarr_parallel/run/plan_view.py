"""A plan to look at: what ``zarr-parallel plan`` prints and ``ZarrParallelAssembler.plan()``
returns, with its picture. Planning writes nothing.

:func:`view_plan` plans through :func:`zarr_parallel.run.steps.prepare` (the one planning path
of runs, the CLI and the Python door) and keeps what a person wants to see: jobs, read
amplification, memory per job, the strategy when the planner reports one, the recommendations,
and the planner inputs the picture is drawn from (:mod:`zarr_parallel.planning.picture`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RecommendationsPending, RequestError
from zarr_parallel.planning.inputs import ArrayInput
from zarr_parallel.planning.picture import Picture, plan_picture
from zarr_parallel.planning.picture_svg import picture_svg
from zarr_parallel.planning.plan import Plan
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.picture_files import write_picture
from zarr_parallel.run.recommend import Recommendation
from zarr_parallel.run.stages import strategy_lines
from zarr_parallel.run.steps import Prepared, plan_inputs, prepare, worker_note
from zarr_parallel.sources.target import cached_target
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)

#: Width of the name column of :meth:`PlanView.text`.
_W = 21


@dataclass
class PlanView:
    """A plan, ready to be read: figures, recommendations, the picture, the SLURM job script.

    ``repr()`` prints the figures as ``zarr-parallel plan`` does; in a notebook the plan shows as
    a table with its picture. :meth:`picture` and :meth:`write_picture` draw any variable.
    """

    prepared: Prepared
    arrays: Mapping[str, ArrayInput]
    recommendations: list[Recommendation] = field(default_factory=list)
    #: True when a run of this request would halt on the recommendations (recommend_changes=True).
    halts: bool = False
    #: The job script a SLURM run would submit (deploy_mode="SLURM" only).
    slurm_script: str | None = None

    @property
    def plan(self) -> Plan:
        """The planner's plan."""
        return self.prepared.plan

    @property
    def request(self) -> CacheRequest:
        """The request planned (with an applied recommendation, if any)."""
        return self.prepared.request

    @property
    def variables(self) -> list[str]:
        """The variables the picture can show, the default first."""
        return list(self.arrays)

    def summary(self) -> dict[str, Any]:
        """The figures, as a dict (the plan's summary with the run's view of it)."""
        plan_summary = self.plan.summary()
        workers, why = worker_note(self.request)
        out = {
            **plan_summary,
            "cache": str(self.prepared.paths.final),
            "status": self.prepared.status,
            "jobs_to_run": len(self.prepared.todo),
            "deploy_mode": self.request.deploy_mode,
            "deploy_mode_reason": self.prepared.mode_reason,
            "workers": workers,
            "workers_note": why,
            "halts_on_recommendations": self.halts,
            "recommendations": [r.to_json() for r in self.recommendations],
        }
        for key in ("strategy", "strategy_reason", "stages"):
            out.setdefault(key, plan_summary.get(key))
        return out

    def text(self) -> str:
        """The figures as ``zarr-parallel plan`` prints them."""
        s = self.summary()
        rows = [
            ("cache", f"{s['cache']} ({s['status']})"),
            ("jobs", f"{s['jobs']} ({s['jobs_to_run']} to run)"),
            ("read amplification", f"{self.plan.read_amplification:.2f}"),
            (
                "largest job",
                f"{format_bytes(s['max_job_memory'])} of {format_bytes(s['memory_budget'])} budget",
            ),
            ("workers", f"up to {s['workers']} at once ({s['deploy_mode']})"),
        ]
        if s["deploy_mode_reason"]:
            rows.append(("deploy mode", f"{s['deploy_mode']} (auto: {s['deploy_mode_reason']})"))
        rows += strategy_lines(self.plan)  # as the run's artifact says it
        rows += [("note", n) for n in [*s["notes"], s["workers_note"]] if n]
        if self.prepared.applied is not None:
            rows.append(("applied", self.prepared.applied.sentence))
        for i, r in enumerate(self.recommendations):
            rows.append((f"recommendation {i + 1}", f"{r.sentence}; {r.set_options()}"))
        if self.halts:
            rows.append(
                ("halts", "a run would stop on these recommendations (recommend_changes=True)")
            )
        return "\n".join(f"{name + ':':<{_W}}{value}" for name, value in rows)

    def __repr__(self) -> str:
        return f"<zarr-parallel plan of {len(self.plan.jobs)} jobs>\n{self.text()}"

    def picture(self, variable: str | None = None) -> Picture:
        """The geometry of the picture of ``variable`` (default: the first).

        Raises
        ------
        RequestError
            ``variable`` is not one the plan writes.
        """
        name = variable or next(iter(self.arrays), None)
        if name is None or name not in self.arrays:
            raise RequestError(
                "picture_variable",
                variable,
                "is not a variable of this plan",
                f"Name one of {sorted(self.arrays)}",
            )
        return plan_picture(self.arrays[name], self.plan.jobs)

    def svg(self, variable: str | None = None) -> str:
        """The picture of ``variable`` as SVG text."""
        return picture_svg(self.picture(variable))

    def write_picture(self, path: str | Path, variable: str | None = None) -> Path:
        """Write the picture of ``variable`` to ``path``: SVG or PNG by its suffix."""
        return write_picture(self.picture(variable), Path(path))

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{escape(name)}</th><td style='text-align:left'>"
            f"{escape(value.strip())}</td></tr>"
            for name, value in (line.split(":", 1) for line in self.text().splitlines())
        )
        try:
            picture = self.svg()
        except RequestError:  # a plan without variables has no picture
            picture = ""
        script = (
            f"<details><summary>SLURM job script</summary><pre>{escape(self.slurm_script)}</pre>"
            "</details>"
            if self.slurm_script
            else ""
        )
        return (
            f"<div class='zarr-parallel-plan'><b>zarr-parallel plan</b><table>{rows}</table>"
            f"<div>{picture}</div>{script}</div>"
        )


def view_plan(req: CacheRequest) -> PlanView:
    """Plan ``req`` as a run would (nothing written) and return what to look at.

    A request that would halt on recommendations is planned as asked (the plan a
    ``recommend_changes='proceed'`` run would make), with the recommendations beside it and
    :attr:`PlanView.halts` set.

    Raises
    ------
    RequestError, PlanError
        Bad input or no plan within the memory limit.
    """
    recs: list[Recommendation] | None = None
    try:
        prepared = prepare(req)
    except RecommendationsPending as e:
        recs = list(e.recommendations)
        # The same plan (recommend_changes is not part of it), and the version it would write.
        prepared = prepare(req.model_copy(update={"recommend_changes": "proceed"}))
    return PlanView(
        prepared,
        plan_arrays(prepared),
        recommendations=prepared.recommendations if recs is None else recs,
        halts=recs is not None,
    )


def plan_arrays(prepared: Prepared) -> dict[str, ArrayInput]:
    """The planner inputs of a prepared run, by variable, in the dataset's order."""
    target = cached_target(prepared.request_json)
    by_name = {a.name: a for a in plan_inputs(target, prepared.request)}
    return {name: by_name[name] for name in target.variables if name in by_name}


def first_picture(prepared: Prepared) -> Picture | None:
    """The picture of a prepared run's first variable (None when it writes none)."""
    arrays = plan_arrays(prepared)
    first = next(iter(arrays.values()), None)
    return None if first is None else plan_picture(first, prepared.plan.jobs)
