"""Prefect tasks: thin wrappers over :mod:`zarr_parallel.run.steps` (importable, small params)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as current_task_run

from zarr_parallel.errors import LockLost, RecommendationsPending, SourceChanged
from zarr_parallel.logs import set_log_level
from zarr_parallel.planning.jobs import Job, read_jobs
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.secrets import redact_text
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.job_process import (
    JobError,
    JobMemoryExceeded,
    WorkerClosing,
    closing,
    job_process_limit,
    run_job_isolated,
)
from zarr_parallel.run.steps import Prepared, initialise, prepare
from zarr_parallel.store.disk_names import manifest_dir
from zarr_parallel.store.files import read_json, write_json_atomic
from zarr_parallel.store.manifest import check_fence, plan_record, recorded_jobs


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(request: CacheRequest) -> Prepared | RecommendationsPending:
    """Inspect the source layout, plan, recommend and choose the version (no writes).

    A plan that halts on recommendations is this task's result, not its failure: halting is an
    expected outcome, which the flow ends in ``AwaitingDecision`` or a pause
    (:mod:`zarr_parallel.orchestration.halt`); a failed task would log a traceback.
    """
    try:
        return prepare(request)
    except RecommendationsPending as e:
        return e


@task(name="initialise-store", cache_policy=NO_CACHE)
def initialise_task(prepared: Prepared) -> None:
    """Write the metadata-only store of a fresh version."""
    initialise(prepared)


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: a job that outgrew its memory would only do so again, a source
    that changed stays changed, a run that lost its lock stays without it, and a closing worker
    retries nothing (the flow gives the task to another worker)."""
    return (
        not isinstance(state.data, JobMemoryExceeded | WorkerClosing | SourceChanged | LockLost)
        and not closing()
    )


@task(name="write", cache_policy=NO_CACHE, retry_condition_fn=_worth_retrying)
def write_task(
    request_json: str,
    version: str,
    job_ids: list[int],
    generate_stats: bool = False,
    fence: str | None = None,
) -> list[dict[str, Any]]:
    """Run a group of write jobs, each in this worker's job process under ``worker_timeout``.

    ``fence`` is the token the flow holds the cache's lock with: every job checks, before it
    records, that the lock still holds it (a run whose lock was broken records nothing).

    Each job is recorded in the manifest as it finishes; a retry of the group skips the jobs
    already recorded. A job that passes its deadline has its process killed (not merely
    abandoned) and the task fails, so Prefect retries it. In series mode jobs run in the flow
    process itself, without a job process.
    """
    req = CacheRequest.model_validate_json(request_json)
    if req.deploy_mode != "series":
        # On a worker, print what log_level asks for, as the flow process does.
        set_log_level(req.log_level)
    plan = plan_record(Path(version)) or {}
    fp = str(plan.get("fingerprint"))
    jobs = read_jobs(plan)
    done = recorded_jobs(Path(version), fp)
    limit = job_process_limit(req.deploy_mode, req.memory_bytes)
    attempt = int(current_task_run.run_count or 1)
    mark_attempt(Path(version), str(current_task_run.id), attempt, fence)
    logger = get_run_logger()
    worker = {
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    results: list[dict[str, Any]] = []
    for job_id in job_ids:
        if job_id in done:
            # Finished by an earlier attempt of this task: keep its record, do not rewrite.
            results.append({**read_job_record(Path(version), job_id), "attempts": attempt - 1})
            continue
        describe = f"job {job_id} {describe_job(jobs, job_id)}"
        started = time.time()
        try:
            if req.deploy_mode == "series":
                # In the flow process, as series mode promises (and a debugger can follow it).
                record = run_job(request_json, version, job_id, generate_stats, fence)
            else:
                record = run_job_isolated(
                    request_json,
                    version,
                    job_id,
                    generate_stats,
                    timeout=req.timeout_seconds,
                    memory_limit=limit,
                    describe=describe,
                    log_level=req.log_level,
                    fence=fence,
                )
        except Exception as e:
            # The message becomes the task's state message, stored by the Prefect API and shown
            # in the UI: a signed URL from a kerchunk reference or a secret must not land there.
            safe = redact_text(str(e))
            if safe != str(e):
                raise JobError(f"{type(e).__name__}: {safe}") from None
            raise
        finished = time.time()
        record.update(
            attempts=attempt,
            started=started,
            finished=finished,
            worker={**worker, "rss": psutil.Process().memory_info().rss},
        )
        logger.debug("%s done in %.1f s", describe, finished - started)
        results.append(record)
    return results


def mark_attempt(version: Path, task_run_id: str, attempt: int, fence: str | None = None) -> None:
    """Note that attempt ``attempt`` of a write task run began (the flow counts attempts of
    runs whose worker died from these notes: the Prefect API may not have recorded them yet).

    Raises
    ------
    LockLost
        The version is gone: the run that took the cache's lock over removed it (``fence`` is
        this run's lock token, see :func:`~zarr_parallel.store.manifest.check_fence`).
    """
    folder = manifest_dir(version) / "attempts"
    try:
        # No parents: a note must never bring back a version another run removed.
        folder.mkdir(exist_ok=True)
        write_json_atomic(
            folder / f"{task_run_id}.json",
            {"attempt": attempt, "pid": os.getpid(), "time": time.time()},
            parents=False,
        )
    except FileNotFoundError:
        check_fence(version, "starting its jobs", fence)
        raise


def attempts_made(version: Path, task_run_id: str) -> int:
    """Attempts a write task run began: 0 when it never started."""
    note = read_json(manifest_dir(version) / "attempts" / f"{task_run_id}.json")
    return int(note["attempt"]) if note else 0


def describe_region(variables: Sequence[str], region: Sequence[Sequence[Any]]) -> str:
    """``t2m,d2m[time 0:24, latitude 0:721]``: a job's region for messages."""
    dims = ", ".join(f"{d} {a}:{b}" for d, a, b in region)
    return f"{','.join(variables)}[{dims}]"


def describe_job(jobs: Mapping[int, Job], job_id: int) -> str:
    """Job ``job_id``'s region for messages (:meth:`Job.describe`); ``[]`` for one not planned."""
    job = jobs.get(job_id)
    return job.describe() if job is not None else describe_region((), ())


def read_job_record(version: Path, job_id: int) -> dict[str, Any]:
    """The manifest record of a finished job."""
    return read_json(manifest_dir(version) / "jobs" / f"{job_id:06d}.json") or {"id": job_id}


@task(name="finish", cache_policy=NO_CACHE)
def finish_task(
    prepared: Prepared, results: list[dict[str, Any]], started: float
) -> dict[str, Any]:
    """Check completeness, consolidate metadata and publish atomically."""
    return finish(prepared, results, started)


def artifact_key(prefix: str, prepared_or_path: Any) -> str:
    """A keyed artifact name (``^[a-z0-9-]*$``) for this cache.

    The cache's name, then a short hash of its full path: runs of one cache share the key (the
    UI shows their history), and two caches of the same name in different folders do not.
    """
    paths = getattr(prepared_or_path, "paths", None)
    final = paths.final if paths is not None else Path(str(prepared_or_path))
    slug = re.sub(r"[^a-z0-9]+", "-", final.name.lower()).strip("-")[:60].rstrip("-")
    tag = hashlib.sha256(os.path.abspath(final).encode()).hexdigest()[:8]
    return f"{prefix}-{slug}-{tag}"
