"""The run's last step: check completeness, verify the new version, publish and summarise.

:func:`finish` follows :func:`~zarr_parallel.run.steps.prepare`,
:func:`~zarr_parallel.run.steps.initialise` and the jobs (:mod:`zarr_parallel.run.job`). It sits
above :mod:`zarr_parallel.run.verify` (which plans through :mod:`zarr_parallel.run.steps` to
compare), so the imports point one way: steps ← verify ← finish.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from zarr_parallel.errors import RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.run.job_stats import merge_stats
from zarr_parallel.run.steps import Prepared
from zarr_parallel.run.verify import verify_cache
from zarr_parallel.sources.identity import check_sources
from zarr_parallel.store.intermediate import remove_intermediates
from zarr_parallel.store.lock import held_token
from zarr_parallel.store.manifest import (
    check_complete,
    check_lock_token,
    iter_job_records,
    plan_record,
    unrecord_job,
)
from zarr_parallel.store.publish import clean_temporary, publish
from zarr_parallel.store.zarr_io import finalise

logger = logging.getLogger(__name__)


def _verify_staging(prepared: Prepared) -> None:
    """Compare the staging version with the source; refuse to publish a mismatch."""
    full = prepared.request.verify_before_publish == "full"
    report = verify_cache(
        prepared.request,
        "full" if full else "sample",
        version=prepared.version,
        staging=True,
    )
    if not report.ok:
        # Un-record the jobs whose regions hold a problem: the next run writes them again.
        plan_json = plan_record(prepared.version) or prepared.plan_json()
        bad = sorted(
            {
                job.id
                for job in read_jobs(plan_json).values()
                for p in report.problems
                if p.region and p.variable in job.variables and _overlap(job.region, p.region)
            }
        )
        for job_id in bad:
            unrecord_job(prepared.version, job_id)
        raise RunFailed(
            f"the new version does not match its source, so it was not published; the records "
            f"of jobs {bad[:10]} were removed: run again to write them again.\n{report.text()}",
            [{"id": j} for j in bad],
        )
    logger.info(
        "verified %s before publishing: %d chunks", prepared.version, report.chunks_compared
    )


def _overlap(a: Any, b: Any) -> bool:
    """True when two regions (``[dim, start, stop]`` lists) share an element."""
    bounds = {str(d): (int(lo), int(hi)) for d, lo, hi in a}
    for d, lo, hi in b:
        if str(d) in bounds:
            alo, ahi = bounds[str(d)]
            if int(hi) <= alo or ahi <= int(lo):
                return False
    return True


def finish(prepared: Prepared, results: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Check completeness, consolidate, publish and summarise."""
    req, plan = prepared.request, prepared.plan
    token = held_token(prepared.paths.lock)
    if prepared.status != "up_to_date":
        if token is not None:
            check_lock_token(prepared.paths.lock, token, "finishing")
        plan_json = plan_record(prepared.version) or prepared.plan_json()
        check_complete(prepared.version, plan_json)
        # Temporary files of attempts that died (retried jobs) must not be published.
        clean_temporary(prepared.version)
        records = list(iter_job_records(prepared.version))
        fault_point("before-finalise")
        if token is not None:
            # Paused here past the stale threshold, the run must not write its version again:
            # the run that took the lock over may have removed it (docs/design.md §4).
            check_lock_token(prepared.paths.lock, token, "finalising")
        if req.verify_before_publish != "off":
            _verify_staging(prepared)
        # Last, after every read: a source that changed during the run (after a job read it)
        # fails the run here and the published version stays.
        checked = check_sources(req, (plan_json.get("layout") or {}).get("identity"))
        logger.debug("source unchanged since planning: %d entries checked", checked)
        try:
            finalise(prepared.version, {"fingerprint": plan.fingerprint, "jobs": len(plan.jobs)})
            fault_point("before-publish")
            fence = (
                None
                if token is None
                else functools.partial(check_lock_token, prepared.paths.lock, token)
            )
            publish(
                prepared.paths,
                prepared.version,
                req.keep_versions,
                req.min_version_age_seconds,
                fence,
            )
            if prepared.intermediates:
                # Published: the intermediate stores have served (docs/design.md §3.4).
                remove_intermediates(prepared.paths, prepared.intermediates)
        except OSError as e:
            raise RunFailed(
                f"every job finished but publishing {prepared.version} failed ({e}); "
                f"{prepared.paths.final} is unchanged. Fix the cause and run again: the "
                "finished jobs are kept and only publishing is repeated"
            ) from e
    else:
        records = list(iter_job_records(prepared.version))
    summary: dict[str, Any] = {
        "status": "up to date" if prepared.status == "up_to_date" else "done",
        "resumed": prepared.status == "resume",
        "cache": str(prepared.paths.final),
        "version": str(prepared.version),
        "jobs": len(plan.jobs),
        "jobs_run": len(results),
        "jobs_skipped": len(plan.jobs) - len(prepared.todo),
        "read_amplification": round(plan.read_amplification, 4),
        "max_job_memory": plan.max_job_memory,
        "max_peak_memory": max((int(r.get("peak_memory", 0)) for r in records), default=0),
        "bytes_written": sum(int(r.get("bytes", 0)) for r in results),
        "seconds": round(time.time() - started, 3),
        "fingerprint": plan.fingerprint,
        "applied_recommendation": prepared.applied.to_json() if prepared.applied else None,
        "notes": list(plan.notes),
        "strategy": plan.strategy,
        "stages": plan.stage_rows(),
    }
    if req.generate_stats:
        summary["stats"] = merge_stats(records)
    return summary
