"""The memory model (docs/design.md §5): estimated peak bytes of one job, through xarray or the fast
path.

:func:`job_memory` is the model of a job written through xarray; :func:`fast_job_memory` that of a
job the fast path streams in slabs (:func:`fast_slab_bounds`). The constants are measured; their
comments say where.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from zarr_parallel.planning.grid import IntArray

#: Copies of a job's region held at peak besides the decompressed source chunks: the assembled
#: region, an encoded copy (when a fill value or dtype is encoded), the encoder's contiguous chunk
#: copies, its compressed buffers (as large as the chunks for data that barely compresses), and one
#: more for library buffers and allocator slack (docs/design.md §5). Measured peaks are 2.8 regions
#: for aligned jobs and 3.8 with an encoded fill value on incompressible data
#: (tests/planning/test_memory_model.py), against 6 estimated (the touched chunks plus these five).
#: Element-wise transforms need no extra copy: dask applies each step (``where``'s mask and result,
#: ``fillna``, ``clip``, ``round``) one source chunk at a time, and the step's temporaries are freed
#: before the region is encoded. Chains of them measured 2.2-3.0 regions on float32 and 3.3-3.8 on
#: packed int16 cast to float32, also with one source chunk per region (same tests).
REGION_COPIES = 5


def job_memory(
    touched_elems: int | IntArray,
    region_elems: int | IntArray,
    itemsize: int,
    read_itemsize: int,
) -> int | IntArray:
    """Estimated peak bytes of writing one variable's region (docs/design.md §5).

    The decompressed source chunks touched, a decoded copy of them when decoding changes the
    item size, and :data:`REGION_COPIES` copies of the region.

    >>> job_memory(100, 50, 4, 4)
    1400
    >>> job_memory(100, 50, 4, 2)  # packed int16 decoded to float32
    1600
    """
    decoded = touched_elems * itemsize if itemsize != read_itemsize else 0
    return touched_elems * read_itemsize + decoded + REGION_COPIES * region_elems * itemsize


#: Slabs a fast-path job streams its region in (along the first dimension, at write-chunk
#: boundaries): one slab may be encoded while the next is read (zarr_parallel.run.job._copy_fast).
#: Eight rather than four: a job holds half the memory for the same region (two slabs at once),
#: and a job process's first job faults in half as many fresh pages, ~1 s less on each worker
#: of a 2-core data phase (docs/benchmarks.md, "December 7, noon"); the extra slabs cost
#: nothing measurable (series 14.8-15.2 s either way).
FAST_SLABS = 8


def fast_slab_bounds(start: int, stop: int, chunk: int, slabs: int = FAST_SLABS) -> IntArray:
    """Boundaries of the slabs a fast-path job streams ``[start, stop)`` in.

    At most ``slabs`` pieces of whole write chunks (the last may end at ``stop``).

    >>> fast_slab_bounds(0, 96, 48).tolist()
    [0, 48, 96]
    >>> fast_slab_bounds(0, 500, 48).tolist()
    [0, 96, 192, 288, 384, 480, 500]
    """
    n_chunks = max(1, math.ceil((stop - start) / chunk))
    per = math.ceil(n_chunks / min(slabs, n_chunks))
    edges = np.arange(start, stop, per * chunk, dtype=np.int64)
    return np.concatenate([edges, [stop]]).astype(np.int64)


#: Fast path: most write chunks zarr encodes at once (``async.concurrency`` during its writes).
FAST_WRITE_INFLIGHT = 4
#: Fast path, compressing codecs: the chunk sizes each encoding thread holds: its contiguous copy
#: of the chunk, the compressed result, and the previous chunk's compressed bytes still pending
#: their write (as large as a chunk for data that does not compress). One thread measured
#: 2.06-2.41 chunks under CPU contention on half-compressible data and up to 2.78 with gzip on
#: incompressible data (tests/planning/test_memory_model.py), above the 2 counted before.
FAST_WRITE_COPIES = 3
#: Fast path, ``compression: none``: no compressed buffers (zarr writes an uncompressed chunk
#: from a view of it), so the thread's copy and the buffer zarr pads an edge chunk into (the
#: allocator may keep the freed copy resident meanwhile). One thread measured 0.14-1.99 chunks;
#: the per-thread FAST_THREAD_BYTES covers the rest.
FAST_WRITE_COPIES_UNCOMPRESSED = 2
#: Fast path: most reader threads (zarr_parallel.sources.fastread caps its pool at this), and the
#: bytes each holds per source chunk (the stored bytes, inflated, un-shuffled), in chunk sizes. Two
#: are enough: inflating (libdeflate, GIL released) costs ~1.1 CPU s per GB here, encoding the
#: output with zstd ~6 s per GB, so two readers keep ahead of the encoders; more would only hold
#: more chunks.
FAST_READ_THREADS = 2
FAST_READ_COPIES = 3
#: Fast path: what each thread running at once (readers and encoders) touches besides the counted
#: buffers the first time a process runs a job: its allocator arena and stack. Measured with the
#: kernel's exact peak (VmHWM) in fresh job processes: +8-11 MB at 2 readers and 4 encoders.
FAST_THREAD_BYTES = 2 * 2**20
#: Fast path: allowance over the counted buffers for allocator and interpreter churn. Measured on
#: the 4.2 GB benchmark (benchmarks/results/full.json): peaks of 0.99-1.002x the counted buffers.
FAST_MARGIN = 1.1


def fast_slab_len(length: Any, chunk: int) -> tuple[Any, Any]:
    """Longest slab and number of slabs of a region ``length`` long (see :func:`fast_slab_bounds`).

    >>> fast_slab_len(500, 48)
    (96, 6)
    """
    n_chunks = np.maximum(1, -(-np.asarray(length) // chunk))
    per = -(-n_chunks // np.minimum(FAST_SLABS, n_chunks)) * chunk
    slab = np.minimum(per, length)
    n_slabs = -(-np.asarray(length) // per)
    if np.ndim(slab) == 0:
        return int(slab), int(n_slabs)
    return slab, n_slabs


def fast_job_memory(
    lengths: Sequence[Any],
    write_chunks: Sequence[int],
    itemsize: int,
    read_itemsize: int,
    source_chunk_elems: int,
    write_copies: int = FAST_WRITE_COPIES,
) -> Any:
    """Estimated peak bytes of a fast-path job with these region lengths (docs/design.md §5).

    The job streams its region in slabs along the first dimension: the slab being read (raw
    items, plus a decoded copy when decoding changes the item size), the previous slab being
    written when there are several, the chunks zarr encodes at once, the source chunks the
    reader threads hold and what each of those threads touches (:data:`FAST_THREAD_BYTES`),
    with a :data:`FAST_MARGIN` allowance. A single-slab job reads, then writes (variables
    follow one another too), so its readers' and encoders' buffers never coexist.
    ``write_copies`` is what each encoding thread holds in chunk sizes (:data:`FAST_WRITE_COPIES`,
    or :data:`FAST_WRITE_COPIES_UNCOMPRESSED` for uncompressed chunks).

    >>> fast_job_memory([96, 721, 1440], [48, 180, 360], 4, 4, 721 * 1440)
    644032435
    """
    slab0, n_slabs = fast_slab_len(lengths[0], int(write_chunks[0]))
    slab = slab0 * (math.prod(lengths[1:]) if len(lengths) > 1 else 1)
    held = slab * read_itemsize
    if itemsize != read_itemsize:
        held = held + slab * itemsize
    # The previous slab is written while the next is read: two full slabs when there are three
    # or more; with two, the second is the shorter rest of the region.
    rest = (np.asarray(lengths[0]) - slab0) * (slab // np.maximum(slab0, 1))
    previous = np.where(np.asarray(n_slabs) > 2, slab, np.where(np.asarray(n_slabs) == 2, rest, 0))
    held = held + previous * itemsize
    chunk_elems = math.prod(int(c) for c in write_chunks)
    in_slab = -(-slab // chunk_elems)
    writing = write_copies * np.minimum(FAST_WRITE_INFLIGHT, in_slab) * chunk_elems * itemsize
    reading = FAST_READ_THREADS * FAST_READ_COPIES * source_chunk_elems * read_itemsize
    threads = (FAST_READ_THREADS + FAST_WRITE_INFLIGHT) * FAST_THREAD_BYTES
    # Reading overlaps writing only while a previous slab is written (write._copy_fast).
    buffers = np.where(np.asarray(n_slabs) > 1, writing + reading, np.maximum(writing, reading))
    total = (held + buffers + threads) * FAST_MARGIN
    return int(total) if np.ndim(total) == 0 else total.astype(np.int64)
