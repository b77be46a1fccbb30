"""Prefect tasks: thin wrappers over :mod:`zarr_parallel.pipeline` (importable, small params)."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from zarr_parallel.pipeline import Prepared, finish, initialise, prepare
from zarr_parallel.request import CacheRequest
from zarr_parallel.write import run_job


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(request: CacheRequest) -> Prepared:
    """Inspect the source layout, plan, recommend and choose the version (no writes)."""
    return prepare(request)


@task(name="initialise-store", cache_policy=NO_CACHE)
def initialise_task(prepared: Prepared) -> None:
    """Write the metadata-only store of a fresh version."""
    initialise(prepared)


@task(name="write", cache_policy=NO_CACHE)
def write_task(
    request_json: str, version: str, job_ids: list[int], generate_stats: bool = False
) -> list[dict[str, Any]]:
    """Run a group of write jobs; each is recorded in the manifest as it finishes."""
    results = []
    for job_id in job_ids:
        results.append(run_job(request_json, version, job_id, generate_stats))
    return results


@task(name="finish", cache_policy=NO_CACHE)
def finish_task(
    prepared: Prepared, results: list[dict[str, Any]], started: float
) -> dict[str, Any]:
    """Check completeness, consolidate metadata and publish atomically."""
    return finish(prepared, results, started)


def artifact_key(prefix: str, prepared_or_path: Any) -> str:
    """A keyed artifact name (``^[a-z0-9-]*$``) for this cache."""
    name = str(
        (getattr(prepared_or_path, "paths", None) and prepared_or_path.paths.final.name)
        or prepared_or_path
    )
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{prefix}-{slug}"[:100].rstrip("-")
