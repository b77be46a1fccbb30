"""A local dask cluster started while the command plans (docs/design.md §2b, Start-up).

An ad hoc run whose request names ``deploy_mode="dask_distributed"`` (no ``scheduler_address``)
will start a local cluster whatever the plan says, so the door starts its worker processes as
soon as the request is valid (:func:`cluster_ahead`): they import the stack while the command
plans, and the flow's :func:`~zarr_parallel.orchestration.cluster.cluster_in_background` takes
them (:func:`take_started`) instead of starting its own during initialisation. ``auto`` is not
started early: it chooses by the plan. SLURM clusters open after the store is initialised
(their log folder lies in the version).

A cluster started ahead is sized before the plan: ``simultaneous_worker_limit`` or one worker
per core (as :func:`zarr_parallel.run.steps.worker_count`), each with the request's
``memory_limit``. When the plan asks for other workers (fewer jobs than workers) it is closed
and the flow starts its own, as before. A run that ends without using it (up to date, an
invalid plan, a halt on recommendations, an error) closes it at once: no worker outlives the
command.

distributed and dask-jobqueue are imported only when a cluster starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from zarr_parallel.request.model import CacheRequest

if TYPE_CHECKING:
    from zarr_parallel.orchestration.cluster import StartedCluster
    from zarr_parallel.planning.sizing import WorkerSizing

logger = logging.getLogger(__name__)

#: The cluster the door started for the run in this context, until the flow takes it.
_waiting: ContextVar[list[StartedCluster] | None] = ContextVar(
    "zarr_parallel_early_cluster", default=None
)


def starts_early(req: CacheRequest) -> bool:
    """True when the run will start a local cluster whatever its plan: ``dask_distributed``
    named explicitly, with no ``scheduler_address``."""
    return req.deploy_mode == "dask_distributed" and req.scheduler_address is None


@contextmanager
def cluster_ahead(req: CacheRequest, api_url: str | None) -> Iterator[None]:
    """Start the run's local cluster now, when :func:`starts_early`, for the flow to take; close
    it when the block ends if the flow did not (or :func:`close_waiting` did not already).

    ``api_url`` is the Prefect API the flow will use (the workers are given it); without one
    known yet nothing starts early.
    """
    if not starts_early(req) or not api_url:
        yield
        return
    # Deferred: the cluster module imports distributed and dask-jobqueue (an up-to-date answer
    # in another mode never loads them).
    from zarr_parallel.orchestration.cluster import start_local_cluster
    from zarr_parallel.orchestration.runners import worker_sizing
    from zarr_parallel.run.steps import worker_count

    workers = worker_count(req)
    sizing = worker_sizing(req, req.memory_bytes, workers)
    started = start_local_cluster(req, sizing, api_url.rstrip("/"))
    logger.info("dask_distributed: starting %d local workers while the request is planned", workers)
    box = [started]
    token = _waiting.set(box)
    try:
        yield
    finally:
        _waiting.reset(token)
        _close(box, "the run did not use it")


def close_waiting(why: str) -> None:
    """Close the cluster started ahead, if the flow has not taken it: the run will not use it."""
    box = _waiting.get()
    if box:
        _close(box, why)


def take_started(
    req: CacheRequest, sizing: WorkerSizing, api_url: str | None
) -> StartedCluster | None:
    """The cluster started ahead for this run, when it fits the plan's ``sizing``; one that
    does not fit is closed (the flow starts its own)."""
    box = _waiting.get()
    if not box:
        return None
    started = box.pop()
    if started.fits(req, sizing, api_url):
        return started
    logger.info(
        "dask_distributed: the %d workers started during planning do not fit the plan "
        "(%d workers, Prefect API %s); starting the plan's own",
        started.workers,
        sizing.workers,
        api_url,
    )
    _stop(started)
    return None


def _close(box: list[StartedCluster], why: str) -> None:
    while box:
        started = box.pop()
        logger.info("dask_distributed: closing the workers started during planning (%s)", why)
        _stop(started)


def _stop(started: StartedCluster) -> None:
    try:
        started.close()
    except Exception as e:  # closing must not hide the run's own outcome
        logger.warning("closing the cluster started during planning failed: %s", e)


__all__ = ["close_waiting", "cluster_ahead", "starts_early", "take_started"]
