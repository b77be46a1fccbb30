"""Ready a job process for a run's jobs before its first job (docs/design.md §6).

A job process's first job made what every later job of the run found made: the chunk index of
each source file its variables read (:func:`zarr_parallel.sources.hdf5_chunks.h5_storage`) and
its two slab buffers (fresh pages, which the kernel zeroes and maps one by one). On the 2-core
benchmark machine that made each process's first job about 1 s slower than its second for the
same bytes. A worker's job process gets the plan as soon as it is written (the ``warm`` message,
:func:`zarr_parallel.run.job_process.warm`) and makes both while the run initialises and its
first tasks are sent, in time it would otherwise spend waiting.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from zarr_parallel import buffers
from zarr_parallel.request.protocols import is_remote
from zarr_parallel.run.job import copy_source, fast_var, planned_jobs, slab_slices
from zarr_parallel.sources import fastread
from zarr_parallel.sources.hdf5_chunks import h5_storage
from zarr_parallel.sources.source import Source
from zarr_parallel.sources.target import Target, cached_target

logger = logging.getLogger(__name__)

#: Seconds spent reading chunk indexes ahead, at most: a job waits for its process's warming,
#: which can only read what the process's jobs would read anyway, but not all of a large
#: archive's indexes (a worker may never get a job of most variables).
WARM_SECONDS = 2.0
#: Source files whose chunk index is read ahead, at most (the index cache keeps 256).
WARM_FILES = 200
#: Jobs whose slabs size the kept buffers: the first ones (a plan's jobs are alike; a later
#: job with larger slabs makes its own, as without warming). A plan of tens of thousands of
#: jobs would otherwise keep its first job waiting for seconds.
WARM_JOBS = 64


def warm(request_json: str, version: str, seconds: float = WARM_SECONDS) -> dict[str, int]:
    """Read ahead the chunk indexes the plan in ``version`` reads (in job order, for at most
    ``seconds``) and keep slab buffers for its first :data:`WARM_JOBS` jobs, pages touched.

    Buffers are kept only when two of the largest slab fit the largest job's estimate (they
    count as the memory of the job they are lent to, see :mod:`zarr_parallel.buffers`). A
    later stage of a staged plan (which copies an intermediate store) readies nothing.

    Returns
    -------
    dict
        ``files``: chunk indexes read; ``kept``: bytes of buffers kept.
    """
    if copy_source(version) is not None:
        return {"files": 0, "kept": 0}
    fingerprint, jobs, _planned = planned_jobs(version)
    target = cached_target(request_json)
    deadline = time.monotonic() + seconds
    seen: dict[str, fastread.FastVar | None] = {}
    files: set[tuple[str, str]] = set()
    largest = 0
    for job_id in sorted(jobs)[:WARM_JOBS]:
        variables, region, _estimate = jobs[job_id]
        for name in variables:
            if name not in seen:
                seen[name] = fast_var(request_json, name)
                _read_indexes(seen[name], files, deadline)
            fv = seen[name]
            if fv is not None:
                largest = max(largest, largest_slab_bytes(fv, target, name, region))
    most = max((estimate for _v, _r, estimate in jobs.values()), default=0)
    kept = 0
    if largest and buffers.KEPT * largest <= most:
        kept = buffers.reserve(fingerprint, largest)
    logger.debug("warmed: %d chunk indexes read, %d bytes of buffers kept", len(files), kept)
    return {"files": len(files), "kept": kept}


def read_indexes_ahead(source: Source, group: str | None, seconds: float = WARM_SECONDS) -> int:
    """Read (and cache) the chunk index of every data variable in every local netCDF/HDF5 file
    of ``source``, for at most ``seconds`` and :data:`WARM_FILES` files: what the fast path's
    jobs read first. Done as the run's source is opened ahead, while the run still plans (the
    indexes need the source only, not the plan). Returns the indexes read."""
    layout = source.layout
    if layout.engine not in ("h5netcdf", "netcdf4") or any(is_remote(f) for f in layout.files):
        return 0
    deadline = time.monotonic() + seconds
    read: set[tuple[str, str]] = set()
    for name in layout.variables:
        if name not in source.dataset.coords:
            _read_indexes(_Files(name, group, layout.files_of(name)), read, deadline)
    return len(read)


@dataclass(frozen=True)
class _Files:
    """The files of one source variable, as :func:`_read_indexes` reads them."""

    source_name: str
    group: str | None
    files: tuple[str, ...]


def _read_indexes(
    fv: fastread.FastVar | _Files | None, files: set[tuple[str, str]], deadline: float
) -> None:
    """Read (and cache) the chunk index of ``fv``'s files, until ``deadline`` or the cap."""
    if fv is None:
        return
    for path in fv.files:
        if time.monotonic() > deadline or len(files) >= WARM_FILES:
            return
        try:
            h5_storage(path, fv.source_name, fv.group)
        except Exception as e:  # not readable by the fast path: its jobs say so, not this
            logger.debug("no chunk index read ahead for %s in %s: %s", fv.source_name, path, e)
            return
        files.add((path, fv.source_name))


def largest_slab_bytes(
    fv: fastread.FastVar, target: Target, name: str, region: list[list[Any]]
) -> int:
    """Bytes of the largest slab buffer a fast-path job of ``region`` reads ``name`` into
    (stored dtype, see :func:`zarr_parallel.run.job._copy_fast`)."""
    var = target.dataset[name]
    bounds = {str(d): (int(a), int(b)) for d, a, b in region}
    extents = [bounds.get(d, (0, int(var.sizes[d]))) for d in fv.dims]
    if not extents:
        return 0
    grid = (target.shards or {}).get(name) or target.chunks[name]
    first = slice(*extents[0])
    longest = max(s.stop - s.start for s in slab_slices(first, grid[fv.dims[0]]))
    others = math.prod(b - a for a, b in extents[1:])
    itemsize = h5_storage(fv.files[0], fv.source_name, fv.group).dtype.itemsize
    return int(longest * others * itemsize)


__all__ = [
    "WARM_FILES",
    "WARM_JOBS",
    "WARM_SECONDS",
    "largest_slab_bytes",
    "read_indexes_ahead",
    "warm",
]
