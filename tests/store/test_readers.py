"""Readers see one version: open_cache across publishes, leases, min_version_age, pruned reads."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from zarr_parallel import VersionUnavailable, open_cache
from zarr_parallel.api import run_request
from zarr_parallel.request.model import build_request
from zarr_parallel.store.disk_names import READERS_DIR
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.publish import prune_versions

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}


def _run(files: list[Path], store: Path, **extra: Any) -> Path:
    fields = {
        "data_uri": [str(p) for p in files],
        "chunks": CHUNKS,
        "cache_store": str(store),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 2,
        **extra,
    }
    run_request(build_request(**fields))
    return store.resolve()


def _leases(store: Path) -> list[Path]:
    folder = CachePaths(store).versions / READERS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def two_sources(era5_factory: Any) -> tuple[list[Path], list[Path]]:
    """Two sources of the same shape and coordinates with different values."""
    shape = {"n_files": 2, "steps_per_file": 24, "chunks": (6, 40, 72)}
    return era5_factory(**shape), era5_factory(**shape, seed=1)


def test_reader_open_across_an_overwrite_publish_sees_only_the_old_version(
    two_sources: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    """open_cache keeps reading the version it opened, data and metadata; plain
    ``xr.open_zarr(P)`` mixes the new chunks with the old metadata (what docs/reliability.md
    says it does)."""
    first, second = two_sources
    store = tmp_path / "c.zarr"
    old = _run(first, store, add_attrs={"edition": "first"})
    expected = xr.open_zarr(old).load()
    reader = open_cache(store)
    plain = xr.open_zarr(store)
    assert len(_leases(store)) == 1
    new = _run(second, store, add_attrs={"edition": "second"}, keep_versions=1)
    assert new != old and store.resolve() == new
    xr.testing.assert_identical(reader.load(), expected)
    assert reader.attrs["edition"] == "first"
    # The plain reader: old attributes and coordinates, new chunks.
    fresh = xr.open_zarr(new).load()
    assert plain.attrs["edition"] == "first"
    np.testing.assert_array_equal(plain["t2m"].values, fresh["t2m"].values)
    assert not np.array_equal(fresh["t2m"].values, expected["t2m"].values)
    reader.close()
    assert _leases(store) == []


def test_prune_honours_leases_and_min_age_and_a_pruned_version_raises(
    two_sources: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    first, second = two_sources
    store = tmp_path / "c.zarr"
    paths = CachePaths(store)
    old = _run(first, store)
    reader = open_cache(store)
    # Replaced with keep_versions=1 and min_version_age=0: only the lease keeps it.
    _run(second, store, keep_versions=1, min_version_age=0)
    assert old.is_dir(), "a leased version was pruned"
    prune_versions(paths, 1, min_age=0)
    assert old.is_dir()
    reader.close()
    # No lease now, but replaced moments ago: the minimum age (default one hour) keeps it.
    prune_versions(paths, 1, min_age=3600)
    assert old.is_dir(), "a version replaced less than min_version_age ago was pruned"
    # A reader that could not write a lease (read-only access), and a plain reader.
    unleased = open_cache(old)
    for lease in _leases(store):
        lease.unlink()
    plain = xr.open_zarr(old)
    prune_versions(paths, 1, min_age=0)
    assert not old.exists()
    with pytest.raises(VersionUnavailable, match="was removed while it was open"):
        unleased["t2m"].load()
    # What open_cache prevents: the plain reader gets fill values, silently.
    assert np.isnan(plain["t2m"].values).all()
    with pytest.raises(VersionUnavailable, match="does not exist"):
        open_cache(old)


def test_a_missing_chunk_raises_instead_of_reading_fill_values(
    two_sources: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    store = tmp_path / "c.zarr"
    version = _run(two_sources[0], store)
    damaged = tmp_path / "damaged"
    shutil.copytree(version, damaged)
    (damaged / "t2m" / "c" / "1" / "0" / "0").unlink()
    ds = open_cache(damaged)
    ds["t2m"].isel(time=slice(0, 12)).load()  # chunks that exist read as usual
    with pytest.raises(VersionUnavailable, match=r"has no chunk file t2m/c/1/0/0"):
        ds["t2m"].load()
    (damaged / ".zarr-parallel" / "complete.json").unlink()
    with pytest.raises(VersionUnavailable, match="not a complete cache version"):
        open_cache(damaged)


def test_lease_lasts_while_anything_read_from_the_dataset_is_alive(
    two_sources: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    store = tmp_path / "c.zarr"
    _run(two_sources[0], store)
    variable = open_cache(store)["t2m"]
    gc.collect()
    assert len(_leases(store)) == 1, "the lease ended while a variable could still read"
    assert variable.isel(time=0).load().notnull().all()
    del variable
    gc.collect()
    assert _leases(store) == []
    # A reader that cannot write its lease (here the leases folder cannot be made: a file
    # stands in its way, as a read-only folder would refuse it) reads without one.
    readers = CachePaths(store).versions / READERS_DIR
    readers.rmdir()
    readers.write_text("")
    ds = open_cache(store)
    assert ds["t2m"].load().notnull().all()
    assert readers.is_file()


def test_an_open_reader_refreshes_its_lease(
    two_sources: tuple[list[Path], list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of the reader's process refreshes its lease's modification time (the heartbeat
    prune reads) while the dataset is open, and stops refreshing it once it is closed."""
    import os
    import time

    from zarr_parallel.store import readers

    store = tmp_path / "c.zarr"
    _run(two_sources[0], store)
    monkeypatch.setattr(readers, "LEASE_HEARTBEAT_SECONDS", 0.05)
    ds = open_cache(store)
    (lease,) = _leases(store)
    old = time.time() - 3600
    os.utime(lease, (old, old))
    deadline = time.time() + 30
    while lease.stat().st_mtime < time.time() - 60:
        assert time.time() < deadline, "the lease was never refreshed"
        time.sleep(0.02)
    assert readers.live_lease(lease) == store.resolve().name
    ds.close()
    assert _leases(store) == [] and readers.refresh_leases() == 0


def test_a_paused_reader_of_this_host_keeps_its_lease_a_silent_remote_one_does_not(
    tmp_path: Path,
) -> None:
    """A reader on this host paused longer than LEASE_STALE_AFTER (its heartbeat an hour old)
    still has its dataset open: its lease holds while its process lives. A lease of another
    host an hour without a heartbeat is a reader gone, and so is a fresh one of a dead process
    of this host."""
    import json
    import os
    import subprocess
    import sys
    import time

    import psutil

    from zarr_parallel.store import readers
    from zarr_parallel.store.lock import host_name

    folder = tmp_path / "c.zarr.versions" / ".readers"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = psutil.Process()
    cases = {
        "paused": (host_name(), os.getpid(), me.create_time(), 3600),
        "remote": ("another-node", os.getpid(), me.create_time(), 3600),
        "dead": (host_name(), dead.pid, me.create_time(), 0),
    }
    leases = {}
    for name, (host, pid, started, age) in cases.items():
        lease = folder / f"1-{name}--{host}-{pid}-0.json"
        content = {"version": f"1-{name}", "host": host, "pid": pid, "pid_start": started}
        lease.write_text(json.dumps(content))
        old = time.time() - age
        os.utime(lease, (old, old))
        leases[name] = lease
    assert readers.live_lease(leases["paused"]) == "1-paused"
    assert readers.live_lease(leases["remote"]) is None
    assert readers.live_lease(leases["dead"]) is None
    assert sorted(p.name for p in folder.iterdir()) == [leases["paused"].name]
