"""Run one write job: read its region once, transform, write whole chunks, record it."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import numpy as np
import psutil

from zarr_parallel import buffers
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.planning.memory import fast_slab_bounds
from zarr_parallel.request.model import CacheRequest

# Imported for its effect: a job process (SLURM, a local worker) opens the source again, and in a
# policed run its kerchunk references are checked there too (the policy installs the check).
from zarr_parallel.run import policy  # noqa: F401
from zarr_parallel.run.job_stats import merge_parts, stats_into, value_stats
from zarr_parallel.run.overlap import core_times, overlaps
from zarr_parallel.sources import fastread, hdf5_chunks
from zarr_parallel.sources.identity import check_job_sources, check_sources
from zarr_parallel.sources.source import read_settings
from zarr_parallel.sources.target import (
    INDEX_PREFIX,
    Target,
    cached_source,
    cached_target,
    source_state,
)
from zarr_parallel.store.chunks import sync_region
from zarr_parallel.store.intermediate import copy_region, release_region
from zarr_parallel.store.manifest import check_fence, plan_record, record_job
from zarr_parallel.store.zarr_io import array_checksum, crc32, write_region, write_values

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
    """Measure the peak RSS increase of the block.

    In a job process (:mod:`zarr_parallel.run.job_process`), which runs nothing but jobs, the
    kernel's own high-water mark is reset at the start (``/proc/self/clear_refs``) and read at the
    end: the exact peak, which sampling can miss, and no sampling thread. Elsewhere (series mode
    runs jobs in the caller's process, whose high-water mark is not ours to reset) a thread
    samples the RSS.
    """
    exact = os.environ.get("ZARR_PARALLEL_JOB_PROCESS") == "1" and reset_high_water_mark()
    rss = psutil.Process().memory_info().rss
    meter = PeakMemory(start=rss, peak=rss)
    thread = None
    if not exact:
        # Only where the kernel's mark cannot be used: the thread wakes 200 times a second and
        # takes the GIL each time, beside a job process's one reading thread (without it a
        # local cluster's data phase was 1.5-3 % shorter, docs/benchmarks.md "December 7,
        # late night").
        thread = threading.Thread(target=meter._run, daemon=True)
        thread.start()
    try:
        yield meter
    finally:
        meter._stop.set()
        if thread is not None:
            thread.join()
        meter.peak = max(meter.peak, psutil.Process().memory_info().rss)
        if exact:
            meter.peak = max(meter.peak, high_water_mark())


def reset_high_water_mark() -> bool:
    """Reset this process's peak RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return high_water_mark() > 0
    except OSError:
        return False


def high_water_mark() -> int:
    """Peak RSS of this process since start or the last reset (``VmHWM``), or 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def release_freed_memory() -> None:
    """Hand memory the job freed back to the system (glibc; docs/design.md §5).

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
    import distributed  # noqa: F401 - a dependency (dask[distributed])

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        return libc
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        logger.debug("glibc's mallopt/malloc_trim unavailable; freed memory may stay resident")
        return None


def prewarm_job_stack() -> None:
    """Make, as a job process starts, what its first job would make mid-job (0.3-0.6 s
    measured): :func:`_prepare_process`'s imports, h5py and h5netcdf, xarray's backend search."""
    _prepare_process()
    import h5netcdf  # noqa: F401 - both are dependencies (the source check opens files)
    import h5py  # noqa: F401
    import xarray as xr

    xr.backends.list_engines()


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB or more get their own mapping


@lru_cache(maxsize=8)
def planned_jobs(
    version: str,
) -> tuple[str, dict[int, tuple[list[str], list[list[Any]], int]], dict[str, Any]]:
    """The plan's fingerprint, its jobs, and the source layout as planned (with its identity)."""
    rec = plan_record(Path(version))
    if rec is None:
        raise FileNotFoundError(f"{version} has no plan.json: it was not initialised")
    jobs = {
        i: (list(j.variables), [list(r) for r in j.region], j.memory)
        for i, j in read_jobs(rec).items()
    }
    return str(rec["fingerprint"]), jobs, dict(rec.get("layout") or {})


def check_job_source(
    request_json: str, planned: dict[str, Any], variables: list[str], slices: dict[str, slice]
) -> Target:
    """The job's target, once the source entries the job reads are checked unchanged since
    planning (stat calls for local files; see :mod:`zarr_parallel.sources.identity`).

    Raises
    ------
    SourceChanged
        An entry the job reads changed since the run planned it.
    """
    req = CacheRequest.model_validate_json(request_json)
    try:
        target = cached_target(request_json)
    except Exception:
        # A source replaced or cut short may not even open: say that it changed, if it did.
        check_sources(req, planned.get("identity"))
        raise
    sources = [target.sources.get(name) for name in variables]
    names = None if None in sources else [str(s) for s in sources]
    # Only a kerchunk job needs the references (which files its variables point at), and only
    # a store's or a reference's chunk keys say which source chunks a job reads.
    engine = planned.get("engine")
    refs = cached_source(req).refs if engine == "kerchunk" else None
    ranges = target.source_chunk_ranges(variables, slices) if engine in CHUNKED else None
    check_job_sources(req, planned, refs, names, _concat_range(target, variables, slices), ranges)
    return target


#: Engines whose identity entries are per chunk file (kerchunk references, remote Zarr samples).
CHUNKED = ("kerchunk", "zarr")


def _concat_range(
    target: Target, variables: list[str], slices: dict[str, slice]
) -> tuple[int, int] | None:
    """The job's source index range along the joining dimension (None: unknown, i.e. all)."""
    dim = target.layout.concat_dim
    if dim is None:
        return None
    coord = f"{INDEX_PREFIX}{dim}"
    lo, hi = None, None
    for name in variables:
        var = target.dataset[name]
        if coord not in var.coords:
            return None
        # The index coordinate's numpy values, sliced directly (xarray's isel costs ~1 ms).
        index_var = var.coords[coord].variable
        index = np.asarray(index_var.values)[
            tuple(slices.get(str(d), slice(None)) for d in index_var.dims)
        ]
        if index.size:
            lo = int(index.min()) if lo is None else min(lo, int(index.min()))
            hi = int(index.max()) + 1 if hi is None else max(hi, int(index.max()) + 1)
    return None if lo is None or hi is None else (lo, hi)


def run_job(
    request_json: str,
    version: str,
    job_id: int,
    generate_stats: bool = False,
    fence: str | None = None,
) -> dict[str, Any]:
    """Write job ``job_id`` of the plan stored in ``version`` and record it.

    ``fence`` is the token the job's run holds the cache's lock with: the record is written
    only while the lock file still holds it (see :func:`zarr_parallel.store.manifest.record_job`).

    Returns the job's record: id, region, fingerprint, bytes, checksums, duration, peak memory
    (and per-variable statistics when asked).
    """
    t0 = time.perf_counter()
    release_freed_memory()
    started = time.time()
    if fence is not None:
        # Before writing a chunk: a run whose lock was broken while it was paused writes
        # nothing more (the run that took the lock over may be writing or removing this very
        # version). Without a token (direct library use) the record's check alone applies.
        check_fence(Path(version), f"writing job {job_id}", fence)
    fp, jobs, planned = planned_jobs(version)
    variables, region, estimate = jobs[job_id]
    slices = {str(d): slice(int(a), int(b)) for d, a, b in region}
    # Before reading: a source changed since planning would give a cache half old, half new.
    target = check_job_source(request_json, planned, variables, slices)
    copy_from = copy_source(version)
    # Region buffers kept by the last job are lent to this one only if it is of the same plan
    # (its regions are alike) and they fit its estimate; otherwise they are let go before it
    # makes its own. Kept for it, they count as its memory (they are resident at its start).
    kept = buffers.claim(fp, estimate)
    written = 0
    checksums: dict[str, str] = {}
    stats: dict[str, dict[str, float]] = {}
    fast: dict[str, int] = {}
    read_before = rchar()
    with measure_peak() as peak, dask.config.set(**read_settings(request_json, target.layout)):
        for name in variables:
            var = target.dataset[name]
            sel = {d: s for d, s in slices.items() if d in var.dims}
            if copy_from is not None:
                # A later stage of a staged plan: the region as stored in the intermediate
                # before it (into the next intermediate, or the version), with the checksum and
                # statistics of its decoded values (no second read).
                parts: list[dict[str, float]] = []
                nbytes, checksums[name] = copy_region(
                    Path(copy_from),
                    Path(version),
                    name,
                    [str(d) for d in var.dims],
                    sel,
                    stats_into(parts) if generate_stats else None,
                )
                written += nbytes
                if generate_stats:
                    stats[name] = merge_parts(parts)
                release_freed_memory()
                continue
            copied = _copy_fast(request_json, target, version, name, sel, generate_stats, fast)
            if copied is not None:
                nbytes, checksums[name], var_stats = copied
                written += nbytes
                if var_stats is not None:
                    stats[name] = var_stats
                release_freed_memory()
                continue
            buffers.clear()  # the xarray path makes its own arrays
            part = target.clean(var.isel(sel).to_dataset())[name]
            part = part.load()
            release_freed_memory()  # the source chunks the region was assembled from
            write_region(Path(version), name, part, sel)
            values = part.values
            del part
            written += values.nbytes
            checksums[name] = array_checksum(values)
            if generate_stats:
                stats[name] = value_stats(values)
            del values
            release_freed_memory()
    record = {
        "id": job_id,
        "region": region,
        "variables": variables,
        "fingerprint": fp,
        "bytes": written,
        "checksums": checksums,
        "seconds": round(time.perf_counter() - t0, 4),
        "peak_memory": peak.increase + kept,
        # Kept buffers it was lent at its start (by the job before it, or readied ahead by
        # zarr_parallel.run.warm): counted in peak_memory.
        "lent_memory": kept,
        "estimated_memory": estimate,
        "started": round(started, 4),
        # Absolute peak RSS of the worker process during the job (what memory_limit bounds).
        "peak_rss": peak.peak,
        # Bytes this process read while the job ran (/proc/self/io rchar: source chunks, plus
        # a few KB of store metadata), and the source bytes the fast path read per variable.
        "read_bytes": rchar() - read_before if read_before >= 0 else None,
        "fast_read": fast,
        # The worker that ran the job (the parent of its job process, see execution.py).
        "pid": int(os.environ.get("ZARR_PARALLEL_WORKER_PID") or os.getpid()),
        "host": os.uname().nodename,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if generate_stats:
        record["stats"] = stats
    record_job(Path(version), record, fence)
    if copy_from is not None:
        dims = {n: [str(d) for d in target.dataset[n].dims] for n in variables}
        release_region(Path(copy_from), Path(version), variables, dims, slices)
    return record


@lru_cache(maxsize=8)
def copy_source(version: str) -> str | None:
    """The store this stage's jobs copy from: the last intermediate written before ``version``
    (the version, or a later stage's intermediate store), as its ``plan.json`` lists them.

    None for a direct plan and for a staged plan's first stage: their jobs read the source.
    """
    folders = (plan_record(Path(version)) or {}).get("intermediates") or []
    return str(folders[-1]) if folders else None


FAST_READ_ENV = fastread.FAST_READ_ENV


def fast_var(request_json: str, name: str) -> fastread.FastVar | None:
    """How the fast path reads ``name`` (None: through xarray), made once per source state."""
    # Keyed by the source's state as cached_target is: a source file grown or rewritten in
    # place (a re-cache in a long-lived process) must not be read by a stale index.
    req = CacheRequest.model_validate_json(request_json)
    return _cached_fast_var(request_json, source_state(req), name)


@lru_cache(maxsize=64)
def _cached_fast_var(request_json: str, state: str, name: str) -> fastread.FastVar | None:
    req = CacheRequest.model_validate_json(request_json)
    return fastread.fast_plan(cached_target(request_json), req, name)


def _copy_fast(
    request_json: str,
    target: Target,
    version: str,
    name: str,
    sel: dict[str, slice],
    generate_stats: bool,
    fast: dict[str, int],
) -> tuple[int, str, dict[str, float] | None] | None:
    """Copy one variable's region by raw chunk reads, streaming slab by slab.

    The region is cut along its first dimension into up to
    :data:`~zarr_parallel.planning.memory.FAST_SLABS` slabs at write-chunk boundaries. Slab ``k`` is
    written (zarr encodes in its threads) while slab ``k + 1`` is read, so reading and encoding
    overlap and at most two slabs are held, unless the first slab's read left the cores no idle
    time to fill (:mod:`zarr_parallel.run.overlap`): then each slab is written before the next
    is read. Returns (bytes, checksum, statistics), or None to use the xarray path. The checksum
    is the CRC32 of the whole region's bytes, chained over the slabs (they are contiguous in C
    order).
    """
    if os.environ.get(FAST_READ_ENV, "1") == "0":
        return None
    fv = fast_var(request_json, name)
    if fv is None:
        return None
    dims = list(fv.dims)
    grid = (target.shards or {}).get(name) or target.chunks[name]
    full = {d: sel.get(d, slice(0, int(target.dataset[name].sizes[d]))) for d in dims}
    slabs = (
        [{**full, dims[0]: s} for s in slab_slices(full[dims[0]], grid[dims[0]])]
        if dims
        else [full]
    )
    crc = 0
    nbytes = 0
    nread = 0
    parts: list[dict[str, float]] = []
    try:
        # Two threads: one writes slab k + 1 while the other fsyncs slab k's chunk files, so
        # the job's record (which fsyncs every file again, see store.record_job) finds them
        # clean instead of flushing the whole region at the end (~1 s for 2 GB written).
        with ThreadPoolExecutor(2, thread_name_prefix="zp-write") as writer:
            # The slab being written, and its buffer while that is still held.
            pending: tuple[Future[None], dict[str, slice], np.ndarray | None] | None = None
            syncs: list[Future[int]] = []
            overlap: bool | None = None  # decided on the first slab's read (run/overlap.py)
            for slab in slabs:
                before = core_times() if overlap is None else None
                # Each slab is read into a kept buffer (zarr_parallel.buffers), given back
                # once it is written: at most two at once, one when written in turn.
                lent: list[np.ndarray] = []
                values, rstats = fastread.read_region(fv, slab, out=_lend_into(lent))
                if overlap is None:
                    overlap = overlaps(before, core_times())
                nread += rstats.bytes_read
                crc = crc32(np.ascontiguousarray(values).data, crc)
                nbytes += values.nbytes
                if generate_stats:
                    parts.append(value_stats(values))
                if pending is not None:
                    pending[0].result()
                    if pending[2] is not None:
                        buffers.give(pending[2])
                    syncs.append(writer.submit(_sync_slab, version, name, pending[1]))
                # Chunk files are fsynced as they are written, while the other threads
                # encode: the last slab's would otherwise be flushed by the job's record, with
                # nothing to overlap (0.15 s a job on the month benchmark's first stage).
                job = writer.submit(write_values, Path(version), name, values, dims, slab, True)
                pending = (job, slab, lent[0])
                if not overlap:
                    # Written: its buffer takes the next slab (in turn a job holds one slab).
                    job.result()
                    buffers.give(lent[0])
                    pending = (job, slab, None)
                del values
            if pending is not None:
                pending[0].result()
                if pending[2] is not None:
                    buffers.give(pending[2])
            for done in syncs:
                done.result()
    except hdf5_chunks.Unsupported as e:
        # Nothing unusual was written: every slab written holds exact values. The xarray path
        # rewrites the whole region.
        logger.warning("fast read of %s stopped (%s); reading through xarray", name, e)
        return None
    fast[name] = nread
    return nbytes, f"{crc:08x}", (merge_parts(parts) if generate_stats else None)


def _lend_into(lent: list[np.ndarray]) -> Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray]:
    """A buffer maker for :func:`fastread.read_region` that notes what it lent in ``lent``."""

    def take(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        lent.append(buffers.take(shape, dtype))
        return lent[-1]

    return take


def _sync_slab(version: str, name: str, slab: dict[str, slice]) -> int:
    """fsync the chunk files of one written slab (and their folders); returns files synced."""
    return sync_region(Path(version), [name], {d: (s.start, s.stop) for d, s in slab.items()})


def slab_slices(region: slice, chunk: int) -> list[slice]:
    """The slabs of ``region`` along one dimension (see ``FAST_SLABS``)."""
    bounds = fast_slab_bounds(int(region.start), int(region.stop), int(chunk))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def rchar() -> int:
    """Bytes this process has read (``rchar`` of /proc/self/io), or -1 where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1
