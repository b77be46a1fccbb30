"""Publishing a version (the atomic switch of the final link), and removing old versions.

The final path ``P`` is a link replaced atomically (``os.replace`` of a new link) at publish. Old
versions are pruned beyond ``keep_versions``, never while a reader holds a lease on them or
within ``min_version_age`` of their replacement. Also here: tidying what killed runs left
(temporary files, half-made links).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from zarr_parallel.errors import RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.store.disk_names import (
    PRUNING_PREFIX,
    READERS_DIR,
    RETIRED_DIR,
    TEMPORARY_SUFFIXES,
)
from zarr_parallel.store.files import fsync_dir, read_json, write_json_atomic
from zarr_parallel.store.manifest import is_complete
from zarr_parallel.store.ownership import inspect_final
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.readers import live_lease

logger = logging.getLogger(__name__)


def publish(
    paths: CachePaths,
    version: Path,
    keep_versions: int,
    min_age: float = 0.0,
    fence: Callable[[str], None] | None = None,
) -> None:
    """Point the final path at ``version`` atomically and prune old versions.

    What is at the final path is looked at again here (it may have changed since pre-flight):
    a link to a version of this cache is replaced; an empty folder is removed; a Zarr store of
    another tool (only Zarr metadata and chunk files) is moved aside to
    ``P.versions/legacy-<time>`` and never deleted by zarr-parallel; anything else fails the run.
    ``fence`` (the run's lock check, given the step it guards) is called before the switch,
    again just before the link replaces the final path, and before each old version is removed:
    a run whose lock was broken while it was paused switches and prunes nothing.
    """
    paths.final.parent.mkdir(parents=True, exist_ok=True)
    found = inspect_final(paths)
    if found.kind == "foreign":
        raise RunFailed(
            f"{paths.final} {found.text}; it appeared during the run and is not this cache's, so "
            f"{version} was not published. Move it away and run again"
        )
    if fence is not None:
        fence("publishing")
    if found.kind == "empty":
        os.rmdir(paths.final)
    elif found.kind == "adoptable":
        legacy = paths.versions / f"legacy-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        paths.versions.mkdir(parents=True, exist_ok=True)
        os.replace(paths.final, legacy)
        logger.warning(
            "moved the Zarr store that was at %s to %s; zarr-parallel never deletes it",
            paths.final,
            legacy,
        )
    previous = paths.current()
    link = paths.final.with_name(f".{paths.final.name}.{os.getpid()}.link")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(version, paths.final.parent), link)
    fault_point("publish")
    if fence is not None:
        try:
            fence("publishing")
        except BaseException:
            link.unlink(missing_ok=True)
            raise
    os.replace(link, paths.final)
    fsync_dir(paths.final.parent)
    fault_point("published")
    if previous is not None and previous != version and previous.is_dir():
        # When readers last saw it current: the minimum age before pruning counts from here.
        # Recorded beside the versions, not in them: a complete version is never written again.
        with contextlib.suppress(OSError):
            write_json_atomic(retired_record(paths, previous), {"time": time.time()})
    try:
        prune_versions(paths, keep_versions, min_age, fence)
    except OSError as e:
        # Pruning is tidying up: the new version is published, so the run has succeeded; what
        # was not removed is removed by the next run's prune.
        logger.warning("published %s, but removing old versions failed (%s)", version, e)


def clean_temporary(version: Path) -> int:
    """Remove temporary files a killed run left in a version; returns how many.

    Zarr writes each chunk to ``<key>.<uuid>.partial`` and renames it into place, so a killed
    write leaves the temporary file, never a torn chunk; the job is not recorded and runs again.
    """
    removed = 0
    for path in version.rglob("*"):
        if path.name.endswith(TEMPORARY_SUFFIXES) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def clean_stale_links(paths: CachePaths) -> None:
    """Remove half-made publish links a killed run left beside the cache (caller holds the lock)."""
    for link in paths.final.parent.glob(f".{paths.final.name}.*.link"):
        with contextlib.suppress(FileNotFoundError):
            link.unlink()


def retired_record(paths: CachePaths, version: Path) -> Path:
    """Where the time ``version`` was replaced is recorded."""
    return paths.versions / RETIRED_DIR / f"{version.name}.json"


def retired_at(paths: CachePaths, version: Path) -> float:
    """When ``version`` stopped being the published version (an upper bound).

    Versions replaced before this was recorded count from the current link's time: every
    version that is not current was replaced at or before the current one was published.
    """
    rec = read_json(retired_record(paths, version))
    if rec and isinstance(rec.get("time"), int | float):
        return float(rec["time"])
    try:
        return os.lstat(paths.final).st_mtime
    except OSError:
        return time.time()


def leased_versions(paths: CachePaths) -> set[str]:
    """Names of the versions a live reader holds a lease on (:mod:`zarr_parallel.store.readers`)."""
    folder = paths.versions / READERS_DIR
    if not folder.is_dir():
        return set()
    held = set()
    for lease in folder.glob("*.json"):
        name = live_lease(lease)
        if name is not None:
            held.add(name)
    return held


def prune_versions(
    paths: CachePaths,
    keep_versions: int,
    min_age: float = 0.0,
    fence: Callable[[str], None] | None = None,
) -> None:
    """Remove complete versions beyond the newest ``keep_versions`` (never the current one).

    Only versions of this cache (:meth:`CachePaths.all_versions`) are ever removed, and of those
    not one that a live reader leased (``open_cache``) or that was replaced less than
    ``min_age`` seconds ago (a reader may have opened it just before the publish).

    Each is first renamed out of the versions' names, then removed: a removal cut short (a
    killed run) must not leave a version that still looks complete or resumable while files
    are missing from it; a later run of the same request would take it up and fail on it.
    What a cut-short removal left is removed by the next prune. ``fence`` (the run's lock
    check) is called before each removal.
    """
    for leftover in paths.versions.glob(f"{PRUNING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    current = paths.current()
    complete = [v for v in paths.all_versions() if is_complete(v) and v != current]
    keep = max(0, keep_versions - 1)
    leased = leased_versions(paths)
    now = time.time()
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name in leased:
            logger.info("keeping old version %s: a reader holds a lease on it", old)
            continue
        age = now - retired_at(paths, old)
        if age < min_age:
            logger.info(
                "keeping old version %s: replaced %.0f s ago, less than min_version_age (%.0f s)",
                old,
                age,
                min_age,
            )
            continue
        if fence is not None:
            fence("pruning old versions")
        logger.info("removing old version %s", old)
        doomed = old.with_name(PRUNING_PREFIX + old.name)
        try:
            os.replace(old, doomed)
        except OSError as e:  # pruning is tidying up: the new version is published already
            logger.warning("could not remove old version %s (%s); the next run tries again", old, e)
            continue
        fsync_dir(old.parent)
        fault_point("prune")
        if fence is not None:
            # Renamed out of the versions' names already: left, the next prune removes it.
            fence("pruning old versions")
        shutil.rmtree(doomed, ignore_errors=True)
        retired_record(paths, old).unlink(missing_ok=True)
