"""The earlier stages of a staged plan (docs/design.md §3.4, "Strategies"): their requests,
their intermediate stores and the jobs left in each.

Stage 1 is an ordinary direct plan from the source to an intermediate target: the request with
the intermediate chunks (every preprocessor applied there), written into its own store
(:mod:`zarr_parallel.store.intermediate`) by :func:`zarr_parallel.run.job.run_job`, with its own
manifest so it resumes job by job. Every later stage copies the stored values of the intermediate
before it: a middle stage (plans of more than two stages) into the next intermediate, the last
stage into the version. Each store's ``plan.json`` lists, under ``intermediates``, the stores
written before it; its jobs copy from the last of them (none: they read the source).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RunFailed
from zarr_parallel.planning.plan import Plan, Stage
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.secrets import redact
from zarr_parallel.sources.target import cached_target
from zarr_parallel.store.intermediate import (
    initialise_intermediate,
    remove_intermediates,
    stale_intermediates,
)
from zarr_parallel.store.manifest import plan_record, recorded_jobs
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.publish import clean_temporary
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)


def stage_request(req: CacheRequest, stage: Stage) -> CacheRequest:
    """``req`` writing ``stage``'s intermediate chunks: one length per dimension, no shards.

    No statistics: the run reports its last stage's (an earlier stage's would be discarded,
    and a middle stage would decode every region it copies only to count it).
    """
    chunks: dict[str, int] = {}
    dims = {name: job.region for job in stage.plan.jobs for name in job.variables}
    for name, lengths in stage.chunks:
        for (dim, _, _), length in zip(dims[name], lengths, strict=True):
            chunks[str(dim)] = int(length)
    return req.model_copy(update={"chunks": chunks, "shards": None, "generate_stats": False})


def stage_plan_json(
    req: CacheRequest,
    plan: Plan,
    n: int,
    layout: dict[str, Any],
    cache_path: str,
    intermediates: Sequence[str] = (),
) -> dict[str, Any]:
    """What the intermediate store of stage ``n`` (1-based) records as its plan.

    From stage 2 on, ``intermediates`` (every stage's store, in order) gives the stores written
    before this one: its jobs copy from the last of them.
    """
    stage = plan.stages[n - 1]
    before = [str(p) for p in intermediates[: n - 1]]
    return {
        **stage.plan.to_json(),
        "request": redact(stage_request(req, stage).model_dump(mode="json"), env_values=False),
        "layout": layout,
        "cache_path": cache_path,
        "stage": n,
        **({"intermediates": before} if before else {}),
    }


def stage_todo(plan: Plan, intermediates: Sequence[str], n: int) -> list[int]:
    """Jobs of stage ``n`` not yet recorded in its intermediate store."""
    stage = plan.stages[n - 1].plan
    done = recorded_jobs(Path(intermediates[n - 1]), stage.fingerprint)
    return [j.id for j in stage.jobs if j.id not in done]


def initialise_stages(
    paths: CachePaths,
    req: CacheRequest,
    plan: Plan,
    intermediates: Sequence[str],
    layout: dict[str, Any],
) -> None:
    """Create (or keep, to resume) the intermediate stores of a staged plan; remove stale ones.

    An intermediate holding this stage's plan is continued job by job; any other one this cache
    made beside its versions is removed (the caller holds the cache's lock).
    """
    stale = [str(p) for p in stale_intermediates(paths, intermediates)]
    if stale:
        logger.info("removing %d stale intermediate stores", remove_intermediates(paths, stale))
    for n, folder in enumerate(intermediates, start=1):
        path = Path(folder)
        stage = plan.stages[n - 1]
        if (plan_record(path) or {}).get("fingerprint") == stage.plan.fingerprint:
            removed = clean_temporary(path)
            logger.info(
                "resuming stage %d in %s: %d of %d jobs left (%d temporary files removed)",
                n,
                path,
                len(stage_todo(plan, intermediates, n)),
                len(stage.plan.jobs),
                removed,
            )
            continue
        stage_req = stage_request(req, stage)
        target = cached_target(stage_req.model_dump_json())
        try:
            initialise_intermediate(
                target,
                path,
                stage_req,
                stage_plan_json(req, plan, n, layout, paths.canonical, intermediates),
            )
        except OSError as e:
            raise RunFailed(
                f"could not initialise the intermediate store {path} ({e}); nothing was "
                f"published and {paths.final} is unchanged. Fix the cause (space, permissions, "
                "temp_store) and run again"
            ) from e


def strategy_lines(plan: Plan) -> list[tuple[str, str]]:
    """The plan's strategy in words, per stage for a staged plan (CLI ``plan``, the artifact)."""
    lines = [("strategy", f"{plan.strategy}: {plan.strategy_reason or '-'}")]
    if not plan.stages:
        return lines
    rows = plan.stage_rows()
    for row in rows:
        chunks = row["intermediate_chunks"]
        shapes = sorted({tuple(c) for c in chunks.values()}) if chunks else []
        shown = f", intermediate chunks {', '.join(map(str, shapes))}" if shapes else ""
        lines.append(
            (
                f"stage {row['stage']}/{len(rows)}",
                f"{row['jobs']} jobs, reads {format_bytes(row['read_bytes'])}, writes "
                f"{format_bytes(row['write_bytes'])}{shown}",
            )
        )
    lines.append(("intermediate bytes", format_bytes(plan.intermediate_bytes)))
    return lines
