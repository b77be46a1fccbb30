"""A run replaces, moves or deletes only what it can prove is its own cache.

Everything else at the cache path (a folder of the user's files, a file, a link to another
cache, a copy of another cache's versions, a folder holding the sources) is refused before
anything is written; a Zarr store of another tool is moved aside and never deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml

from core_support import cli_result
from zarr_parallel.api import run_request
from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.store.paths import CachePaths

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}


def _fields(files: list[Path] | str, store: Path, **extra: Any) -> dict[str, Any]:
    return {
        "data_uri": files if isinstance(files, str) else [str(p) for p in files],
        "chunks": CHUNKS,
        "cache_store": str(store),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 2,
        **extra,
    }


def _tree(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` with its content hash (links: their target)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _nothing_written(store: Path) -> None:
    """No lock file, versions folder or publish link was created beside ``store``."""
    beside = [p.name for p in store.parent.iterdir() if p.name.startswith(store.name + ".")]
    assert beside == [], beside
    assert not list(store.parent.glob(f".{store.name}.*"))


def test_cache_path_holding_the_sources_is_refused_and_the_sources_survive(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """The reproduced disaster: cache_store is the folder of the source files, keep_versions 1.

    Before the fix the run printed "done": the folder was moved into ``.versions/0-legacy-*``
    and pruned in the same run, and the sources were gone.
    """
    sources = tmp_path / "era5"
    sources.mkdir()
    for f in era5_files:
        shutil.copy(f, sources / f.name)
    before = _tree(sources)
    request = tmp_path / "request.yaml"
    fields = _fields(str(sources / "*.nc"), sources, keep_versions=1, min_version_age=0)
    request.write_text(yaml.safe_dump(fields))
    proc = cli_result(request)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cache_store=" in proc.stderr and "holds the source" in proc.stderr, proc.stderr
    assert _tree(sources) == before
    _nothing_written(sources)


def test_cache_path_inside_a_source_store_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src.zarr"
    xr.Dataset({"a": (("time", "x"), np.ones((4, 3)))}).to_zarr(source)
    before = _tree(source)
    with pytest.raises(RequestError, match=r"lies inside the source") as info:
        run_request(
            build_request(
                data_uri=str(source),
                cache_store=str(source / "cache.zarr"),
                deploy_mode="series",
            )
        )
    assert info.value.parameter == "cache_store"
    assert _tree(source) == before


def _folder_with_a_random_file(store: Path) -> None:
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (store / "notes.txt").write_text("my thesis")


def _a_file(store: Path) -> None:
    store.write_text("not a cache")


def _a_copied_version(store: Path) -> None:
    other = _other_cache(store)
    shutil.copytree(os.path.realpath(other), store, symlinks=True)


def _a_link_to_another_cache(store: Path) -> None:
    os.symlink(_other_cache(store), store)


def _another_caches_versions_copied(store: Path) -> None:
    """``cp -a other.zarr.versions P.versions`` and a link made as a publish makes it."""
    other = _other_cache(store)
    versions = CachePaths(store).versions
    shutil.copytree(CachePaths(other).versions, versions, symlinks=True)
    os.symlink(os.path.relpath(versions / Path(os.readlink(other)).name, store.parent), store)


_OTHER: dict[str, Path] = {}


def _other_cache(store: Path) -> Path:
    return _OTHER["path"]


@pytest.fixture(scope="module")
def other_cache(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("other") / "other.zarr"
    run_request(build_request(**_fields(era5_files, store)))
    _OTHER["path"] = store
    return store


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(
            _folder_with_a_random_file, r"files that are not Zarr's \(notes.txt\)", id="random-file"
        ),
        pytest.param(_a_file, "points at a file", id="file"),
        pytest.param(
            _a_copied_version, "copy of a zarr-parallel cache version", id="copied-version"
        ),
        pytest.param(_a_link_to_another_cache, "is a link to .*other.zarr", id="link-to-other"),
        pytest.param(
            _another_caches_versions_copied, "a version of another cache", id="copied-versions"
        ),
    ],
)
def test_what_the_cache_does_not_own_is_refused_before_any_write(
    era5_files: list[Path],
    tmp_path: Path,
    other_cache: Path,
    make: Callable[[Path], None],
    problem: str,
) -> None:
    store = tmp_path / "c.zarr"
    make(store)
    before = _tree(tmp_path)
    other_before = _tree(other_cache.parent)
    fields = _fields(era5_files, store, keep_versions=1, min_version_age=0)
    with pytest.raises(RequestError, match=problem) as info:
        run_request(build_request(**fields))
    assert info.value.parameter == "cache_store"
    assert "Choose another path, or move or delete what is there yourself" in str(info.value)
    assert _tree(tmp_path) == before
    assert _tree(other_cache.parent) == other_before
    assert not CachePaths(store).lock.exists()


def test_foreign_zarr_store_is_adopted_and_never_pruned(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A Zarr store of another tool (only metadata and chunk files) is moved aside, then kept
    through later runs with keep_versions=1; a foreign folder in the versions folder too."""
    store = tmp_path / "c.zarr"
    ds = xr.Dataset({"t2m": (("time", "x"), np.arange(12.0).reshape(4, 3))})
    ds.to_zarr(store, encoding={"t2m": {"chunks": (2, 3)}}, zarr_format=2)
    before = _tree(store)
    versions = CachePaths(store).versions
    versions.mkdir()
    stray = versions / "7-not-ours"
    stray.mkdir()
    (stray / "data.bin").write_bytes(b"keep me")
    for t in (12, 24, 60):
        chunks = {**CHUNKS, "time": t}
        fields = _fields(era5_files, store, chunks=chunks, keep_versions=1, min_version_age=0)
        run_request(build_request(**fields))
    (legacy,) = versions.glob("legacy-*")
    assert _tree(legacy) == before, "the adopted store is moved, never written into"
    xr.testing.assert_identical(xr.open_zarr(legacy).load(), ds)
    assert (stray / "data.bin").read_bytes() == b"keep me"
    assert [v.name.split("-")[0] for v in CachePaths(store).all_versions()] == ["10"]


def _zarr_store(path: Path, **to_zarr: Any) -> None:
    ds = xr.Dataset({"a": (("t", "x"), np.ones((4, 3)))}, coords={"t": np.arange(4)})
    ds.to_zarr(path, encoding={"a": {"chunks": (2, 3)}}, **to_zarr)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda p: p.mkdir(), "empty", id="empty-folder"),
        pytest.param(lambda p: _zarr_store(p, zarr_format=3), "adoptable", id="zarr3"),
        pytest.param(lambda p: _zarr_store(p, zarr_format=2), "adoptable", id="zarr2"),
        pytest.param(
            lambda p: (_zarr_store(p, zarr_format=3), (p / "2020").write_text("x")),
            "foreign",
            id="number-named-file-in-a-group",
        ),
        pytest.param(
            lambda p: (_zarr_store(p, zarr_format=3), (p / "a" / "README").write_text("x")),
            "foreign",
            id="file-in-an-array",
        ),
        pytest.param(
            lambda p: (_zarr_store(p, zarr_format=3), os.symlink("/etc", p / "a" / "c" / "9")),
            "foreign",
            id="link-inside",
        ),
    ],
)
def test_what_counts_as_a_zarr_store_of_another_tool(
    tmp_path: Path, make: Callable[[Path], Any], kind: str
) -> None:
    from zarr_parallel.store.ownership import inspect_final

    store = tmp_path / "s.zarr"
    make(store)
    assert inspect_final(CachePaths(store)).kind == kind


def test_something_that_appears_at_the_path_during_the_run_is_not_replaced(
    tmp_path: Path,
) -> None:
    """Pre-flight found nothing; by publish time a folder of files is there: the run fails
    (exit 1) and leaves it, instead of moving it aside."""
    from zarr_parallel.errors import RunFailed
    from zarr_parallel.store.publish import publish

    store = tmp_path / "c.zarr"
    paths = CachePaths(store)
    version = paths.version(1, "0" * 12)
    version.mkdir(parents=True)
    _folder_with_a_random_file(store)
    before = _tree(tmp_path)
    with pytest.raises(RunFailed, match=r"appeared during the run .* was not published"):
        publish(paths, version, keep_versions=1)
    assert _tree(tmp_path) == before and not store.is_symlink()


def _store_of_entries(path: Path) -> int:
    """A Zarr store of another tool with 24 × 2 chunk files; its count of files and folders."""
    ds = xr.Dataset({"a": (("t", "x"), np.ones((48, 2)))}, coords={"t": np.arange(48)})
    ds.to_zarr(path, encoding={"a": {"chunks": (1, 1)}}, zarr_format=3)
    return sum(1 for _ in path.rglob("*"))


def test_a_store_too_large_to_check_is_refused_before_any_write(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk that proves a foreign store holds only Zarr's files stops at its cap (lowered
    here through ``ZARR_PARALLEL_ADOPT_MAX_ENTRIES``): a larger store is refused with exit 2,
    naming the path, what was seen and the fix, and nothing is written; before, the walk had no
    cap (a million-file store took minutes at every look). Under the cap the same store is
    adopted as before."""
    store = tmp_path / "c.zarr"
    entries = _store_of_entries(store)
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(_fields(era5_files, store, min_version_age=0)))
    before = _tree(tmp_path)
    monkeypatch.setenv("ZARR_PARALLEL_ADOPT_MAX_ENTRIES", str(entries - 20))
    result = cli_result(request)
    assert result.returncode == 2, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert f"{store} is a folder too large to check" in message
    assert f"stops after {entries - 20:,} entries" in message and "all Zarr's so far" in message
    assert "move or delete what is there yourself" in message
    assert _tree(tmp_path) == before
    _nothing_written(store)
    monkeypatch.setenv("ZARR_PARALLEL_ADOPT_MAX_ENTRIES", str(entries))
    result = cli_result(request)
    assert result.returncode == 0, result.stderr[-3000:]
    (legacy,) = CachePaths(store).versions.glob("legacy-*")
    assert sum(1 for _ in legacy.rglob("*")) == entries


def test_the_walk_is_capped_in_seconds_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a slow file system the time cap stops the walk: refused (foreign), naming it."""
    from zarr_parallel.store import ownership

    store = tmp_path / "c.zarr"
    _store_of_entries(store)
    assert ownership.inspect_final(CachePaths(store)).kind == "adoptable"
    monkeypatch.setattr(ownership, "ADOPT_MAX_SECONDS", 0.0)
    found = ownership.inspect_final(CachePaths(store))
    assert found.kind == "foreign" and "stops after 0 s" in found.text
