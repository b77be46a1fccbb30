"""The steps of a cache run, as plain functions the Prefect flow orchestrates.

``prepare`` (validate the source, plan, recommend, choose the version: no writes), ``initialise``
(metadata-only store), ``run_job`` (in :mod:`zarr_parallel.run.job`) and ``finish`` (completeness
check, verify, consolidate, publish; in :mod:`zarr_parallel.run.finish`). Flows call these and
nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import psutil

from zarr_parallel.errors import RecommendationsPending, RequestError, RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.planning.fingerprint import fingerprint
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.planning.plan import Plan
from zarr_parallel.planning.sizing import local_workers, worker_overhead
from zarr_parallel.planning.strategy import choose_plan
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.secrets import redact
from zarr_parallel.run.auto_mode import resolve_deploy_mode
from zarr_parallel.run.chunk_advice import shape_recommendations
from zarr_parallel.run.preflight import run_preflight
from zarr_parallel.run.recommend import (
    Recommendation,
    halts_on_recommendations,
    recommend,
    recommendations_text,
)
from zarr_parallel.run.stages import initialise_stages, stage_request, stage_todo
from zarr_parallel.sources.fastread import mark_fast
from zarr_parallel.sources.target import (
    Target,
    build_target,
    cached_source,
    cached_target,
    fresh_source,
)
from zarr_parallel.store.codecs import variable_compression
from zarr_parallel.store.disk_names import LOCK_GUARD
from zarr_parallel.store.intermediate import stage_path
from zarr_parallel.store.lock import CacheLock, held_token
from zarr_parallel.store.manifest import (
    check_lock_token,
    is_complete,
    plan_differences,
    plan_record,
    recorded_jobs,
    same_content,
    write_fence,
)
from zarr_parallel.store.ownership import check_cache_location
from zarr_parallel.store.paths import CachePaths, pending_record, resolve_paths
from zarr_parallel.store.publish import clean_stale_links, clean_temporary
from zarr_parallel.store.zarr_io import initialise_store
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)

Status = Literal["fresh", "resume", "up_to_date"]
#: What ``prepare`` chose: the version, its status, the jobs to run and the plan they come from.
Choice = tuple[Path, Status, list[int], Plan]


def worker_count(req: CacheRequest) -> int:
    """Workers running at once: ``simultaneous_worker_limit`` or the machine's cores.

    Local workers are capped by the machine's memory (see :func:`worker_note`).
    """
    count, note = worker_note(req)
    if note:
        _warn_once(note)
    return count


def worker_note(req: CacheRequest) -> tuple[int, str | None]:
    """Workers running at once, and why that differs from the request (or is unusual)."""
    if req.deploy_mode == "series":
        return 1, None
    cores = os.cpu_count() or 1
    if req.deploy_mode == "dask_distributed" and req.scheduler_address is None:
        memory = int(psutil.virtual_memory().total)
        return local_workers(req.simultaneous_worker_limit, cores, memory, req.memory_bytes)
    return req.simultaneous_worker_limit or cores, None


@functools.lru_cache(maxsize=64)
def _warn_once(note: str) -> None:
    # Planning asks for the count many times (recommendations re-plan); say it once.
    logger.warning(note)


def limits_for(req: CacheRequest) -> Limits:
    """The planner's budgets for a request (docs/design.md §2a, Sizing)."""
    workers = worker_count(req)
    min_jobs = req.num_jobs or (1 if workers == 1 else 2 * workers)
    # Beside a dask worker process the job process gets less ([parallel], execution.py).
    overhead = worker_overhead(req.deploy_mode)
    budget = req.memory_bytes - req.reserve_bytes - overhead
    if budget <= 0:
        raise RequestError(
            "memory_limit",
            req.memory_limit,
            f"leaves nothing for jobs after the {format_bytes(req.reserve_bytes)} interpreter "
            f"reserve and the {format_bytes(overhead)} dask worker process of each worker",
            f"Raise memory_limit above {format_bytes(req.reserve_bytes + overhead)} (1GB or more "
            "is sensible), or use deploy_mode='series'",
        )
    return Limits(
        memory_budget=budget,
        min_jobs=min_jobs,
        # Only a num_jobs the user set is named in a note when the plan cannot reach it.
        min_jobs_derived=req.num_jobs is None,
        workers=workers,
        time_budget=req.timeout_seconds / 2,
        reserve=req.reserve_bytes,
        overhead=overhead,
    )


def plan_inputs(target: Target, req: CacheRequest) -> list[ArrayInput]:
    """The planner's inputs: the target's arrays, marked where the fast path will write them
    and where their codec leaves chunks uncompressed (the memory model counts fewer buffers)."""
    inputs = mark_fast(target, req, target.array_inputs())
    return [
        replace(a, compressed=variable_compression(req, target.dataset[a.name]).compresses)
        for a in inputs
    ]


def make_plan(req: CacheRequest) -> tuple[Target, Plan]:
    """Open (cached), transform and plan a request."""
    target = build_target(req, cached_source(req))
    inputs, limits = plan_inputs(target, req), limits_for(req)
    if target.tiling is not None:
        target.tiling.check_fits(inputs, limits)  # refuse with the largest tile that fits
    # The fingerprint covers the request, the source's state (files, sizes, modification times,
    # chunk layout) and the plan: a changed source is never resumed into or reported up to date.
    digest = fingerprint(req.digest(), target.layout.digest)
    # Tiled targets build their arrays lazily from tiles: no intermediate store for them.
    plan = choose_plan(inputs, limits, digest, allow_staged=target.tiling is None)
    if target.layout.pending:
        # Steps left out until every variable has them (files holding different variables).
        plan = dataclasses.replace(plan, notes=(*plan.notes, *target.layout.pending))
    return target, plan


@dataclass
class Prepared:
    """Everything decided before the first write."""

    request: CacheRequest
    paths: CachePaths
    plan: Plan
    version: Path
    status: Status
    todo: list[int]
    recommendations: list[Recommendation] = field(default_factory=list)
    applied: Recommendation | None = None
    layout: dict[str, Any] = field(default_factory=dict)
    #: Why ``deploy_mode="auto"`` chose the request's mode ("" when the request named it).
    mode_reason: str = ""
    #: A staged plan's intermediate stores, one per earlier stage (store.intermediate).
    intermediates: list[str] = field(default_factory=list)

    @property
    def request_json(self) -> str:
        """The request as shipped to workers."""
        return self.request.model_dump_json()

    def first_write(self) -> tuple[str, str] | None:
        """The request (JSON) and folder of the first jobs to run (None: none left): the
        first stage with jobs left, else the version."""
        for n, stage in enumerate(self.plan.stages, start=1):
            if stage_todo(self.plan, self.intermediates, n):
                request = stage_request(self.request, stage).model_dump_json()
                return request, str(self.intermediates[n - 1])
        return (self.request_json, str(self.version)) if self.todo else None

    def plan_json(self) -> dict[str, Any]:
        """The plan as stored in the version's manifest."""
        return {
            **self.plan.to_json(),
            # Masked as a second defence (literal secrets were refused at validation); the
            # environment's values are not looked for, so the stored request reads back as is.
            "request": redact(self.request.model_dump(mode="json"), env_values=False),
            "layout": self.layout,
            # Whose version this is: only this cache path may ever replace or prune it.
            "cache_path": self.paths.canonical,
            **({"intermediates": self.intermediates} if self.intermediates else {}),
        }


def prepare(req: CacheRequest, check_location: bool = True) -> Prepared:
    """Validate against the source, plan, apply the recommendation policy and pick the version.

    Parameters
    ----------
    req
        The request.
    check_location
        Refuse a cache path holding what the cache does not own
        (:func:`~zarr_parallel.store.ownership.check_cache_location`); ``verify`` plans only to
        compare.

    Raises
    ------
    RequestError, PlanError
        Bad input or no plan within the memory limit (nothing is written).
    RecommendationsPending
        The plan re-reads source chunks and ``recommend_changes="halt"``.
    """
    paths = resolve_paths(req)
    if check_location:  # verify plans only to compare, and may read a copied cache
        check_cache_location(req, paths)
    source = fresh_source(req)
    req, choice = resolve_deploy_mode(req, make_plan)
    target, plan = make_plan(req)
    recs: list[Recommendation] = []
    applied: Recommendation | None = None
    halts = halts_on_recommendations(plan)
    if (halts or plan.stages) and req.recommend_changes != "proceed":
        # A plan that re-reads the source, or writes and reads an intermediate store, may have
        # a cheaper target chunk shape (run.chunk_advice).
        shapes = shape_recommendations(
            req, target, plan_inputs(target, req), limits_for(req), plan, make_plan
        )
        if not halts:
            # Listed beside the plan, never halting or applied: it reads each source chunk
            # once as asked (docs/design.md §2b).
            recs = shapes
            if recs:
                logger.info("a cheaper target chunk shape: %s", recs[0].sentence)
        else:
            recs = recommend(req, source, target, plan, make_plan, shapes)
            if req.recommend_changes == "halt":
                raise RecommendationsPending(plan, recs, recommendations_message(plan, recs))
            if recs:
                applied = recs[0]
                req = req.model_copy(update=applied.changes)
                target, plan = make_plan(req)
                logger.info("applied recommendation: %s", applied.sentence)
    layout = source.layout.to_json()
    prepared = Prepared(req, paths, plan, paths.final, "fresh", [], recs, applied, layout)
    if choice is not None:
        prepared.mode_reason = choice.reason
    version, status, todo, plan = _choose_version(req, paths, plan, prepared.plan_json())
    prepared.version, prepared.status, prepared.todo, prepared.plan = version, status, todo, plan
    if plan.stages and status != "up_to_date":
        prepared.intermediates = [
            str(stage_path(paths, n, plan.fingerprint, req.temp_store))
            for n in range(1, len(plan.stages) + 1)
        ]
    if status != "up_to_date":
        run_preflight(req, paths, target, plan, source, todo)
    fault_point("planned")
    return prepared


def recommendations_message(plan: Plan, recs: list[Recommendation]) -> str:
    """The text shown when a run halts on recommendations
    (:func:`zarr_parallel.run.recommend.recommendations_text`)."""
    return recommendations_text(plan, recs)


def _choose_version(
    req: CacheRequest, paths: CachePaths, plan: Plan, plan_json: dict[str, Any]
) -> Choice:
    """The version to write (or keep), what it is, the jobs to run and the plan they come from.

    A version holding the same content counts whatever plan made it (store.same_content): a
    request run again in another deploy mode or with another memory limit is up to date, and
    an interrupted run of it continues with its own plan's jobs if they fit this run's budget.
    """
    fp = plan.fingerprint
    current = paths.current()
    if current is not None and is_complete(current):
        published = _published_choice(req, paths, current, plan, plan_json)
        if published is not None:
            return published
    else:
        _check_foreign_final(req, paths)
    # Unpublished versions: interrupted runs (no complete.json), or complete but killed before
    # publishing. Only one with this exact plan fingerprint may be continued; others are cleaned
    # by initialise, never mixed with this run.
    others = [v for v in paths.all_versions() if v != current]
    matching = [v for v in others if (plan_record(v) or {}).get("fingerprint") == fp]
    if not matching and req.resume is not False:
        adopted = _adopted_choice(others, plan)
        if adopted is not None:
            return adopted
    if req.resume is True and not matching:
        raise _nothing_to_resume(others, plan_json)
    if matching and req.resume is not False:
        version = matching[-1]
        done = recorded_jobs(version, fp)
        return version, "resume", [j.id for j in plan.jobs if j.id not in done], plan
    return paths.next_version(fp), "fresh", [j.id for j in plan.jobs], plan


def _published_choice(
    req: CacheRequest, paths: CachePaths, current: Path, plan: Plan, plan_json: dict[str, Any]
) -> Choice | None:
    """The published version when it holds this content (up to date); None to write anew.

    Raises
    ------
    RequestError
        It holds other content and ``overwrite`` is False.
    """
    rec = plan_record(current)
    if same_content(rec, plan_json):
        if rec and _split_differently(rec, plan):
            plan = Plan.from_json(rec)  # report the jobs that made it, not this split
        return current, "up_to_date", [], plan
    if not req.overwrite:
        raise RequestError(
            "overwrite",
            False,
            f"{paths.final} holds a cache of a different request or source "
            f"({_differences(rec, plan_json)})",
            "Set overwrite=True to publish a new version (the old one is kept), or use a "
            "new cache_label",
        )
    return None


def _check_foreign_final(req: CacheRequest, paths: CachePaths) -> None:
    """Refuse, without ``overwrite``, a final path that exists but is no published version."""
    if paths.final.exists() and not paths.final.is_symlink() and not req.overwrite:
        raise RequestError(
            "overwrite",
            False,
            f"{paths.final} exists and was not made by this version",
            "Set overwrite=True (it is kept beside the new version) or choose another path",
        )


def _adopted_choice(others: list[Path], plan: Plan) -> Choice | None:
    """Continue an interrupted run of the same content with its own plan, if one fits."""
    adopted = _adoptable(others, plan)
    if adopted is None:
        return None
    version, stored = adopted
    done = recorded_jobs(version, stored.fingerprint)
    logger.info(
        "continuing the interrupted run %s with its own plan (%d jobs, %d done): it "
        "writes the same content as this request's plan",
        version.name,
        len(stored.jobs),
        len(done),
    )
    return version, "resume", [j.id for j in stored.jobs if j.id not in done], stored


def _nothing_to_resume(others: list[Path], plan_json: dict[str, Any]) -> RequestError:
    """The refusal of ``resume=True`` when no interrupted run of this plan exists."""
    interrupted = [v for v in others if plan_record(v) is not None and not is_complete(v)]
    found = (
        f"the interrupted run {interrupted[-1].name} was of a different request or source "
        f"({_differences(plan_record(interrupted[-1]), plan_json)})"
        if interrupted
        else "no interrupted run of this cache was found"
    )
    return RequestError(
        "resume",
        True,
        found,
        "Use resume='auto' to start afresh (the interrupted run is then discarded), or run "
        "the same request as before to continue it",
    )


def _adoptable(versions: list[Path], plan: Plan) -> tuple[Path, Plan] | None:
    """The latest unpublished version of the same content whose jobs fit ``plan``'s budget.

    Only a full run's version: a re-cache append's plan covers its new region alone, and the
    re-cache flow continues its own.
    """
    for version in reversed(versions):
        rec = plan_record(version)
        if rec is None or not read_jobs(rec) or not _split_differently(rec, plan):
            continue
        stored = Plan.from_json(rec)
        if stored.max_job_memory <= plan.memory_budget:
            return version, stored
        logger.info(
            "not continuing %s: its jobs need up to %s, more than this run's budget %s",
            version.name,
            format_bytes(stored.max_job_memory),
            format_bytes(plan.memory_budget),
        )
    return None


def _split_differently(rec: dict[str, Any], plan: Plan) -> bool:
    """A stored full plan of the same content as ``plan`` with other jobs."""
    return rec.get("content_fingerprint") == plan.content_fingerprint and (
        rec.get("fingerprint") != plan.fingerprint
    )


def _differences(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    changes = plan_differences(old, new)
    return "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")


def run_lock(req: CacheRequest, writes: bool = True) -> CacheLock:
    """The lock of the request's cache (a context manager; see :mod:`zarr_parallel.store.lock`).

    For a run that ``writes``, the cache location is checked first (before the lock file
    exists): a run never starts on a path holding something it does not own.
    """
    paths = resolve_paths(req)
    if writes:
        check_cache_location(req, paths)
    return CacheLock(paths.lock, break_lock=req.break_lock, guard=paths.versions / LOCK_GUARD)


def _lock_check(paths: CachePaths, token: str | None) -> Callable[[str], None] | None:
    """The run's lock check (:func:`check_lock_token`), or None for a run without a lock."""
    if token is None:
        return None
    return lambda before: check_lock_token(paths.lock, token, before)


def initialise(prepared: Prepared) -> None:
    """Clean what killed runs left, then create the staging version (metadata only) if fresh.

    The caller holds the cache's lock, so nothing cleaned here belongs to a live run.
    """
    paths = prepared.paths
    token = held_token(paths.lock)
    if token is not None and prepared.status != "up_to_date":
        # A run paused after planning whose lock was broken must clean and create nothing: the
        # run that took the lock over may be writing the very versions cleaned here.
        check_lock_token(paths.lock, token, "initialising")
    current = paths.current()
    clean_stale_links(paths)
    # Stale staging versions of other plans are cleaned, never mixed with this run.
    for stale in paths.all_versions():
        if stale not in (current, prepared.version) and not is_complete(stale):
            logger.info("removing stale staging version %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
            pending_record(paths, stale).unlink(missing_ok=True)
    if prepared.status == "resume":
        removed = clean_temporary(prepared.version)
        logger.info(
            "resuming %s: %d of %d jobs left (%d temporary files of killed writes removed)",
            prepared.version,
            len(prepared.todo),
            len(prepared.plan.jobs),
            removed,
        )
    if prepared.status == "fresh":
        target = cached_target(prepared.request_json)
        try:
            initialise_store(
                target,
                prepared.version,
                prepared.request,
                prepared.plan_json(),
                fence=_lock_check(paths, token),
            )
        except OSError as e:
            raise RunFailed(
                f"could not initialise the cache's new version {prepared.version} ({e}); "
                f"nothing was published and {paths.final} is unchanged. Fix the cause (space, "
                "permissions) and run again"
            ) from e
    initialise_stages(
        paths, prepared.request, prepared.plan, prepared.intermediates, prepared.layout
    )
    if token is not None and prepared.status != "up_to_date":
        # Every job checks, before it records, that the run writing this version still holds
        # the lock (a run whose lock was broken while it was paused must record nothing).
        try:
            for folder in [prepared.version, *map(Path, prepared.intermediates)]:
                write_fence(folder, paths.lock, token)
        except OSError as e:
            raise RunFailed(
                f"could not write the lock fence of {prepared.version} ({e}); nothing was "
                f"published and {paths.final} is unchanged. Fix the cause (space, permissions) "
                "and run again"
            ) from e
    fault_point("initialised")
