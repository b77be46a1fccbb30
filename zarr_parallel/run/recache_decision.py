"""Re-caching: bring a published cache up to date with its source, doing the least work.

A re-cache run compares what the published version records (its request, its source files'
states and its plan fingerprint) with the source as it is now, and decides one of three actions:

``up_to_date``
    Nothing that determines the cache's content changed: no writes.
``append``
    The source grew along one dimension (new files after the cached ones, or new steps at the end
    of the last file) and every cached element is still what the source holds. Only the new region
    is planned, starting at the write-grid boundary at or before the cached end, so a partial last
    chunk is rewritten whole, never torn. The result is a *new version* built copy-on-write: the
    metadata, the coordinates and the new chunks are written as new files, and every unchanged
    chunk file is hard-linked from the published version (copied where the filesystem refuses
    links). Nothing in the published version is opened for writing, so it stays complete and
    readable until the new version is published atomically.
``full``
    Anything else (values rewritten, files removed or inserted before the end, chunking or
    request changed): a full re-cache into a new version, published atomically, keeping the
    last ``keep_versions``.

Every decision carries a sentence saying why, shown in the run's artifacts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from pydantic import ValidationError

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.planning.fingerprint import fingerprint
from zarr_parallel.planning.plan import plan_jobs_from
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.changed_files import (
    check_changed_files,
    file_changes,
    file_names,
    unchanged_reason,
)
from zarr_parallel.run.chunk_compare import values_equal
from zarr_parallel.run.recache_outcome import (
    Decision,
    full_run_request,
    up_to_date_decision,
    with_pending,
)
from zarr_parallel.run.steps import Prepared, Status, limits_for, plan_inputs, prepare
from zarr_parallel.sources.target import Target, build_target, fresh_source
from zarr_parallel.store.manifest import is_complete, plan_record, recorded_jobs
from zarr_parallel.store.paths import CachePaths, resolve_paths

logger = logging.getLogger(__name__)


@dataclass
class AppendPrepared(Prepared):
    """A prepared append: the plan covers only the new region of a new version."""

    decision: Decision | None = None
    full_fingerprint: str = ""
    full_content_fingerprint: str = ""

    def plan_json(self) -> dict[str, Any]:
        """The manifest's plan, with what the append was made from."""
        return {
            **super().plan_json(),
            # The full plan this version equals: later runs of the same request find it up to
            # date (store.same_content accepts either).
            "full_fingerprint": self.full_fingerprint,
            "full_content_fingerprint": self.full_content_fingerprint,
            "recache": self.decision.to_json() if self.decision else None,
        }


def content_digest(req: CacheRequest) -> str:
    """Digest of what determines the cache's content, apart from the list of source files."""
    return req.model_copy(update={"data_uri": ""}).digest()


def decide(req: CacheRequest, allow_append: bool = True) -> tuple[Decision, AppendPrepared | None]:
    """Compare the source and the published cache (see :func:`_decide`), and say which steps
    are left out until every variable has them (files that hold different variables)."""
    decision, prepared = _decide(req, allow_append)
    decision = with_pending(req, decision)
    if prepared is not None:
        prepared.decision = decision
    return decision, prepared


def _decide(req: CacheRequest, allow_append: bool = True) -> tuple[Decision, AppendPrepared | None]:
    """Compare the source and the published cache; choose the least work that makes it current.

    Reads the source's metadata, the published version's manifest and coordinates, and (only
    when files the cache was made from changed state) their values. Writes nothing.

    Parameters
    ----------
    req
        The validated request of the cache to keep current.
    allow_append
        When False, a grown source is re-cached in full.

    Returns
    -------
    tuple
        The decision, and for an append the prepared run (plan of the new region only).
    """
    paths = resolve_paths(req)
    name = str(paths.final)
    current = paths.current()
    if current is None or not is_complete(current):
        return Decision("full", f"no published cache at {name} yet", name), None
    base = current.name
    try:
        full = prepare(full_run_request(req))
    except RecommendationsPending:
        reason = (
            "the plan re-reads source chunks and recommend_changes='halt' asks for a decision; "
            "the full run halts (or pauses, in a deployment) with the recommendations"
        )
        return Decision("full", reason, name, base_version=base), None
    if full.status == "up_to_date":
        return up_to_date_decision(full), None
    req = full.request  # as the full run would write it (a recommendation may be applied)
    rec = plan_record(current) or {}
    try:
        old_req = CacheRequest.model_validate(rec["request"])
    except (KeyError, TypeError, ValidationError):
        reason = f"the published version {base} records no readable request"
        return Decision("full", reason, name, base_version=base), None
    if content_digest(old_req) != content_digest(req):
        changed = _changed_fields(old_req, req)
        reason = f"the request changed ({', '.join(changed) or 'its content'})"
        return Decision("full", reason, name, base_version=base), None
    source = fresh_source(req)
    layout = source.layout
    old_layout = rec.get("layout") or {}
    if old_layout.get("digest") == layout.digest:
        reason = (
            "the source and the request's content are unchanged (only how the run is executed "
            "differs, e.g. memory_limit or num_jobs)"
        )
        return Decision("up_to_date", reason, name, base_version=base), None
    if not allow_append:
        reason = "the source changed and appends are disabled (allow_append=False)"
        return Decision("full", reason, name, base_version=base), None
    target = build_target(req, source)
    decision = _append_decision(req, target, current, old_layout, name)
    if decision.action != "append":
        return decision, None
    return decision, _prepare_append(req, full, target, decision, paths, rec)


def _changed_fields(old: CacheRequest, new: CacheRequest) -> list[str]:
    """The request fields that changed the content digest, as ``name: old → new``."""
    base = content_digest(old)
    out = []
    for key in CacheRequest.model_fields:
        if key == "data_uri" or getattr(old, key) == getattr(new, key):
            continue
        if content_digest(old.model_copy(update={key: getattr(new, key)})) != base:
            out.append(f"{key}: {getattr(old, key)!r} → {getattr(new, key)!r}")
    return out


@dataclass(frozen=True)
class _Growth:
    """The published version and the source as they are now, as the append rules see them."""

    req: CacheRequest
    target: Target
    current: Path
    cache: xr.Dataset
    template: xr.Dataset
    new_files: list[str]
    changed: list[str]
    grown: list[str]

    @property
    def dim(self) -> str | None:
        """The dimension the source grew along (None: it did not grow)."""
        return self.grown[0] if self.grown else None


#: A rule looks at the growth and returns the reason for a full re-cache, or None.
Rule = Callable[[_Growth], str | None]


def _append_decision(
    req: CacheRequest, target: Target, current: Path, old_layout: dict[str, Any], name: str
) -> Decision:
    """Append or full re-cache, for a source whose layout digest changed.

    The rules run in order and the first that finds a reason decides a full re-cache: the
    files (:func:`~zarr_parallel.run.changed_files.file_changes`), then what the cache holds
    (:data:`_CONTENT_RULES`), the values of changed files, and for a grown source where the
    append starts (:data:`_APPEND_RULES`, then the chunk grid in :func:`_append_step`).
    """
    base = current.name
    files = file_changes(target, old_layout, base)
    if isinstance(files, str):
        return Decision("full", files, name, base_version=base)
    new_files, changed = files
    cache = xr.open_zarr(current, consolidated=None, chunks=None)
    template = target.template()
    grown = [str(d) for d, n in template.sizes.items() if d in cache.sizes and n > cache.sizes[d]]
    growth = _Growth(req, target, current, cache, template, new_files, changed, grown)
    reason = _first_reason(_CONTENT_RULES, growth)
    if reason is None and changed:
        reason = check_changed_files(req, target, cache, changed, growth.dim)
    if reason is None and growth.dim is not None:
        reason = _first_reason(_APPEND_RULES, growth)
    if reason is not None:
        return Decision("full", reason, name, base_version=base)
    if growth.dim is None:
        return Decision(
            "up_to_date",
            unchanged_reason(new_files, changed),
            name,
            base_version=base,
            new_files=tuple(new_files),
        )
    return _append(growth, name, base)


def _first_reason(rules: Sequence[Rule], growth: _Growth) -> str | None:
    for rule in rules:
        reason = rule(growth)
        if reason is not None:
            return reason
    return None


def _variables_rule(g: _Growth) -> str | None:
    if set(map(str, g.template.data_vars)) != set(map(str, g.cache.data_vars)):
        return (
            f"the variables changed ({sorted(map(str, g.cache.data_vars))} cached, "
            f"{sorted(map(str, g.template.data_vars))} now)"
        )
    return None


def _dimensions_rule(g: _Growth) -> str | None:
    for dim, n in g.template.sizes.items():
        old_n = g.cache.sizes.get(dim)
        if old_n is None:
            return f"the dimension {dim!r} is new"
        if n < old_n:
            return f"{dim!r} shrank from {old_n} to {n}"
    if len(g.grown) > 1:
        return f"the source grew along {g.grown}; appends go along one dimension"
    return None


def _coordinates_rule(g: _Growth) -> str | None:
    for cname, coord in g.template.coords.items():
        if cname not in g.cache.coords:
            return f"the coordinate {cname!r} is new"
        old_c = g.cache.coords[cname]
        cut = coord.isel({d: slice(0, int(g.cache.sizes[d])) for d in coord.dims if d in g.grown})
        if cut.dims != old_c.dims or not values_equal(
            np.asarray(cut.values), np.asarray(old_c.values)
        ):
            return f"the coordinate {cname!r} changed within the cached range"
    return None


def _variable_types_rule(g: _Growth) -> str | None:
    for vname, var in g.template.data_vars.items():
        old_v = g.cache[vname]
        if var.dims != old_v.dims:
            return f"{vname!r} changed dimensions {old_v.dims} → {var.dims}"
        if var.dtype != old_v.dtype:
            return f"{vname!r} changed dtype {old_v.dtype} → {var.dtype}"
    return None


def _append_coordinate_rule(g: _Growth) -> str | None:
    if g.dim not in g.template.coords:
        return f"{g.dim!r} has no coordinate, so appended steps cannot be checked for duplicates"
    return None


def _monotonic_rule(g: _Growth) -> str | None:
    values = np.asarray(g.template[g.dim].values)
    if not (np.all(values[1:] > values[:-1]) or np.all(values[1:] < values[:-1])):
        return f"{g.dim!r} is not strictly monotonic after the append (duplicate steps?)"
    return None


#: What the cache holds, compared with what the source gives now (in order).
_CONTENT_RULES: tuple[Rule, ...] = (
    _variables_rule,
    _dimensions_rule,
    _coordinates_rule,
    _variable_types_rule,
)
#: Whether steps can be appended along the dimension the source grew along (in order).
_APPEND_RULES: tuple[Rule, ...] = (_append_coordinate_rule, _monotonic_rule)


def _append_step(g: _Growth) -> int | str:
    """The write grid's step along the append dimension (the least common multiple over the
    variables along it), or the reason the chunking forbids reusing the cached chunks."""
    group = zarr.open_group(g.current, mode="r")
    steps = []
    for vname, var in g.template.data_vars.items():
        if g.dim not in var.dims:
            continue
        arr = group[str(vname)]
        assert isinstance(arr, zarr.Array)
        chunks = tuple(g.target.chunks[str(vname)][str(d)] for d in var.dims)
        shards_map = (g.target.shards or {}).get(str(vname))
        shards = tuple(shards_map[str(d)] for d in var.dims) if shards_map else None
        if tuple(arr.chunks) != chunks or (arr.shards and tuple(arr.shards)) != shards:
            d = var.dims.index(g.dim)
            if (arr.shards or arr.chunks)[d] == arr.shape[d] < (shards or chunks)[d]:
                # A time-series cache (one chunk spans every cached step): it grows by
                # rewriting every chunk, i.e. as a full run (docs/design.md §3.4).
                return (
                    f"the cache's chunks span every cached step along {g.dim!r} (a time "
                    "series): an append would rewrite every chunk, so this is a full run"
                )
            return (
                f"the chunking of {vname!r} changed ({arr.shards or arr.chunks} cached, "
                f"{shards or chunks} now)"
            )
        steps.append((shards or chunks)[var.dims.index(g.dim)])
    return math.lcm(*steps) if steps else 1


def _append(g: _Growth, name: str, base: str) -> Decision:
    """The append along ``g.dim``, from the write-grid boundary at or before the cached end."""
    assert g.dim is not None
    dim, new_files, verified = g.dim, g.new_files, g.changed
    step = _append_step(g)
    if isinstance(step, str):
        return Decision("full", step, name, base_version=base)
    old_n, new_n = int(g.cache.sizes[dim]), int(g.template.sizes[dim])
    start = (old_n // step) * step
    grew = f"grew by {new_n - old_n} along {dim!r} ({old_n} → {new_n})"
    if start == 0:
        # A time-series cache (one chunk spans every cached step): an append would rewrite
        # every chunk, so it is planned as what it is, a full run (docs/design.md §3.4).
        return Decision(
            "full",
            f"the source {grew}, but the cache's chunks span {step} steps along {dim!r}: an "
            "append would rewrite every chunk, so this is a full run",
            name,
            base_version=base,
        )
    if new_files:
        reason = f"{len(new_files)} new source file(s) ({file_names(new_files)}): the source {grew}"
    else:
        reason = f"the last source file(s) {file_names(verified)} {grew}"
    if verified:
        reason += f"; the cached values of the changed file(s) {file_names(verified)} were checked"
    partial = f"; the partial chunk from {start} is rewritten whole" if start < old_n else ""
    return Decision(
        "append",
        reason + partial,
        name,
        dim=dim,
        old_length=old_n,
        new_length=new_n,
        start=start,
        base_version=base,
        new_files=tuple(new_files),
        checked_files=tuple(verified),
    )


def _prepare_append(
    req: CacheRequest,
    full: Prepared,
    target: Target,
    decision: Decision,
    paths: CachePaths,
    rec: dict[str, Any],
) -> AppendPrepared:
    assert decision.dim is not None and decision.start is not None
    # The append's fingerprint names the version it builds on, so a resume continues only an
    # append onto the same published version.
    digest = fingerprint(
        req.digest(), target.layout.digest, "append-onto", str(rec.get("fingerprint"))
    )
    # The same inputs as the full plan: jobs the fast path writes are sized by its model.
    plan = plan_jobs_from(
        plan_inputs(target, req), limits_for(req), digest, decision.dim, decision.start
    )
    # Steps left out until every variable has them are reported with the plan's notes.
    plan = dataclasses.replace(plan, notes=(*plan.notes, *target.layout.pending))
    fp = plan.fingerprint
    current = paths.current()
    staging = [
        v
        for v in paths.all_versions()
        if v != current and not is_complete(v) and (plan_record(v) or {}).get("fingerprint") == fp
    ]
    ids = [j.id for j in plan.jobs]
    if staging and req.resume is not False:
        version = staging[-1]
        done = recorded_jobs(version, fp)
        status: Status = "resume"
        todo = [i for i in ids if i not in done]
    else:
        version, status, todo = paths.next_version(fp), "fresh", ids
    return AppendPrepared(
        request=req,
        paths=paths,
        plan=plan,
        version=version,
        status=status,
        todo=todo,
        recommendations=list(full.recommendations),
        applied=full.applied,
        layout=target.layout.to_json(),
        decision=decision,
        full_fingerprint=full.plan.fingerprint,
        full_content_fingerprint=full.plan.content_fingerprint,
    )


#: Decision is re-exported: it lived here before run/recache_outcome.py.
__all__ = ["AppendPrepared", "Decision", "content_digest", "decide"]
