"""Unit tests of store/files.py: atomic JSON records and fsync of files and folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from zarr_parallel.store.files import read_json, sync_files, write_json_atomic


def test_write_json_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "rec.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    inode = path.stat().st_ino
    write_json_atomic(path, {"b": 2, "when": tmp_path})  # not JSON types: written as text
    assert read_json(path) == {"b": 2, "when": str(tmp_path)}
    assert path.stat().st_ino != inode  # a new file renamed over the old one, never rewritten
    assert os.listdir(path.parent) == ["rec.json"]
    assert path.read_text() == json.dumps({"b": 2, "when": str(tmp_path)}, sort_keys=True)


def test_read_json_of_missing_or_torn_files_is_none(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"id": 3, "fing')
    assert read_json(tmp_path / "torn.json") is None
    (tmp_path / "folder.json").mkdir()
    assert read_json(tmp_path / "folder.json") is None


def test_sync_files_counts_what_exists(tmp_path: Path) -> None:
    (tmp_path / "c" / "0").mkdir(parents=True)
    (tmp_path / "c" / "0" / "1").write_bytes(b"x")
    files = [tmp_path / "c" / "0" / "1", tmp_path / "c" / "0" / "2"]
    assert sync_files(files, tmp_path) == 1
