"""Helpers shared by the deploy-mode, fault and SLURM tests (plain functions, no fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.api import CacheResult


def cache_files(cache: Path) -> dict[str, bytes]:
    """Array metadata and chunk files of a cache, by path inside it.

    Sidecars are left out (docs/design.md §2a): the manifest folder ``.zarr-parallel/`` and the
    group-level documents at the top (group attributes, consolidated metadata).
    """
    root = Path(os.path.realpath(cache))
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir() or rel.parts[0] == ".zarr-parallel" or len(rel.parts) == 1:
            continue
        files[str(rel)] = path.read_bytes()
    return files


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Byte-identical arrays: the same files with the same bytes."""
    got, want = cache_files(cache), cache_files(reference)
    assert sorted(got) == sorted(want)
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"files differ: {different[:5]}"
    assert any("/c/" in name or name.count("/") >= 1 for name in want)


def run_cache(files: list[Path], store: Path, **fields: Any) -> CacheResult:
    """Cache the test dataset with ``chunks={'time': 12}`` into ``store``."""
    options: dict[str, Any] = {
        "chunks": {"time": 12},
        "num_jobs": 4,
        "memory_limit": "1GB",
        **fields,
    }
    preprocessors = options.pop("preprocessors", None)
    zp = ZarrParallelAssembler([str(p) for p in files], preprocessors=preprocessors)
    result = zp.cache(cache_store=str(store), **options)
    assert isinstance(result, CacheResult)
    return result


def hold_spec(tmp: Path, index: int) -> tuple[dict[str, Any], Path, Path]:
    """A ``test_hold`` preprocessor blocking the job holding time ``index``, its marker and log."""
    marker, started = tmp / "hold.marker", tmp / "hold.started"
    marker.write_text("hold")
    spec = {
        "type": "test_hold",
        "marker": str(marker),
        "started": str(started),
        "index": index,
        # One job: a plan balanced for two workers splits latitude too (docs/design.md §3.4).
        "also": {"latitude": 0},
    }
    return spec, marker, started


def started_lines(started: Path) -> list[dict[str, Any]]:
    """The processes the ``test_hold`` plug-in blocked, one per attempt."""
    if not started.exists():
        return []
    return [json.loads(line) for line in started.read_text().splitlines() if line.strip()]


def when_blocked(
    started: Path, act: Callable[[dict[str, Any]], None], timeout: float = 300.0
) -> threading.Thread:
    """In a thread: wait until a job is blocked by ``test_hold``, then ``act(info)`` on it."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = started_lines(started)
            if lines:
                act(lines[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_held(
    files: list[Path],
    store: Path,
    act: Callable[[dict[str, Any]], None],
    index: int = 30,
    **fields: Any,
) -> tuple[CacheResult, Path]:
    """Cache with the job holding time ``index`` blocked by ``test_hold``; once it blocks,
    ``act(info)`` on it (info: its pid, parent pid, SLURM job id), then let it go on.

    Returns the run's result and the plug-in's log of blocked attempts (:func:`started_lines`).
    """
    spec, marker, started = hold_spec(store.parent, index)

    def act_then_release(info: dict[str, Any]) -> None:
        act(info)
        marker.unlink(missing_ok=True)

    thread = when_blocked(started, act_then_release)
    result = run_cache(files, store, preprocessors=[spec], **fields)
    thread.join(1)
    return result, started


def squeue_ids() -> set[str]:
    """Job ids SLURM still lists."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def job_records(result: CacheResult) -> list[dict[str, Any]]:
    """The manifest records of the published version."""
    folder = Path(result.summary["version"]) / ".zarr-parallel" / "jobs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
