"""Pre-flight checks, run after planning and before the first write (docs/design.md §2a,
Pre-flight).

1. Remote sources: every referenced file exists and may be read (metadata requests only), so a
   404 or 403 fails the run before anything is written, naming the URL (credentials redacted).
2. Space: the free space and free inodes of the filesystem that will hold the new version
   (``os.statvfs``) must cover the plan's estimate of that version, else
   :class:`InsufficientSpace` gives both numbers.

The estimate is an upper bound. Data bytes are the target's stored bytes times the source's own
compression ratio (from HDF5 storage sizes, kerchunk reference lengths or Zarr's stored bytes)
with a 25 % margin for a different codec, never more than uncompressed; every file is rounded up
to whole filesystem blocks. Inodes count every chunk (or shard) file, the nested chunk-key
folders of Zarr v3, metadata documents and the manifest's files (one record per job).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zarr_parallel.errors import PlanError
from zarr_parallel.planning.plan import Plan
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.references import referenced_urls
from zarr_parallel.sources.remote import check_readable, fsspec_options_for, readable_file
from zarr_parallel.sources.source import Source
from zarr_parallel.sources.target import Target
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.units import format_bytes, parse_memory

logger = logging.getLogger(__name__)

#: Margin on the source's compression ratio: the cache's codec may compress a little worse.
CODEC_MARGIN = 1.25
#: Files sampled per variable when measuring a multi-file source's compression ratio.
SAMPLED_FILES = 3
#: Bytes of one metadata document or job record, before rounding to blocks (generous).
METADATA_BYTES = 8192


class InsufficientSpace(PlanError):
    """The cache's filesystem lacks the space or inodes the new version needs."""

    def __init__(
        self,
        parameter: str,
        value: Any,
        problem: str,
        fix: str,
        needed: SpaceEstimate | None = None,
        free: FreeSpace | None = None,
    ) -> None:
        super().__init__(parameter, value, problem, fix)
        self.needed = needed
        self.free = free


@dataclass(frozen=True)
class SpaceEstimate:
    """What a new version needs on disk: bytes (block-rounded) and inodes."""

    bytes: int
    inodes: int
    data_bytes: int
    chunk_files: int


@dataclass(frozen=True)
class FreeSpace:
    """Free bytes and inodes of a filesystem (``inodes`` None: not limited or not reported)."""

    path: str
    bytes: int
    inodes: int | None
    block: int


def free_space(path: str | Path) -> FreeSpace:
    """Free space at ``path`` (or its nearest existing ancestor), as unprivileged users see it."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    block = st.f_frsize or st.f_bsize or 4096
    # f_files == 0: the filesystem has no inode limit (btrfs) or does not report one.
    inodes = int(st.f_favail) if st.f_files else None
    return FreeSpace(str(p), int(st.f_bavail) * block, inodes, int(block))


def _round(nbytes: float, block: int) -> int:
    return int(math.ceil(max(nbytes, 1) / block) * block)


def compression_ratios(source: Source, req: CacheRequest) -> dict[str, float]:
    """Stored bytes over decoded-but-packed bytes, per source variable (1.0 when unknown)."""
    layout = source.layout
    try:
        if layout.engine == "kerchunk" and source.refs is not None:
            stored = _kerchunk_stored(source.refs, layout.variables)
        elif layout.engine == "zarr":
            stored = _zarr_stored(layout.files[0], req, layout.variables)
        else:
            stored = _hdf5_stored(source, req)
    except Exception as e:  # an estimate: fall back to "uncompressed", never fail here
        logger.info("compression ratio unknown (%s): assuming uncompressed", type(e).__name__)
        return {}
    out: dict[str, float] = {}
    for name, nbytes in stored.items():
        v = layout.variables[name]
        raw = math.prod(v.shape) * v.read_itemsize
        if raw and nbytes is not None:
            out[name] = nbytes / raw
    return out


def _kerchunk_stored(refs: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, int]:
    data = refs.get("refs", refs)
    stored = dict.fromkeys(variables, 0)
    for key, value in data.items():
        name, _, chunk = str(key).rpartition("/")
        if name not in stored or chunk.startswith("."):
            continue
        if isinstance(value, list):
            stored[name] += int(value[2]) if len(value) == 3 else 0
        elif isinstance(value, str | bytes):
            stored[name] += len(value)
    # A variable whose references name whole files (no ranges) is unknown: drop it.
    return {k: v for k, v in stored.items() if v}


def _zarr_stored(path: str, req: CacheRequest, variables: Mapping[str, Any]) -> dict[str, int]:
    import zarr

    group = zarr.open_group(path, mode="r", storage_options=fsspec_options_for(path, req) or None)
    out: dict[str, int] = {}
    for name in variables:
        arr = group[name]
        if isinstance(arr, zarr.Array):
            out[name] = int(arr.nbytes_stored())
    return out


def _hdf5_stored(source: Source, req: CacheRequest) -> dict[str, int]:
    """Storage size over a few sampled files, scaled to the whole variable."""
    import h5py

    group = req.open_options.get("group")
    stored: dict[str, float] = {}
    for name, v in source.layout.variables.items():
        # The files holding this variable (files may hold different variables).
        files = list(source.layout.files_of(name))
        picks = sorted({0, len(files) // 2, len(files) - 1})[:SAMPLED_FILES]
        nbytes, elems = 0, 0
        for i in picks:
            with h5py.File(readable_file(files[i], req), "r") as f:
                node = f[group][name] if group else f[name]
                nbytes += int(node.id.get_storage_size())
                elems += int(np.prod(node.shape))
        if elems:
            stored[name] = nbytes / elems * math.prod(v.shape)
    return {k: math.ceil(x) for k, x in stored.items()}


def _chunk_dirs(grid: tuple[int, ...], zarr_format: int) -> int:
    """Folders a Zarr array's chunk keys create: ``c/i/j/...`` in v3, none in v2 (``i.j``)."""
    if zarr_format == 2 or not grid:
        return 0
    dirs, prefix = 1, 1  # the "c" folder, then one per key prefix short of the last index
    for n in grid[:-1]:
        prefix *= n
        dirs += prefix
    return dirs


def estimate_version(
    target: Target,
    plan: Plan,
    req: CacheRequest,
    ratios: Mapping[str, float],
    block: int,
    share: float = 1.0,
) -> SpaceEstimate:
    """Upper bound of the disk space and inodes of a new version (``share`` of its jobs)."""
    template = target.template()
    data_bytes = 0
    total_bytes = 0
    chunk_files = 0
    # The versions folder, the version, its manifest and job-record folders, and a few files
    # beside them: the final link, the lock file, temporary files of atomic writes.
    dirs = 4 + 4 + 1  # and .retired (when each replaced version stopped being published)
    meta_docs = 1  # the root group
    for name in target.variables:
        var = template[name]
        grid_shape = (target.shards or {}).get(name) or target.chunks[name]
        grid = tuple(math.ceil(var.sizes[d] / max(1, grid_shape[str(d)])) for d in var.dims)
        n_files = math.prod(grid)
        enc = var.encoding
        stored_dtype = (
            np.dtype(enc.get("dtype", var.dtype))
            if req.keep_packing and "scale_factor" in enc
            else var.dtype
        )
        file_raw = math.prod(grid_shape[str(d)] for d in var.dims) * stored_dtype.itemsize
        src = target.sources.get(name)
        ratio = min(1.0, ratios.get(src or "", 1.0) * CODEC_MARGIN)
        per_file = _round(file_raw * ratio + 64, block)  # + codec header
        chunk_files += n_files
        data_bytes += n_files * per_file
        dirs += 1 + _chunk_dirs(grid, req.zarr_format)
        meta_docs += 1 if req.zarr_format == 3 else 2
    for coord in template.coords.values():
        chunk_files += 1
        data_bytes += _round(coord.size * coord.dtype.itemsize, block)
        dirs += 1 + (1 if req.zarr_format == 3 and coord.ndim else 0)
        meta_docs += 1 if req.zarr_format == 3 else 2
    # plan.json, complete.json, owner.json, lock.json (the run's lock token), the replaced
    # version's record in .retired, and one record per job.
    manifest_files = 5 + len(plan.jobs)
    plan_json_bytes = len(json.dumps(plan.to_json(), default=str))
    total_bytes = int(data_bytes * share)
    total_bytes += (meta_docs + manifest_files) * _round(METADATA_BYTES, block)
    total_bytes += _round(plan_json_bytes, block) + dirs * block
    inodes = math.ceil(chunk_files * share) + meta_docs + manifest_files + dirs
    return SpaceEstimate(total_bytes, inodes, int(data_bytes * share), chunk_files)


def check_space(
    req: CacheRequest,
    paths: CachePaths,
    target: Target,
    plan: Plan,
    source: Source,
    share: float = 1.0,
) -> SpaceEstimate:
    """Refuse (before any write) when the cache's filesystem cannot hold the new version.

    ``share`` is the part of the plan still to write (less than 1 when resuming).

    Raises
    ------
    InsufficientSpace
        With the estimate, the free space and inodes, and the fix.
    """
    free = free_space(paths.versions)
    needed = estimate_version(target, plan, req, compression_ratios(source, req), free.block, share)
    reserve = (
        0
        if req.free_space_reserve in (0, "0")
        else parse_memory(req.free_space_reserve, "free_space_reserve")
    )
    usable = max(0, free.bytes - reserve)
    parameter = "cache_store" if req.cache_store is not None else "cache_dir"
    value = req.cache_store if req.cache_store is not None else req.cache_dir
    logger.info(
        "pre-flight: the new version needs at most %s and %d inodes; %s has %s free%s",
        format_bytes(needed.bytes),
        needed.inodes,
        free.path,
        format_bytes(free.bytes),
        f" and {free.inodes} inodes" if free.inodes is not None else "",
    )
    short: list[str] = []
    if needed.bytes > usable:
        kept = f" after keeping free_space_reserve={req.free_space_reserve}" if reserve else ""
        short.append(
            f"{format_bytes(needed.bytes)} ({needed.bytes} bytes) is needed but "
            f"{format_bytes(usable)} ({usable} bytes) is free{kept}"
        )
    if free.inodes is not None and needed.inodes > free.inodes:
        short.append(
            f"{needed.inodes} files and folders are needed ({needed.chunk_files} chunk files) "
            f"but only {free.inodes} inodes are free"
        )
    if short:
        raise InsufficientSpace(
            parameter,
            value,
            f"the filesystem at {free.path} cannot hold the new version: " + "; ".join(short),
            "Free space, choose a cache location on a larger filesystem, use larger chunks or "
            "shards (fewer files), or set check_free_space=False if the filesystem reports "
            "wrong figures",
            needed,
            free,
        )
    return needed


def check_remote_files(req: CacheRequest, source: Source) -> None:
    """Every remote file the source reads exists and may be read (metadata requests only)."""
    urls = [
        f
        for f in source.layout.files
        # A Zarr store is a folder (its metadata was read to open it); files are probed.
        if "://" in f and not f.startswith("file://") and source.layout.engine != "zarr"
    ]
    if source.refs is not None:
        urls += referenced_urls(source.refs)
    if urls:
        check_readable(urls, req.storage_options, req.remote_concurrency, req.remote_retries)


def run_preflight(
    req: CacheRequest,
    paths: CachePaths,
    target: Target,
    plan: Plan,
    source: Source,
    todo: list[int],
) -> None:
    """All pre-flight checks for a run that will write ``todo`` jobs of ``plan``."""
    check_remote_files(req, source)
    if not req.check_free_space or not todo:
        return
    total = sum(j.write_bytes for j in plan.jobs) or 1
    share = sum(plan.jobs[i].write_bytes for i in todo) / total
    check_space(req, paths, target, plan, source, min(1.0, share))
