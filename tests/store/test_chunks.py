"""Unit tests of store/chunks.py: the chunk (or shard) files of a version's arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from zarr_parallel.store.chunks import (
    array_grid,
    array_names,
    chunk_files,
    missing_chunk_files,
    sync_job,
    sync_region,
)
from zarr_parallel.store.disk_names import manifest_dir


def _store(path: Path, zarr_format: int = 3, shards: tuple[int, int] | None = None) -> Path:
    """A version with one array ``a`` (time 5 x x 6; chunks 2 x 3, so the last time row is an
    edge chunk) and a coordinate ``time``, every chunk written."""
    root = zarr.create_group(path, zarr_format=zarr_format)  # type: ignore[arg-type]
    names = {"dimension_names": ("time", "x")} if zarr_format == 3 else {}
    arr = root.create_array(
        "a", shape=(5, 6), chunks=(1, 3) if shards else (2, 3), shards=shards, dtype="i2", **names
    )
    if zarr_format == 2:
        arr.attrs["_ARRAY_DIMENSIONS"] = ["time", "x"]
    arr[:] = np.arange(30, dtype="i2").reshape(5, 6)
    time_dims = {"dimension_names": ("time",)} if zarr_format == 3 else {}
    time = root.create_array("time", shape=(5,), chunks=(5,), dtype="i8", **time_dims)
    if zarr_format == 2:
        time.attrs["_ARRAY_DIMENSIONS"] = ["time"]
    time[:] = np.arange(5)
    manifest_dir(path).mkdir()  # the manifest folder is not an array
    return path


def _on_disk(version: Path, name: str) -> set[Path]:
    meta = {"zarr.json", ".zarray", ".zattrs"}
    return {p for p in (version / name).rglob("*") if p.is_file() and p.name not in meta}


@pytest.mark.parametrize(
    ("zarr_format", "first", "last"),
    [pytest.param(3, "c/0/0", "c/2/1", id="zarr3"), pytest.param(2, "0.0", "2.1", id="zarr2")],
)
def test_chunk_files_are_the_files_zarr_wrote(
    tmp_path: Path, zarr_format: int, first: str, last: str
) -> None:
    version = _store(tmp_path / "v", zarr_format)
    every = chunk_files(version, "a", {})
    assert set(every) == _on_disk(version, "a")
    assert (every[0], every[-1]) == (version / "a" / first, version / "a" / last)
    assert len(every) == 6  # 3 rows of chunks (the last one an edge chunk) x 2 columns


def test_chunk_files_of_a_region(tmp_path: Path) -> None:
    version = _store(tmp_path / "v")
    # time 2:5 and x 3:6: chunk rows 1 and 2 (the edge), chunk column 1.
    got = chunk_files(version, "a", {"time": (2, 5), "x": (3, 6)})
    assert got == [version / "a" / "c" / "1" / "1", version / "a" / "c" / "2" / "1"]
    assert chunk_files(version, "time", {"x": (0, 3)}) == [version / "time" / "c" / "0"]


def test_sharded_arrays_list_shard_files(tmp_path: Path) -> None:
    version = _store(tmp_path / "v", shards=(2, 6))
    assert array_grid(str(version), "a")[:3] == (("time", "x"), (5, 6), (2, 6))
    assert chunk_files(version, "a", {"time": (0, 2)}) == [version / "a" / "c" / "0" / "0"]
    assert set(chunk_files(version, "a", {})) == _on_disk(version, "a")


def test_missing_chunk_files(tmp_path: Path) -> None:
    version = _store(tmp_path / "v")
    assert missing_chunk_files(version, "a") == []
    gone = version / "a" / "c" / "1" / "0"
    gone.unlink()
    assert missing_chunk_files(version, "a") == [gone]


def test_array_names_ignore_the_manifest(tmp_path: Path) -> None:
    assert array_names(_store(tmp_path / "v")) == ["a", "time"]


def test_sync_counts_the_files_that_exist(tmp_path: Path) -> None:
    version = _store(tmp_path / "v")
    (version / "a" / "c" / "0" / "1").unlink()  # e.g. a chunk zarr left unwritten
    assert sync_region(version, ["a"], {"time": (0, 2)}) == 1
    record = {"id": 0, "variables": ["a", "time"], "region": [["time", 0, 5], ["x", 0, 6]]}
    assert sync_job(version, record) == 5 + 1
    assert os.path.exists(version / "a" / "c" / "0" / "0")
