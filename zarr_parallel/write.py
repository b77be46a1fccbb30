"""Run one write job: read its region once, transform, write whole chunks, record it."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import numpy as np
import psutil

from zarr_parallel.source import read_settings
from zarr_parallel.store import array_checksum, plan_record, record_job, write_region
from zarr_parallel.target import cached_target

logger = logging.getLogger(__name__)


@dataclass
class PeakMemory:
    """Peak resident memory above the starting level, sampled in a thread."""

    interval: float = 0.005
    start: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def increase(self) -> int:
        """Peak bytes above the level at start."""
        return max(0, self.peak - self.start)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc.memory_info().rss)


@contextmanager
def measure_peak() -> Iterator[PeakMemory]:
    """Measure the peak RSS increase of the block."""
    rss = psutil.Process().memory_info().rss
    meter = PeakMemory(start=rss, peak=rss)
    thread = threading.Thread(target=meter._run, daemon=True)
    thread.start()
    try:
        yield meter
    finally:
        meter._stop.set()
        thread.join()
        meter.peak = max(meter.peak, psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Hand memory the job freed back to the system (glibc; DESIGN §5).

    By default glibc raises its mmap threshold after the first large block is freed, so later
    arrays come from the heap, and once freed they stay resident: a worker's RSS then grows
    variable after variable and job after job beyond what any job holds, and the memory
    estimate stops being an upper bound. A fixed threshold (as ``MALLOC_MMAP_THRESHOLD_`` sets)
    keeps large arrays in their own mappings, returned when freed, and ``malloc_trim`` returns
    the freed small blocks (e.g. decompressed source chunks after assembly). No-op off glibc.
    """
    libc = _prepare_process()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _prepare_process() -> Any:
    """Once per process, before its first job is measured: glibc's settings, and the imports
    the first write would otherwise make mid-job.

    xarray looks for a ``dask.distributed`` client on every write, importing ``distributed``
    (about 20 MB) the first time. Library start-up is what ``memory_reserve`` pays for; done
    here, it is not counted as the first job's memory.
    """
    with contextlib.suppress(ImportError):  # distributed is a dependency; stay safe anyway
        import distributed  # noqa: F401
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        return libc
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        logger.debug("glibc's mallopt/malloc_trim unavailable; freed memory may stay resident")
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB or more get their own mapping


@lru_cache(maxsize=8)
def _plan_jobs(version: str) -> tuple[str, dict[int, tuple[list[str], list[list[Any]], int]]]:
    rec = plan_record(Path(version))
    if rec is None:
        raise FileNotFoundError(f"{version} has no plan.json: it was not initialised")
    jobs = {int(j[0]): (list(j[1]), [list(r) for r in j[2]], int(j[3])) for j in rec["job_list"]}
    return str(rec["fingerprint"]), jobs


def run_job(
    request_json: str, version: str, job_id: int, generate_stats: bool = False
) -> dict[str, Any]:
    """Write job ``job_id`` of the plan stored in ``version`` and record it.

    Returns the job's record: id, region, fingerprint, bytes, checksums, duration, peak memory
    (and per-variable statistics when asked).
    """
    t0 = time.perf_counter()
    release_freed_memory()
    fp, jobs = _plan_jobs(version)
    variables, region, estimate = jobs[job_id]
    target = cached_target(request_json)
    slices = {str(d): slice(int(a), int(b)) for d, a, b in region}
    written = 0
    checksums: dict[str, str] = {}
    stats: dict[str, dict[str, float]] = {}
    with measure_peak() as peak, dask.config.set(**read_settings(request_json, target.layout)):
        for name in variables:
            var = target.dataset[name]
            sel = {d: s for d, s in slices.items() if d in var.dims}
            part = target.clean(var.isel(sel).to_dataset())[name]
            part = part.load()
            release_freed_memory()  # the source chunks the region was assembled from
            write_region(Path(version), name, part, sel)
            values = part.values
            written += values.nbytes
            checksums[name] = array_checksum(values)
            if generate_stats:
                stats[name] = _stats(values)
            del part, values
            release_freed_memory()
    record = {
        "id": job_id,
        "region": region,
        "variables": variables,
        "fingerprint": fp,
        "bytes": written,
        "checksums": checksums,
        "seconds": round(time.perf_counter() - t0, 4),
        "peak_memory": peak.increase,
        "estimated_memory": estimate,
        # The worker that ran the job (the parent of its job process, see execution.py).
        "pid": int(os.environ.get("ZARR_PARALLEL_WORKER_PID") or os.getpid()),
        "host": os.uname().nodename,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if generate_stats:
        record["stats"] = stats
    record_job(Path(version), record)
    return record


def _stats(values: np.ndarray) -> dict[str, float]:
    if not np.issubdtype(values.dtype, np.number):
        return {"count": float(values.size)}
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    return {
        "count": float(values.size),
        "nan_count": float(values.size - finite.size),
        "min": float(finite.min()) if finite.size else float("nan"),
        "max": float(finite.max()) if finite.size else float("nan"),
        "sum": float(finite.sum(dtype="float64")) if finite.size else 0.0,
    }


def merge_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Combine per-job statistics into per-variable count/min/max/mean/NaN-count."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        for name, s in rec.get("stats", {}).items():
            acc = out.setdefault(
                name, {"count": 0.0, "nan_count": 0.0, "min": np.inf, "max": -np.inf, "sum": 0.0}
            )
            acc["count"] += s.get("count", 0.0)
            acc["nan_count"] += s.get("nan_count", 0.0)
            acc["sum"] += s.get("sum", 0.0)
            if "min" in s and np.isfinite(s["min"]):
                acc["min"] = min(acc["min"], s["min"])
                acc["max"] = max(acc["max"], s["max"])
    for acc in out.values():
        valid = acc["count"] - acc["nan_count"]
        acc["mean"] = acc.pop("sum") / valid if valid else float("nan")
    return out
