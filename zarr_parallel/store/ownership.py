"""What a run may replace at a cache's final path: ownership checks made before any write.

A run only ever replaces, moves or deletes what it can prove it made (docs/design.md §2a, "Ownership
and trust"): a link to a version of this cache, an empty folder, or a Zarr store of another tool
holding nothing but Zarr's files (adopted: moved aside at publish, never deleted). Anything else
at the final path, and a cache path around or inside a local source, is refused.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.store.disk_names import MANIFEST_DIR
from zarr_parallel.store.files import read_json
from zarr_parallel.store.manifest import version_owner
from zarr_parallel.store.paths import CachePaths, owns_version


def check_cache_location(req: CacheRequest, paths: CachePaths) -> None:
    """Refuse, before anything is written, a cache path a run could not safely write.

    What is at the final path must be absent or provably this cache's (see
    :func:`inspect_final`), and the cache must neither hold nor lie inside a local source.
    Runs call this before taking the lock; ``verify`` (which only reads) does not.

    Raises
    ------
    RequestError
        On ``cache_store`` (or ``cache_dir``), saying what is there and what to do.
    """
    parameter = "cache_store" if req.cache_store is not None else "cache_dir"
    value = req.cache_store if req.cache_store is not None else req.cache_dir
    check_apart_from_sources(req, paths, parameter, value)
    found = inspect_final(paths)
    if found.kind == "foreign":
        raise RequestError(
            parameter,
            value,
            f"{paths.final} {found.text}; a run replaces only what it can prove is a "
            "zarr-parallel cache of this path, so it refuses to start",
            "Choose another path, or move or delete what is there yourself",
        )


@dataclass(frozen=True)
class FinalState:
    """What is at a cache's final path, and whether a run may replace it.

    ``kind`` is ``absent``; ``ours`` (a link to a version of this cache); ``empty`` (an empty
    folder, removed at publish); ``adoptable`` (a Zarr store holding nothing but Zarr metadata
    and chunk files, e.g. from zarr-parallel 0.5: moved aside at publish and never deleted); or
    ``foreign`` (anything else: never touched). ``text`` says what is there, in words.
    """

    kind: str
    text: str = ""


#: File names of Zarr metadata (v3, and v2 with its consolidated ``.zmetadata``).
_ZARR_METADATA = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
_V2_CHUNK = re.compile(r"^\d+(\.\d+)*$")
_V3_CHUNK = re.compile(r"^c([./]\d+)*$")

#: Most files and folders looked at in a store at the final path before it is refused as too
#: large to check. Adopting a store means proving every file in it is Zarr's; a walk runs at
#: roughly 100,000 entries a second on a local disk (much slower on a network file system),
#: and a run looks twice (pre-flight, publish): 200,000 entries keeps that to seconds, while
#: a million-file store took minutes. A 0.5 cache of a year of hourly ERA5 in day chunks is a
#: few thousand files. ``ZARR_PARALLEL_ADOPT_MAX_ENTRIES`` lowers it (for tests).
ADOPT_MAX_ENTRIES = 200_000
#: Most seconds spent looking, the same guard for file systems where each entry is slow.
ADOPT_MAX_SECONDS = 30.0
ADOPT_MAX_ENTRIES_ENV = "ZARR_PARALLEL_ADOPT_MAX_ENTRIES"


class _TooLarge(Exception):
    """The walk stopped at its cap; ``entries`` were seen in ``seconds``."""

    def __init__(self, entries: int, seconds: float, limit: str) -> None:
        self.entries, self.seconds, self.limit = entries, seconds, limit
        super().__init__(limit)


def inspect_final(paths: CachePaths) -> FinalState:
    """Look at what is at ``paths.final`` (reads only) and say whether a run may replace it.

    A folder is walked to prove it holds only Zarr's files, up to :data:`ADOPT_MAX_ENTRIES`
    entries and :data:`ADOPT_MAX_SECONDS`; beyond either it is ``foreign`` (too large to check).
    """
    final = paths.final
    if final.is_symlink():
        return _inspect_link(paths)
    if not final.exists():
        return FinalState("absent")
    if not final.is_dir():
        return FinalState("foreign", "points at a file (or another non-folder entry), not a cache")
    if (final / MANIFEST_DIR).exists():
        owner = version_owner(final) or "an unknown path"
        return FinalState(
            "foreign", f"is a copy of a zarr-parallel cache version (made for {owner})"
        )
    try:
        stray = _non_zarr_file(final, adopt_max_entries(), ADOPT_MAX_SECONDS)
    except _TooLarge as e:
        return FinalState(
            "foreign",
            f"is a folder too large to check: a Zarr store of another tool is adopted (moved "
            f"aside at publish) only once every file in it is shown to be Zarr's, and the check "
            f"stops after {e.limit} ({e.entries:,} files and folders seen in {e.seconds:.1f} s, "
            "all Zarr's so far)",
        )
    if stray is None:
        return FinalState("empty", "is an empty folder")
    if stray == "":
        return FinalState("adoptable", "is a Zarr store made by another tool")
    return FinalState("foreign", f"is a folder holding files that are not Zarr's ({stray})")


def adopt_max_entries() -> int:
    """The entry cap of the walk: :data:`ADOPT_MAX_ENTRIES`, or the test setting."""
    text = os.environ.get(ADOPT_MAX_ENTRIES_ENV, "")
    return int(text) if text.strip().isdigit() else ADOPT_MAX_ENTRIES


def _inspect_link(paths: CachePaths) -> FinalState:
    final = paths.final
    target = Path(os.path.realpath(final))
    versions = Path(os.path.realpath(paths.versions))
    if target.parent != versions:
        return FinalState("foreign", f"is a link to {os.readlink(final)}, not to a version of it")
    if not target.exists():
        return FinalState("ours")  # a dangling link into our versions folder: only a link
    owner = version_owner(target)
    if owner is not None and owner != paths.canonical:
        return FinalState("foreign", f"is a link to a version of another cache ({owner})")
    if owner is None and not owns_version(paths, target):
        return FinalState("foreign", f"is a link to {target}, which no manifest says is ours")
    return FinalState("ours")


def _non_zarr_file(root: Path, max_entries: int, max_seconds: float) -> str | None:
    """The first file under ``root`` that is neither Zarr metadata nor a chunk file.

    Returns ``""`` when every file is Zarr's, and None when there are no files at all.
    A chunk file must sit inside an array folder (one holding ``zarr.json`` or ``.zarray``)
    under a chunk key: ``c/0/1`` or ``c.0.1`` (v3), ``0.1`` or ``0/1`` (v2).

    Raises
    ------
    _TooLarge
        More than ``max_entries`` files and folders, or ``max_seconds`` spent, before the end.
    """
    arrays: list[str] = []
    seen = False
    entries = 0
    t0 = time.monotonic()
    for folder, dirs, files in os.walk(root, followlinks=False):
        entries += len(dirs) + len(files)
        elapsed = time.monotonic() - t0
        if entries > max_entries or elapsed > max_seconds:
            limit = f"{max_entries:,} entries" if entries > max_entries else f"{max_seconds:g} s"
            raise _TooLarge(entries, elapsed, limit)
        dirs.sort()
        rel = os.path.relpath(folder, root)
        if ".zarray" in files or ("zarr.json" in files and _is_v3_array(Path(folder))):
            arrays.append("" if rel == "." else rel)
        for name in sorted(files):
            seen = True
            if name in _ZARR_METADATA:
                continue
            path = os.path.normpath(os.path.join(rel, name))
            if not _is_chunk_key(path, arrays) or os.path.islink(os.path.join(folder, name)):
                return path
        for d in list(dirs):
            if os.path.islink(os.path.join(folder, d)):
                return os.path.normpath(os.path.join(rel, d))
    return "" if seen else None


def _is_v3_array(folder: Path) -> bool:
    meta = read_json(folder / "zarr.json") or {}
    return meta.get("node_type") == "array"


def _is_chunk_key(path: str, arrays: Sequence[str]) -> bool:
    for array in arrays:
        if array and not path.startswith(array + os.sep):
            continue
        key = path[len(array) + 1 :] if array else path
        if _V3_CHUNK.match(key) or all(_V2_CHUNK.match(p) for p in key.split(os.sep)):
            return True
    return False


def check_apart_from_sources(
    req: CacheRequest, paths: CachePaths, parameter: str, value: Any
) -> None:
    """Refuse a cache path that holds, or lies inside, a local source path.

    Publishing moves what is at the final path aside and pruning deletes versions, so a
    cache folder around its own sources (or inside a source store) could destroy them.
    """
    final = Path(paths.canonical)
    versions = Path(os.path.realpath(paths.versions))
    uris = req.data_uri if isinstance(req.data_uri, list) else [req.data_uri]
    for uri in uris:
        text = str(uri)
        if "://" in text and not text.startswith("file://"):
            continue
        source = Path(os.path.realpath(os.path.expanduser(text.removeprefix("file://"))))
        inside = next((p for p in (final, versions) if source.is_relative_to(p)), None)
        if inside is not None or final.is_relative_to(source):
            where = f"holds the source {source}" if inside else f"lies inside the source {source}"
            raise RequestError(
                parameter,
                value,
                f"the cache {final} {where}; publishing and pruning versions could destroy it",
                "Choose a cache path outside the source files and folders",
            )
