"""``deploy_mode="auto"`` resolved for one request: the machine's figures and a first plan fed to
the rules of :mod:`zarr_parallel.planning.deploy_choice` (docs/design.md §2b).

The plan depends on the mode (a local cluster's jobs hold back a worker process's memory and are
split for its workers), so ``auto`` first plans as one process would run it; when the rules
choose a cluster, the caller plans again for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil

from zarr_parallel.planning.deploy_choice import ModeChoice, ModeFacts, choose_deploy_mode
from zarr_parallel.planning.plan import Plan
from zarr_parallel.planning.sizing import local_workers
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.fastread import process_cores


def machine_facts(req: CacheRequest, plan: Plan) -> ModeFacts:
    """The figures :func:`~zarr_parallel.planning.deploy_choice.choose_deploy_mode` looks at."""
    cores = process_cores()
    memory = int(psutil.virtual_memory().total)
    fit, _ = local_workers(req.simultaneous_worker_limit, cores, memory, req.memory_bytes)
    return ModeFacts(
        scheduler_address=req.scheduler_address is not None,
        cores=cores,
        local_workers=fit,
        jobs=len(plan.jobs),
        write_bytes=plan.write_bytes,
    )


def resolve_deploy_mode(
    req: CacheRequest, make_plan: Callable[[CacheRequest], tuple[Any, Plan]]
) -> tuple[CacheRequest, ModeChoice | None]:
    """The request with ``auto`` replaced by the mode it chooses, and the choice (None when the
    request named its mode).

    Parameters
    ----------
    req
        The validated request.
    make_plan
        Plans a request (:func:`zarr_parallel.run.steps.make_plan`); called once, in series.
    """
    if req.deploy_mode != "auto":
        return req, None
    if req.scheduler_address is not None:
        choice = choose_deploy_mode(ModeFacts(True, 1, 1, 0, 0))
    else:
        series = req.model_copy(update={"deploy_mode": "series"})
        _, plan = make_plan(series)
        choice = choose_deploy_mode(machine_facts(req, plan))
    return req.model_copy(update={"deploy_mode": choice.mode}), choice
