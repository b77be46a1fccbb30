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

import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr
import zarr
from pydantic import ValidationError

from zarr_parallel.errors import RecommendationsPending, ZarrParallelError
from zarr_parallel.planning.plan import canonical_json, fingerprint, plan_jobs_from
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.steps import Prepared, Status, limits_for, plan_inputs, prepare
from zarr_parallel.run.verify import values_equal
from zarr_parallel.sources.target import Target, build_target, cached_target, fresh_source
from zarr_parallel.store.manifest import is_complete, plan_record, recorded_jobs
from zarr_parallel.store.paths import CachePaths, resolve_paths
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)

Action = Literal["up_to_date", "append", "full"]
#: Changed files are checked value by value only while they hold at most this share of the
#: cached steps; beyond it re-caching costs about as much as checking.
MAX_CHECKED_SHARE = 0.5


class AppendNotPossible(ZarrParallelError):
    """The published version's chunks cannot be reused (their encoding differs)."""


@dataclass(frozen=True)
class Decision:
    """What a re-cache run does and why."""

    action: Action
    reason: str
    cache: str
    dim: str | None = None
    old_length: int | None = None
    new_length: int | None = None
    start: int | None = None
    base_version: str | None = None
    new_files: tuple[str, ...] = ()
    checked_files: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON form for artifacts, summaries and the manifest."""
        return {
            "action": self.action,
            "reason": self.reason,
            "cache": self.cache,
            "dim": self.dim,
            "old_length": self.old_length,
            "new_length": self.new_length,
            "start": self.start,
            "base_version": self.base_version,
            "new_files": list(self.new_files),
            "checked_files": list(self.checked_files),
        }

    def markdown(self) -> str:
        """The decision as the re-cache artifact shows it."""
        title = {"up_to_date": "up to date", "append": "append", "full": "full re-cache"}
        lines = [
            f"# Re-cache: {title[self.action]}",
            "",
            f"**Why:** {self.reason}",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| cache | `{self.cache}` |",
        ]
        if self.base_version:
            lines.append(f"| published version | `{self.base_version}` |")
        if self.action == "append":
            lines += [
                f"| {self.dim} cached | {self.old_length} |",
                f"| {self.dim} in source | {self.new_length} |",
                f"| rewritten from {self.dim} index | {self.start} (whole chunks from there on; "
                "earlier chunks are reused unchanged) |",
            ]
        if self.new_files:
            lines.append(
                f"| new files | {', '.join(os.path.basename(f) for f in self.new_files)} |"
            )
        if self.checked_files:
            names = ", ".join(os.path.basename(f) for f in self.checked_files)
            lines.append(f"| changed files checked value by value | {names} |")
        return "\n".join(lines)


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
        # overwrite/resume decide how a full run goes, not what the cache should hold.
        full = prepare(req.model_copy(update={"overwrite": True, "resume": "auto"}))
    except RecommendationsPending:
        reason = (
            "the plan re-reads source chunks and recommend_changes='halt' asks for a decision; "
            "the full run halts (or pauses, in a deployment) with the recommendations"
        )
        return Decision("full", reason, name, base_version=base), None
    if full.status == "up_to_date":
        stored_request = (plan_record(current) or {}).get("request")
        if stored_request and stored_request != full.request.model_dump(mode="json"):
            # Same content (store.same_content), other run settings: nothing to write.
            reason = (
                "the source and the request's content are unchanged (only how the run is "
                "executed differs, e.g. memory_limit, num_jobs or deploy_mode)"
            )
        else:
            reason = (
                f"the request and the source are unchanged (plan fingerprint "
                f"{full.plan.fingerprint[:12]} matches the published version {base})"
            )
        return Decision("up_to_date", reason, name, base_version=base), None
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


def _names(files: Sequence[str]) -> str:
    shown = [os.path.basename(f) for f in files[:4]]
    more = f" and {len(files) - 4} more" if len(files) > 4 else ""
    return ", ".join(shown) + more


def _append_decision(
    req: CacheRequest, target: Target, current: Path, old_layout: dict[str, Any], name: str
) -> Decision:
    """Append or full re-cache, for a source whose layout digest changed."""
    base = current.name

    def full(reason: str) -> Decision:
        return Decision("full", reason, name, base_version=base)

    layout = target.layout
    old_files = [str(f) for f in old_layout.get("files", [])]
    old_states = old_layout.get("file_states")
    if not old_states or len(old_states) != len(old_files):
        return full(f"the published version {base} does not record its source files' states")
    files = list(layout.files)
    if files[: len(old_files)] != old_files:
        gone = [f for f in old_files if f not in files]
        if gone:
            return full(f"source file(s) {_names(gone)} are gone")
        early = [f for f in files if f not in old_files]
        return full(
            f"new source file(s) {_names(early)} sort before or among the cached ones, so "
            "the cached range itself changed"
        )
    new_files = files[len(old_files) :]
    changed = [
        f
        for f, old, new in zip(old_files, old_states, layout.file_states, strict=False)
        if canonical_json(old) != canonical_json(new)
    ]
    if not new_files and not changed:
        return full("the source's chunk layout changed")

    cache = xr.open_zarr(current, consolidated=None, chunks=None)
    template = target.template()
    if set(map(str, template.data_vars)) != set(map(str, cache.data_vars)):
        return full(
            f"the variables changed ({sorted(map(str, cache.data_vars))} cached, "
            f"{sorted(map(str, template.data_vars))} now)"
        )
    grown: list[str] = []
    for dim, n in template.sizes.items():
        old_n = cache.sizes.get(dim)
        if old_n is None:
            return full(f"the dimension {dim!r} is new")
        if n < old_n:
            return full(f"{dim!r} shrank from {old_n} to {n}")
        if n > old_n:
            grown.append(str(dim))
    if len(grown) > 1:
        return full(f"the source grew along {grown}; appends go along one dimension")
    for cname, coord in template.coords.items():
        if cname not in cache.coords:
            return full(f"the coordinate {cname!r} is new")
        old_c = cache.coords[cname]
        cut = coord.isel({d: slice(0, int(cache.sizes[d])) for d in coord.dims if d in grown})
        if cut.dims != old_c.dims or not values_equal(
            np.asarray(cut.values), np.asarray(old_c.values)
        ):
            return full(f"the coordinate {cname!r} changed within the cached range")
    for vname, var in template.data_vars.items():
        old_v = cache[vname]
        if var.dims != old_v.dims:
            return full(f"{vname!r} changed dimensions {old_v.dims} → {var.dims}")
        if var.dtype != old_v.dtype:
            return full(f"{vname!r} changed dtype {old_v.dtype} → {var.dtype}")

    dim = grown[0] if grown else None
    verified: list[str] = []
    if changed:
        problem = _check_changed_files(req, target, cache, changed, dim)
        if problem:
            return full(problem)
        verified = changed
    if dim is None:
        if verified:
            reason = (
                f"source file(s) {_names(verified)} changed state but hold the same values, "
                "and nothing new falls within the selection"
            )
        else:
            reason = f"new source file(s) {_names(new_files)} fall outside the selection"
        return Decision("up_to_date", reason, name, base_version=base, new_files=tuple(new_files))
    if dim not in template.coords:
        return full(
            f"{dim!r} has no coordinate, so appended steps cannot be checked for duplicates"
        )
    values = np.asarray(template[dim].values)
    if not (np.all(values[1:] > values[:-1]) or np.all(values[1:] < values[:-1])):
        return full(f"{dim!r} is not strictly monotonic after the append (duplicate steps?)")
    old_n, new_n = int(cache.sizes[dim]), int(template.sizes[dim])
    group = zarr.open_group(current, mode="r")
    steps = []
    for vname, var in template.data_vars.items():
        if dim not in var.dims:
            continue
        arr = group[str(vname)]
        assert isinstance(arr, zarr.Array)
        chunks = tuple(target.chunks[str(vname)][str(d)] for d in var.dims)
        shards_map = (target.shards or {}).get(str(vname))
        shards = tuple(shards_map[str(d)] for d in var.dims) if shards_map else None
        if tuple(arr.chunks) != chunks or (arr.shards and tuple(arr.shards)) != shards:
            return full(
                f"the chunking of {vname!r} changed ({arr.shards or arr.chunks} cached, "
                f"{shards or chunks} now)"
            )
        steps.append((shards or chunks)[var.dims.index(dim)])
    step = math.lcm(*steps) if steps else 1
    start = (old_n // step) * step
    grew = f"grew by {new_n - old_n} along {dim!r} ({old_n} → {new_n})"
    if new_files:
        reason = f"{len(new_files)} new source file(s) ({_names(new_files)}): the source {grew}"
    else:
        reason = f"the last source file(s) {_names(verified)} {grew}"
    if verified:
        reason += f"; the cached values of the changed file(s) {_names(verified)} were checked"
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


def _check_changed_files(
    req: CacheRequest, target: Target, cache: xr.Dataset, changed: list[str], dim: str | None
) -> str | None:
    """Compare the cached values that came from changed files with what they hold now.

    Returns a reason for a full re-cache, or None when every cached value is unchanged.
    """
    layout = target.layout
    concat = layout.concat_dim
    old_n = int(cache.sizes[dim]) if dim else None
    rows: np.ndarray | None = None
    index = f"_zpi_{concat}" if concat else None
    if concat and index in target.dataset.coords and len(layout.file_lengths) == len(layout.files):
        src_dim = target.dataset[index].dims
        if dim is None and src_dim:
            dim = str(src_dim[0])
            old_n = int(cache.sizes[dim])
        if dim is not None and src_dim == (dim,):
            offsets = np.cumsum([0, *layout.file_lengths])
            src = np.asarray(target.dataset[index].values)[: old_n or 0]
            hit = np.zeros(src.shape, dtype=bool)
            for f in changed:
                i = layout.files.index(f)
                hit |= (src >= offsets[i]) & (src < offsets[i + 1])
            rows = np.flatnonzero(hit)
    if rows is None:
        return (
            f"source file(s) {_names(changed)} changed (size or modification time) and the cache "
            "cannot tell which of its values came from them"
        )
    total = old_n or 0
    if rows.size > MAX_CHECKED_SHARE * max(total, 1):
        return (
            f"source file(s) {_names(changed)} changed (size or modification time) and hold "
            f"{rows.size} of the {total} cached steps along {dim!r}: re-caching costs about as "
            "much as checking them"
        )
    assert dim is not None
    budget = max(1, (req.memory_bytes - req.reserve_bytes) // 4)
    with dask.config.set(scheduler="synchronous"):
        for vname, var in target.template().data_vars.items():
            if dim not in var.dims:
                # Variables without the append dimension come from the first file.
                if (
                    layout.files
                    and layout.files[0] in changed
                    and not values_equal(np.asarray(var.values), np.asarray(cache[vname].values))
                ):
                    return f"the values of {vname!r} changed in {_names(layout.files[:1])}"
                continue
            row_bytes = max(1, var.nbytes // max(1, var.sizes[dim]))
            for a, b in _windows(rows, max(1, budget // row_bytes)):
                new = np.asarray(var.isel({dim: slice(a, b)}).values)
                old = np.asarray(cache[vname].isel({dim: slice(a, b)}).values)
                if not values_equal(new, old):
                    return (
                        f"values of {vname!r} at {dim} {a}:{b} differ from the cache: source "
                        f"file(s) {_names(changed)} were rewritten"
                    )
    return None


def _windows(rows: np.ndarray, most: int) -> Iterator[tuple[int, int]]:
    """Contiguous runs of ``rows`` as ``[a, b)``, each at most ``most`` long."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        for a in range(int(run[0]), int(run[-1]) + 1, most):
            yield a, min(a + most, int(run[-1]) + 1)


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


@dataclass
class LinkReport:
    """What building the new version from the published one reused."""

    linked: int = 0
    copied: int = 0
    present: int = 0
    bytes: int = 0
    arrays: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form for summaries."""
        return {
            "linked": self.linked,
            "copied": self.copied,
            "present": self.present,
            "bytes": self.bytes,
            "arrays": dict(self.arrays),
        }


#: Metadata that may differ between the published version and the new one without changing
#: what a chunk file's bytes mean.
_FREE_METADATA = {"shape", "attributes"}


def _metadata(arr: zarr.Array[Any]) -> dict[str, Any]:
    meta = arr.metadata.to_dict()
    return {k: v for k, v in meta.items() if k not in _FREE_METADATA}


def _dims(arr: zarr.Array[Any]) -> tuple[str, ...]:
    names = getattr(arr.metadata, "dimension_names", None)
    if names:
        return tuple(str(n) for n in names)
    names = arr.attrs.get("_ARRAY_DIMENSIONS")
    return tuple(str(n) for n in names) if isinstance(names, list | tuple) else ()


def link_unchanged(prepared: AppendPrepared) -> LinkReport:
    """Reuse every unchanged chunk file of the published version in the new version.

    Chunk files entirely before the append's start (and every chunk of variables without the
    append dimension) are hard-linked into the new version; where the filesystem refuses a link
    the file is copied (temporary file, then rename). Only files the write jobs will not touch
    are linked, and zarr's local store replaces a file it rewrites with a new one (temporary file
    and rename) rather than writing into it, so the published version's files are never modified.
    Idempotent: files already present (a resumed run) are kept.

    Raises
    ------
    AppendNotPossible
        When an array's encoding (codecs, dtype, fill value, chunk grid) differs between the
        versions, so its chunk bytes cannot be reused.
    """
    decision = prepared.decision
    assert decision is not None and decision.base_version and decision.dim
    assert decision.start is not None
    base = prepared.paths.versions / decision.base_version
    new = prepared.version
    old_group = zarr.open_group(base, mode="r")
    new_group = zarr.open_group(new, mode="r")
    report = LinkReport()
    for vname in cached_target(prepared.request_json).variables:
        old = old_group[vname]
        fresh = new_group[vname]
        assert isinstance(old, zarr.Array) and isinstance(fresh, zarr.Array)
        if _metadata(old) != _metadata(fresh):
            diff = sorted(
                k
                for k in _metadata(old).keys() | _metadata(fresh).keys()
                if _metadata(old).get(k) != _metadata(fresh).get(k)
            )
            raise AppendNotPossible(
                f"{vname}: the encoding changed ({', '.join(diff)}), so the cached chunks "
                "cannot be reused"
            )
        grid = tuple(old.shards or old.chunks)
        counts = [math.ceil(s / g) for s, g in zip(old.shape, grid, strict=True)]
        dims = _dims(old)
        if decision.dim in dims:
            k = dims.index(decision.dim)
            if decision.start % grid[k]:
                raise AppendNotPossible(
                    f"{vname}: the append start {decision.start} is not on the chunk grid"
                )
            counts[k] = decision.start // grid[k]
        n = 0
        for coords in np.ndindex(*counts):
            key = old.metadata.encode_chunk_key(tuple(int(c) for c in coords))
            src, dst = base / vname / key, new / vname / key
            if dst.exists():
                report.present += 1
                continue
            if not src.exists():
                continue  # never written (e.g. all fill value); the completeness check decides
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                report.linked += 1
            except OSError:
                _copy(src, dst)
                report.copied += 1
            report.bytes += src.stat().st_size
            n += 1
        report.arrays[vname] = n
    logger.info(
        "reused %d chunk files (%d linked, %d copied, %s) from %s",
        report.linked + report.copied,
        report.linked,
        report.copied,
        format_bytes(report.bytes),
        base.name,
    )
    return report


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.copy")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
