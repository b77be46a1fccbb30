"""Prefect tasks: thin wrappers over :mod:`zarr_parallel.pipeline` (importable, small params)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
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
    """A keyed artifact name (``^[a-z0-9-]*$``) for this cache.

    The cache's name, then a short hash of its full path: runs of one cache share the key (the
    UI shows their history), and two caches of the same name in different folders do not.
    """
    paths = getattr(prepared_or_path, "paths", None)
    final = paths.final if paths is not None else Path(str(prepared_or_path))
    slug = re.sub(r"[^a-z0-9]+", "-", final.name.lower()).strip("-")[:60].rstrip("-")
    tag = hashlib.sha256(os.path.abspath(final).encode()).hexdigest()[:8]
    return f"{prefix}-{slug}-{tag}"
