"""Unit tests of store/paths.py: where a cache lives and which versions are its own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir
from zarr_parallel.store.paths import CachePaths, owns_version, pending_record, resolve_paths

FP = "0123456789abcdef0123"


def _version(paths: CachePaths, number: int, owner: str | None, *, plan: bool = False) -> Path:
    """A version folder whose manifest names ``owner`` (or nothing)."""
    version = paths.version(number, FP)
    manifest_dir(version).mkdir(parents=True)
    if owner is not None:
        (manifest_dir(version) / OWNER_FILE).write_text(json.dumps({"cache_path": owner}))
    if plan:
        (manifest_dir(version) / "plan.json").write_text(json.dumps({"request": {}}))
    return version


def test_names_beside_the_final_path(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    assert paths.versions == tmp_path / "c.zarr.versions"
    assert paths.lock == tmp_path / "c.zarr.lock"
    assert paths.version(3, FP) == tmp_path / "c.zarr.versions" / "3-0123456789ab"
    assert paths.current() is None


def test_canonical_resolves_the_folder_but_not_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    paths = CachePaths(tmp_path / "alias" / "c.zarr")
    assert paths.canonical == str(real.resolve() / "c.zarr")


def test_current_is_the_version_the_link_names(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    version = _version(paths, 1, paths.canonical)
    paths.final.symlink_to(os.path.relpath(version, tmp_path))
    assert paths.current() == version.resolve()


def test_all_versions_lists_only_this_caches_in_number_order(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    ours = [_version(paths, n, paths.canonical) for n in (10, 2, 9)]
    _version(paths, 5, str(tmp_path / "other.zarr"))  # copied from another cache
    _version(paths, 6, None)  # no manifest record: cannot be proved ours
    (paths.versions / "legacy-20260101T000000-1").mkdir()
    (paths.versions / ".pruning-3-abc").mkdir()
    (paths.versions / "7-file").write_text("not a folder")
    assert paths.all_versions() == sorted(ours, key=lambda v: int(v.name.split("-")[0]))
    # Numbered past every folder there, ours or not: a new version never lands on a foreign one.
    assert paths.next_version("f" * 20).name == "11-ffffffffffff"


def test_next_version_starts_at_one(tmp_path: Path) -> None:
    assert CachePaths(tmp_path / "c.zarr").next_version(FP).name == "1-0123456789ab"


@pytest.mark.parametrize(
    ("how", "owned"),
    [
        pytest.param("owner", True, id="owner.json names this cache"),
        pytest.param("other", False, id="owner.json names another cache"),
        pytest.param("pending", True, id="pending record while zarr creates it"),
        pytest.param("pending-other", False, id="pending record of another cache"),
        pytest.param("plan", True, id="plan with a request, made before owners were recorded"),
        pytest.param("nothing", False, id="an empty manifest"),
    ],
)
def test_owns_version(tmp_path: Path, how: str, owned: bool) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    owner = {"owner": paths.canonical, "other": str(tmp_path / "x.zarr")}.get(how)
    version = _version(paths, 1, owner, plan=how == "plan")
    if how.startswith("pending"):
        record = pending_record(paths, version)
        record.parent.mkdir(parents=True)
        cache = paths.canonical if how == "pending" else str(tmp_path / "x.zarr")
        record.write_text(json.dumps({"cache_path": cache}))
    assert owns_version(paths, version) is owned
    assert (version in paths.all_versions()) is owned


def test_a_recorded_owner_wins_over_a_plan(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    version = _version(paths, 1, str(tmp_path / "x.zarr"), plan=True)
    assert not owns_version(paths, version)


def _request(tmp_path: Path, **fields: object) -> CacheRequest:
    source = tmp_path / "src.nc"
    source.write_bytes(b"")
    return build_request(data_uri=str(source), **fields)


def test_resolve_paths_from_cache_dir_and_name(tmp_path: Path) -> None:
    req = _request(tmp_path, cache_dir=str(tmp_path / "new" / "deeper"), cache_name="era5")
    paths = resolve_paths(req)
    assert paths.final == tmp_path / "new" / "deeper" / "era5.zarr"
    assert not (tmp_path / "new").exists()  # resolving creates nothing
    assert list(tmp_path.iterdir()) == [tmp_path / "src.nc"]  # and leaves no probe file


def test_resolve_paths_refuses_a_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    req = _request(tmp_path, cache_store=str(tmp_path / "file" / "c.zarr"))
    with pytest.raises(RequestError, match=r"cache_store.*is a file"):
        resolve_paths(req)


@contextmanager
def _unwritable_folder(parent: Path) -> Iterator[Path]:
    """A folder this process may not write into: mode 0555, or for root (who ignores modes, as
    in CI) a read-only tmpfs mounted there."""
    locked = parent / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() != 0:
        try:
            yield locked
        finally:
            locked.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"mounting a read-only tmpfs failed: {mounted.stderr}")
        pytest.skip("root may not mount a read-only tmpfs here")
    try:
        yield locked
    finally:
        subprocess.run(["umount", "-l", str(locked)], check=False)


def test_resolve_paths_refuses_a_folder_it_cannot_write(tmp_path: Path) -> None:
    with _unwritable_folder(tmp_path) as locked:
        req = _request(tmp_path, cache_store=str(locked / "c.zarr"))
        with pytest.raises(RequestError, match=r"is not writable"):
            resolve_paths(req)
