"""Durable files: JSON records written atomically, and fsync of files and folders.

Every record of a cache (manifests, fences, leases of publish) is written through
:func:`write_json_atomic`: a reader sees the old document or the new one, never a torn one, and a
record that was written survives a crash of the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON document, or None when missing or torn."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, value: Any, *, parents: bool = True) -> None:
    """Write JSON durably: temporary file, fsync, rename, fsync of the folder.

    With ``parents=False`` the folder must exist (``FileNotFoundError`` otherwise): a writer
    that must not bring back a folder another process removed says so.
    """
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new or renamed files) durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_files(files: Iterable[Path], root: Path) -> int:
    """fsync ``files`` and every folder between them and ``root``; returns files synced.

    Missing files are skipped: Zarr leaves a chunk that holds only the fill value unwritten.
    """
    folders: set[Path] = set()
    count = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        count += 1
        parent = path.parent
        # New chunk files may sit in new folders (v3's c/0/1/): make every entry up to root durable.
        while parent not in folders:
            folders.add(parent)
            if parent == root or parent == parent.parent:
                break
            parent = parent.parent
    for folder in folders:
        fsync_dir(folder)
    return count
