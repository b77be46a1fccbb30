"""Showing a plan: the SLURM job script a run would submit, the plan view of the ``plan``
command and of ``ZarrParallelAssembler.plan()``, and the plan picture in the Prefect UI.

Prefect and dask-jobqueue are imported where they are used (the SLURM script, the artifact): the
``plan`` command and ``.plan()`` of a local mode import neither (seconds at start-up).

No chunk arithmetic here: the view and the picture come from :mod:`zarr_parallel.run.plan_view`
and :mod:`zarr_parallel.planning.picture`; the job script from dask-jobqueue's ``SLURMJob``
with the options the SLURM runner gives ``SLURMCluster``
(:func:`~zarr_parallel.orchestration.slurm.slurm_cluster_kwargs`), without starting a cluster.
"""

from __future__ import annotations

import base64
import inspect
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.planning.picture_svg import picture_svg
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.plan_view import PlanView, first_picture, view_plan
from zarr_parallel.run.steps import Prepared, recommendations_message

logger = logging.getLogger(__name__)

#: Stands for the scheduler's address in a job script shown before any cluster exists.
SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER-ADDRESS:PORT"


def _job_parameters() -> set[str]:
    """The keyword arguments a dask-jobqueue SLURM job takes (the cluster's own are dropped)."""
    from dask_jobqueue.core import Job
    from dask_jobqueue.slurm import SLURMJob

    names: set[str] = set()
    for cls in (SLURMJob, Job):
        names |= set(inspect.signature(cls.__init__).parameters)
    return names - {"self", "scheduler", "name", "base_class_kwargs"}


def slurm_job_script(prepared: Prepared) -> str:
    """The job script a SLURM run of ``prepared`` would submit for each worker.

    Built by dask-jobqueue's ``SLURMJob`` from the same options the SLURM runner passes to
    ``SLURMCluster`` (memory from the plan's largest job, walltime from ``worker_timeout``);
    only the scheduler's address is a placeholder, known once the cluster starts.
    """
    from dask_jobqueue.slurm import SLURMJob

    # Deferred: the runners and the SLURM options import Prefect and distributed.
    from zarr_parallel.orchestration.runners import current_api_url, worker_sizing
    from zarr_parallel.orchestration.slurm import log_directory, slurm_cluster_kwargs

    req = prepared.request
    jobs = len(prepared.todo) or len(prepared.plan.jobs)
    sizing = worker_sizing(req, prepared.plan.max_job_memory, jobs)
    options = slurm_cluster_kwargs(
        req, sizing, current_api_url(), log_directory(req, prepared.version)
    )
    keep = _job_parameters()
    logs = str(options.pop("log_directory"))
    job_class: Any = SLURMJob  # dask-jobqueue is untyped
    # dask-jobqueue creates the log directory when a job is made: make it in a scratch folder
    # and name the real one in the script, so that planning writes nothing.
    with tempfile.TemporaryDirectory(prefix="zp-plan-") as scratch:
        job = job_class(
            scheduler=SCHEDULER_PLACEHOLDER,
            name="zarr-parallel-0",
            log_directory=scratch,
            **{k: v for k, v in options.items() if k in keep},
        )
        return str(job.job_script()).replace(scratch, logs)


def describe_plan(req: CacheRequest) -> PlanView:
    """Plan ``req`` as a run would, writing nothing: the view the ``plan`` command prints and
    ``ZarrParallelAssembler.plan()`` returns, with the SLURM job script in SLURM mode."""
    view = view_plan(req)
    if view.request.deploy_mode == "slurm":
        view.slurm_script = slurm_job_script(view.prepared)
    return view


def picture_markdown(svg: str, legend: list[str], title: str) -> str:
    """Markdown showing an SVG inline (a data URI: no file, no server route) with its legend."""
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    lines = "\n".join(f"- {line}" for line in legend)
    return f'# {title}\n\n<img alt="{title}" src="data:image/svg+xml;base64,{data}"/>\n\n{lines}\n'


def publish_plan_picture(prepared: Prepared) -> str | None:
    """Publish the plan picture of the first variable as a markdown artifact; returns its key.

    A picture is a view of the plan: when it cannot be drawn the run goes on (logged).
    """
    try:
        picture = first_picture(prepared)
        if picture is None:
            return None
        markdown = picture_markdown(
            picture_svg(picture),
            [text for _key, text in picture.legend()],
            f"Plan of {picture.variable}",
        )
    except Exception as e:  # a view must not fail the run it shows
        logger.warning("no plan picture: %s", e)
        return None
    from prefect.artifacts import create_markdown_artifact

    # Deferred: the task module imports Prefect (a flow run has it already).
    from zarr_parallel.orchestration.tasks import artifact_key

    key = artifact_key("zp-plan-picture", prepared)
    create_markdown_artifact(markdown, key=key, description="Plan picture")
    return key


def plan_text(view: PlanView) -> str:
    """What the ``plan`` command prints: the figures, then the SLURM job script if any."""
    text = view.text()
    if view.slurm_script:
        text += (
            "\n\n# The job script a SLURM run submits, one per worker (the scheduler's address "
            f"is known once the cluster starts):\n{view.slurm_script}"
        )
    return text


def plan_command(req: CacheRequest, picture: str | None, variable: str | None) -> int:
    """The ``plan`` command: print the plan (and SLURM job script), write the picture if asked.

    Raises
    ------
    RecommendationsPending
        After printing, when a run would halt on recommendations (exit code 3).
    """
    view = describe_plan(req)
    print(plan_text(view))
    if picture:
        written = view.write_picture(Path(picture), variable)
        print(f"{'picture:':<21}{written}")
    if view.halts:
        sys.stdout.flush()
        message = recommendations_message(view.plan, view.recommendations)
        raise RecommendationsPending(view.plan, view.recommendations, message)
    return 0
