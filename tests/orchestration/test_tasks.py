"""The write task's notes (zarr_parallel.orchestration.tasks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zarr_parallel.errors import LockLost
from zarr_parallel.orchestration.tasks import attempts_made, mark_attempt
from zarr_parallel.store.disk_names import manifest_dir


def test_an_attempt_is_noted_in_its_version(tmp_path: Path) -> None:
    version = tmp_path / "c.zarr.versions" / "1-abc"
    manifest_dir(version).mkdir(parents=True)
    mark_attempt(version, "run-1", 2, fence="mine")
    assert attempts_made(version, "run-1") == 2
    assert attempts_made(version, "run-2") == 0


def test_an_attempt_in_a_removed_version_says_the_lock_was_lost(tmp_path: Path) -> None:
    """A run frozen after initialising, whose lock another run broke and whose version that run
    removed, wakes and starts its write task: the attempt note brought the removed version back
    (its folders made with parents), left behind for the next run to find. It stops with
    LockLost instead and makes nothing."""
    version = tmp_path / "c.zarr.versions" / "2-def"
    manifest_dir(version).mkdir(parents=True)
    shutil.rmtree(version)
    with pytest.raises(LockLost, match="was removed"):
        mark_attempt(version, "run-1", 1, fence="mine")
    assert not version.exists()
