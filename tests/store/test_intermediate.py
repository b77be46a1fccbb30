"""A staged plan's intermediate stores (docs/design.md §3.4): where they go, what may be removed,
which temp_store is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from zarr_parallel.errors import RequestError
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir
from zarr_parallel.store.files import write_json_atomic
from zarr_parallel.store.intermediate import (
    check_temp_store,
    remove_intermediates,
    stage_path,
    stale_intermediates,
)
from zarr_parallel.store.paths import CachePaths


def _made_by(folder: Path, paths: CachePaths) -> Path:
    folder.mkdir(parents=True)
    write_json_atomic(manifest_dir(folder) / OWNER_FILE, {"cache_path": paths.canonical})
    return folder


def test_only_intermediates_this_cache_made_are_removed(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    ours = _made_by(stage_path(paths, 1, "a" * 64), paths)
    other = _made_by(stage_path(paths, 1, "b" * 64), CachePaths(tmp_path / "other.zarr"))
    stray = paths.versions / ".stage-1-cccccccccccc"
    stray.mkdir()
    assert stale_intermediates(paths, []) == [ours]
    assert stale_intermediates(paths, [str(ours)]) == []
    assert remove_intermediates(paths, [str(ours), str(other), str(stray)]) == 1
    assert not ours.exists() and other.exists() and stray.exists()


def test_temp_store_subfolder_only(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    scratch = tmp_path / "scratch"
    inter = _made_by(stage_path(paths, 1, "a" * 64, str(scratch)), paths)
    assert inter.parent == scratch and inter.name == "c.zarr.stage-1-aaaaaaaaaaaa"
    (scratch / "someone-elses.dat").write_text("x")
    remove_intermediates(paths, [str(inter)])
    assert not inter.exists() and (scratch / "someone-elses.dat").exists()


def test_temp_store_inside_a_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(RequestError, match="temp_store"):
        check_temp_store(str(src / "scratch"), [str(src)])
    check_temp_store(str(tmp_path / "scratch"), [str(src / "a.nc")])
    assert (tmp_path / "scratch").is_dir()


def test_temp_store_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RequestError, match="cannot be written"):
        check_temp_store(str(blocker / "scratch"), [])
