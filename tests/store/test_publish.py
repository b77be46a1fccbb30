"""Unit tests of store/publish.py: the link switch, pruning old versions, tidying leftovers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from zarr_parallel.errors import LockLost, RunFailed
from zarr_parallel.store.disk_names import OWNER_FILE, PRUNING_PREFIX, READERS_DIR, manifest_dir
from zarr_parallel.store.lock import host_name
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.publish import (
    clean_stale_links,
    clean_temporary,
    prune_versions,
    publish,
    retired_record,
)


@pytest.fixture
def paths(tmp_path: Path) -> CachePaths:
    return CachePaths(tmp_path / "c.zarr")


def _complete(paths: CachePaths, number: int, owner: str | None = None) -> Path:
    """A complete version: a real Zarr v3 group with one array, whose manifest names its cache."""
    version = paths.version(number, f"{number:012d}")
    root = zarr.create_group(version)
    root.create_array("a", shape=(2,), chunks=(2,), dtype="i1")[:] = np.array([1, 2], "i1")
    manifest_dir(version).mkdir()
    owner_json = {"cache_path": owner or paths.canonical}
    (manifest_dir(version) / OWNER_FILE).write_text(json.dumps(owner_json))
    (manifest_dir(version) / "complete.json").write_text("{}")
    return version


def _beside(paths: CachePaths) -> list[str]:
    return sorted(p.name for p in paths.final.parent.iterdir())


def test_publish_switches_the_link(paths: CachePaths) -> None:
    v1, v2 = _complete(paths, 1), _complete(paths, 2)
    publish(paths, v1, keep_versions=2)
    assert paths.final.is_symlink() and paths.current() == v1
    assert not os.path.isabs(os.readlink(paths.final))  # the cache folder can be moved whole
    publish(paths, v2, keep_versions=2)
    assert paths.current() == v2
    assert zarr.open_array(paths.final, path="a", mode="r")[:].tolist() == [1, 2]
    assert retired_record(paths, v1).exists() and v1.is_dir()
    assert _beside(paths) == ["c.zarr", "c.zarr.versions"]  # no half-made link left


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_keep_versions(paths: CachePaths, keep: int) -> None:
    versions = []
    for n in (1, 2, 3, 4):
        versions.append(_complete(paths, n))
        publish(paths, versions[-1], keep_versions=keep)
    assert paths.all_versions() == versions[-keep:]
    assert paths.current() == versions[-1]
    pruned = versions[:-keep]
    assert not any(retired_record(paths, v).exists() for v in pruned)
    assert not list(paths.versions.glob(f"{PRUNING_PREFIX}*"))


def test_prune_never_touches_what_is_not_this_caches(paths: CachePaths, tmp_path: Path) -> None:
    other = _complete(paths, 2, owner=str(tmp_path / "other.zarr"))
    no_manifest = paths.version(3, "0" * 12)
    no_manifest.mkdir(parents=True)
    legacy = paths.versions / "legacy-20260101T000000-1"
    legacy.mkdir()
    for n in (4, 5, 6):
        publish(paths, _complete(paths, n), keep_versions=1)
    assert [v.name for v in paths.all_versions()] == ["6-000000000006"]
    assert other.is_dir() and no_manifest.is_dir() and legacy.is_dir()


def test_prune_skips_incomplete_versions(paths: CachePaths) -> None:
    staging = _complete(paths, 1)
    (manifest_dir(staging) / "complete.json").unlink()
    for n in (2, 3):
        publish(paths, _complete(paths, n), keep_versions=1)
    assert staging in paths.all_versions()  # staging versions are the run's to clean, not prune's


def _lease(paths: CachePaths, version: Path, pid: int, pid_start: float) -> Path:
    lease = paths.versions / READERS_DIR / f"{version.name}--{host_name()}-{pid}-test.json"
    lease.parent.mkdir(exist_ok=True)
    content = {"version": version.name, "host": host_name(), "pid": pid, "time": time.time()}
    lease.write_text(json.dumps({**content, "pid_start": pid_start}))
    return lease


def _other_hosts_lease(paths: CachePaths, version: Path, taken_ago: float, beat_ago: float) -> Path:
    """A lease written ``taken_ago`` s ago on another host, its heartbeat ``beat_ago`` s ago."""
    lease = paths.versions / READERS_DIR / f"{version.name}--node-17-4242-test.json"
    lease.parent.mkdir(exist_ok=True)
    content = {"version": version.name, "host": "node-17", "pid": 4242, "pid_start": 1.0}
    lease.write_text(json.dumps({**content, "time": time.time() - taken_ago}))
    os.utime(lease, (time.time() - beat_ago, time.time() - beat_ago))
    return lease


def test_prune_honours_a_lease_while_its_heartbeat_is_fresh(paths: CachePaths) -> None:
    """Leases of another host count by their heartbeat, not a fixed 24 hours: one taken a day
    ago whose reader still refreshes it keeps its version (before: pruned after 24 h); one
    taken an hour ago whose heartbeat stopped ten minutes ago does not (before: kept a day)."""
    v1, v2, v3, v4 = (_complete(paths, n) for n in (1, 2, 3, 4))
    publish(paths, v1, keep_versions=1)
    live = _other_hosts_lease(paths, v1, taken_ago=25 * 3600, beat_ago=5)
    publish(paths, v2, keep_versions=1)
    assert v1.is_dir() and live.exists(), "a reader that still beats lost its version"
    stopped = _other_hosts_lease(paths, v2, taken_ago=3600, beat_ago=600)
    publish(paths, v3, keep_versions=1)
    assert v1.is_dir() and not v2.exists() and not stopped.exists()
    # The same lease once its heartbeat stops: v1 goes at the next prune.
    old = time.time() - 600
    os.utime(live, (old, old))
    publish(paths, v4, keep_versions=1)
    assert not v1.exists() and not live.exists()


def test_a_local_lease_counts_while_its_process_runs_however_old_its_heartbeat(
    paths: CachePaths,
) -> None:
    """A lease of this host counts while its process runs: a reader paused for ten minutes (its
    heartbeat that old) still has its dataset open. Before, its version was pruned under it."""
    v1, v2, v3 = (_complete(paths, n) for n in (1, 2, 3))
    publish(paths, v1, keep_versions=1)
    me = psutil.Process()
    lease = _lease(paths, v1, me.pid, me.create_time())
    old = time.time() - 600
    os.utime(lease, (old, old))  # this process runs, but nothing refreshed the lease
    publish(paths, v2, keep_versions=1)
    assert v1.is_dir() and lease.exists()
    lease.unlink()  # the reader closed its dataset
    publish(paths, v3, keep_versions=1)
    assert not v1.exists()


def test_prune_keeps_versions_a_live_reader_leased(paths: CachePaths) -> None:
    v1, v2, v3 = (_complete(paths, n) for n in (1, 2, 3))
    publish(paths, v1, keep_versions=1)
    me = psutil.Process()
    live = _lease(paths, v1, me.pid, me.create_time())
    publish(paths, v2, keep_versions=1)
    assert v1.is_dir() and live.exists()
    # The same pid with another start time is a reused pid: that reader is gone.
    dead = _lease(paths, v1, me.pid, me.create_time() - 1000)
    live.unlink()
    publish(paths, v3, keep_versions=1)
    assert not v1.exists() and not v2.exists() and not dead.exists()


def test_prune_keeps_versions_replaced_less_than_min_age_ago(paths: CachePaths) -> None:
    v1, v2 = _complete(paths, 1), _complete(paths, 2)
    publish(paths, v1, keep_versions=1)
    publish(paths, v2, keep_versions=1, min_age=3600)
    assert v1.is_dir()
    prune_versions(paths, keep_versions=1, min_age=0)
    assert not v1.exists()


def test_prune_finishes_a_removal_cut_short(paths: CachePaths) -> None:
    doomed = paths.versions / f"{PRUNING_PREFIX}1-000000000001"
    (doomed / "a").mkdir(parents=True)
    publish(paths, _complete(paths, 2), keep_versions=1)
    assert not doomed.exists()


@pytest.mark.parametrize("what", ["file", "folder with a file", "foreign link"])
def test_publish_refuses_what_is_not_ours(paths: CachePaths, tmp_path: Path, what: str) -> None:
    version = _complete(paths, 1)
    if what == "file":
        paths.final.write_text("user data")
    elif what == "folder with a file":
        paths.final.mkdir()
        (paths.final / "notes.txt").write_text("user data")
    else:
        (tmp_path / "elsewhere").mkdir()
        paths.final.symlink_to(tmp_path / "elsewhere")
    before = _beside(paths)
    with pytest.raises(RunFailed, match="was not published"):
        publish(paths, version, keep_versions=1)
    assert _beside(paths) == before
    assert not paths.final.is_symlink() or os.readlink(paths.final) == str(tmp_path / "elsewhere")


def test_publish_replaces_an_empty_folder(paths: CachePaths) -> None:
    paths.final.mkdir()
    version = _complete(paths, 1)
    publish(paths, version, keep_versions=1)
    assert paths.current() == version


def test_publish_moves_another_tools_zarr_store_aside_and_keeps_it(paths: CachePaths) -> None:
    zarr.create_group(paths.final).create_array("x", shape=(3,), chunks=(3,), dtype="i1")[:] = 7
    for n in (1, 2, 3):
        publish(paths, _complete(paths, n), keep_versions=1)
    (legacy,) = paths.versions.glob("legacy-*")
    assert zarr.open_array(legacy, path="x", mode="r")[:].tolist() == [7, 7, 7]


def test_a_failing_fence_stops_the_switch(paths: CachePaths) -> None:
    v1, v2 = _complete(paths, 1), _complete(paths, 2)
    publish(paths, v1, keep_versions=1)

    def lost(step: str) -> None:
        raise LockLost("lock lost")

    with pytest.raises(LockLost):
        publish(paths, v2, keep_versions=1, fence=lost)
    assert paths.current() == v1


def test_the_fence_is_checked_again_at_the_switch_and_before_pruning(paths: CachePaths) -> None:
    """A run paused between making its link and moving it over the final path (or after the
    switch, before pruning) whose lock was broken meanwhile switches (prunes) nothing: the
    fence is checked again at each step, not only once before publishing."""
    v1, v2 = _complete(paths, 1), _complete(paths, 2)
    publish(paths, v1, keep_versions=1)
    steps: list[str] = []

    def lost_at(fail: int) -> Callable[[str], None]:
        def fence(step: str) -> None:
            steps.append(step)
            if len(steps) == fail:
                raise LockLost(f"lock lost before {step}")

        return fence

    with pytest.raises(LockLost):
        publish(paths, v2, keep_versions=1, fence=lost_at(2))  # the second: at the switch
    assert paths.current() == v1 and steps == ["publishing", "publishing"]
    assert not list(paths.final.parent.glob(".*.link")), "the new link is removed"
    steps.clear()
    with pytest.raises(LockLost):
        publish(paths, v2, keep_versions=1, fence=lost_at(3))  # the third: before pruning
    assert paths.current() == v2 and steps[-1] == "pruning old versions"
    assert v1.is_dir(), "the old version is kept by the run that lost its lock"


def test_clean_temporary_removes_only_temporary_files(tmp_path: Path) -> None:
    version = tmp_path / "v"
    (version / "a" / "c" / "0").mkdir(parents=True)
    keep = [version / "a" / "zarr.json", version / "a" / "c" / "0" / "0"]
    gone = [
        version / "a" / "c" / "0" / "1.3f2a.partial",
        version / ".zarr-parallel" / ".plan.json.1.2.tmp",
        version / "a" / "c" / "0" / "2.copy",
    ]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert clean_temporary(version) == 3
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_clean_stale_links(paths: CachePaths) -> None:
    version = _complete(paths, 1)
    publish(paths, version, keep_versions=1)
    stale = paths.final.with_name(f".{paths.final.name}.4242.link")
    stale.symlink_to(version)
    other = paths.final.with_name(".d.zarr.4242.link")  # another cache's: not ours to remove
    other.symlink_to(version)
    clean_stale_links(paths)
    assert not stale.is_symlink() and other.is_symlink() and paths.current() == version
