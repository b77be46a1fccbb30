"""Reusing the published version's unchanged chunk files in an append's new version.

An append (:mod:`zarr_parallel.run.recache_decision`) builds a new version copy-on-write: the
write jobs write the metadata, the coordinates and the new chunks, and :func:`link_unchanged`
hard-links every other chunk file from the published version (copied where the filesystem
refuses links). Nothing in the published version is opened for writing.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from zarr_parallel.errors import ZarrParallelError
from zarr_parallel.run.recache_decision import AppendPrepared
from zarr_parallel.run.recache_outcome import Decision
from zarr_parallel.sources.target import cached_target
from zarr_parallel.store.lock import held_token
from zarr_parallel.store.manifest import check_lock_token
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)


class AppendNotPossible(ZarrParallelError):
    """The published version's chunks cannot be reused (their encoding differs)."""


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
    Idempotent: files already present (a resumed run) are kept. The run's lock is checked
    before each array and folders are made below the new version only, so a run whose lock was
    broken links nothing more and never brings back a version the other run removed.

    Raises
    ------
    AppendNotPossible
        When an array's encoding (codecs, dtype, fill value, chunk grid) differs between the
        versions, so its chunk bytes cannot be reused.
    LockLost
        When the run no longer holds the cache's lock.
    """
    decision = prepared.decision
    assert decision is not None and decision.base_version and decision.dim
    assert decision.start is not None
    base = prepared.paths.versions / decision.base_version
    old_group = zarr.open_group(base, mode="r")
    report = LinkReport()
    lock = prepared.paths.lock
    token = held_token(lock)
    for vname in cached_target(prepared.request_json).variables:
        before = f"linking the chunks of {vname}"
        if token is not None:
            check_lock_token(lock, token, before)
        try:
            report.arrays[vname] = _link_array(
                old_group[vname], base, prepared.version, decision, report
            )
        except (OSError, KeyError):
            # The new version is gone: when the run that took the lock over removed it, say so.
            if token is not None:
                check_lock_token(lock, token, before)
            raise
    logger.info(
        "reused %d chunk files (%d linked, %d copied, %s) from %s",
        report.linked + report.copied,
        report.linked,
        report.copied,
        format_bytes(report.bytes),
        base.name,
    )
    return report


def _unchanged_counts(
    old: zarr.Array[Any], fresh: zarr.Array[Any], decision: Decision
) -> list[int]:
    """Chunks per dimension of ``old`` before the append's start (every chunk along the others).

    Raises AppendNotPossible when the encoding differs or the start is off the chunk grid.
    """
    vname = old.basename
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
    dims, start = _dims(old), decision.start
    assert start is not None
    if decision.dim in dims:
        k = dims.index(decision.dim)
        if start % grid[k]:
            raise AppendNotPossible(
                f"{vname}: the append start {decision.start} is not on the chunk grid"
            )
        counts[k] = start // grid[k]
    return counts


def _link_array(old: Any, base: Path, new: Path, decision: Decision, report: LinkReport) -> int:
    """Link (or copy) the unchanged chunk files of the published array ``old`` (in version
    ``base``) into the new version ``new``; how many."""
    vname = old.basename
    fresh = zarr.open_group(new, mode="r")[vname]
    assert isinstance(old, zarr.Array) and isinstance(fresh, zarr.Array)
    counts = _unchanged_counts(old, fresh, decision)
    n = 0
    for coords in np.ndindex(*counts):
        key = old.metadata.encode_chunk_key(tuple(int(c) for c in coords))
        src, dst = base / vname / key, new / vname / key
        if dst.exists():
            report.present += 1
            continue
        if not src.exists():
            continue  # never written (e.g. all fill value); the completeness check decides
        _make_below(new, dst.parent)
        try:
            os.link(src, dst)
            report.linked += 1
        except OSError:
            _copy(src, dst)
            report.copied += 1
        report.bytes += src.stat().st_size
        n += 1
    return n


def _make_below(root: Path, folder: Path) -> None:
    """Make ``folder`` and its missing parents up to ``root``, which must exist: a version
    removed meanwhile raises FileNotFoundError instead of being made again."""
    missing = []
    while folder != root and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    if not root.is_dir():
        raise FileNotFoundError(root)
    for path in reversed(missing):
        path.mkdir(exist_ok=True)


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.copy")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
