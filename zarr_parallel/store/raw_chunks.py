"""Chunk files of our own layouts, decoded and encoded without zarr's per-chunk machinery.

Reading a region of a staged plan's intermediate (:func:`read_region`), and writing whole zstd
chunks of a version (:func:`chunk_writer`).

A later stage copies whole regions out of the intermediate store before it
(:func:`zarr_parallel.store.intermediate.copy_region`). Through zarr, each chunk is decoded into
a new buffer and copied into a new region array: on fresh pages, two passes over every byte
(job processes hand freed memory back to the system between jobs). On the month map → time-series
benchmark that read ran at 0.8 GB/s. The intermediate is always one layout, the one
:func:`~zarr_parallel.store.intermediate.initialise_intermediate` writes: Zarr v3, no shards,
``bytes`` (little endian) then ``blosc``, C order, the default ``c/i/j/k`` chunk keys. For that
layout :func:`read_region` decodes each chunk file with Blosc in threads, straight into the
region where the chunk is one contiguous piece of it (whole chunks along every dimension but
the first: a staged plan's intermediate chunks span the stage-2 jobs' later dimensions), else
through a chunk-sized buffer. The region array comes from the process's kept buffers
(:mod:`zarr_parallel.buffers`), so its pages are not made afresh for every job. Any other layout
is read through zarr.

Writing: the fast path hands zarr one chunk at a time (:func:`zarr_parallel.store.zarr_io.
write_values`). For each, zarr's synchronous call crosses to its event loop, which encodes in a
thread pool and writes in another: on the month benchmark's last stage the writes ran at 270 MB/s
where copying, compressing and writing the same chunks in the same two threads ran at 370 MB/s.
For ``bytes`` then ``zstd`` or ``blosc`` (no shards, C order, the default chunk keys: the
default codec, and a staged plan's intermediate), :func:`chunk_writer` compresses a chunk in the
calling thread (zstd: the frame zarr's codec writes, through libzstd without the GIL,
:func:`zarr_parallel.store.zstd_nogil.encode_frame`; Blosc: zarr's own configured encoder) and
writes its file as zarr's local store does: a temporary file in the chunk's folder, then a
rename.

Releasing: an intermediate chunk that only one job reads is needed by no other once that job is
recorded. :func:`release_chunks` empties such files (truncated to 0 bytes, so their page-cache
pages are freed then, and the next job's writes reuse them warm, instead of pages the system
may have handed back to the host). A 0-byte file is never a chunk zarr wrote: :func:`read_region`
refuses one (:class:`ChunkReleased`) before anything of the region is used, so a late duplicate
of a recorded job can fail, never write fill values in place of released data.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from zarr_parallel import buffers
from zarr_parallel.errors import RunFailed
from zarr_parallel.sources.fastread import reader_threads
from zarr_parallel.store.zstd_nogil import LIBZSTD, encode_frame, frame_bound

logger = logging.getLogger(__name__)


@contextmanager
def region_buffer(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Iterator[np.ndarray]:
    """An uninitialised C-ordered array of ``shape`` from the process's kept buffers
    (:mod:`zarr_parallel.buffers`), lent for the ``with`` block and kept afterwards."""
    out = buffers.take(shape, dtype)
    try:
        yield out
    finally:
        buffers.give(out)


def _plain_layout(arr: Any) -> bool:
    """Zarr v3 on a local store, no shards, C order, native numbers, ``c/i/j`` chunk keys."""
    meta = arr.metadata
    return (
        meta.zarr_format == 3
        and arr.shards is None
        and arr.order == "C"
        and np.dtype(arr.dtype).isnative
        and np.dtype(arr.dtype).kind in "biuf"
        and getattr(meta.chunk_key_encoding, "name", "") == "default"
        and getattr(meta.chunk_key_encoding, "separator", "") == "/"
        and getattr(arr.store_path.store, "root", None) is not None
    )


def direct_layout(arr: Any) -> bool:
    """Whether :func:`read_region` can decode ``arr``'s chunk files itself (see the module)."""
    codecs: tuple[Any, ...] = tuple(getattr(arr.metadata, "codecs", ()))
    return _plain_layout(arr) and [type(c) for c in codecs] == [BytesCodec, BloscCodec]


def chunk_writer(
    arr: Any, durable: bool = False
) -> Callable[[tuple[int, ...], np.ndarray], None] | None:
    """A function writing one whole chunk of ``arr`` (its grid coordinates, its values in the
    chunk's shape, C-contiguous) as zarr would, for the layouts of the module's docstring with
    ``zstd`` (through libzstd) or ``blosc`` (through zarr's own configured encoder); None for
    any other layout.

    ``durable``: each file is fsynced before its rename, in the writing thread, while the other
    threads encode (the job's record fsyncs every file again, and finds them clean).
    """
    codecs: tuple[Any, ...] = tuple(getattr(arr.metadata, "codecs", ()))
    if not _plain_layout(arr) or len(codecs) != 2 or not isinstance(codecs[0], BytesCodec):
        return None
    serializer, compressor = codecs
    if serializer.endian is not None and serializer.endian.value != "little":
        return None
    encode = _encoder(compressor, threading.local())
    if encode is None:
        return None
    folder = Path(arr.store_path.store.root) / arr.store_path.path
    key = arr.metadata.encode_chunk_key

    def write(coords: tuple[int, ...], chunk: np.ndarray) -> None:
        _put(folder / key(coords), encode(chunk.reshape(-1).view(np.uint8)), durable)

    return write


def _encoder(codec: Any, local: threading.local) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function giving the bytes ``codec`` writes for a chunk's bytes (None: not ours).

    zstd frames go into a buffer of the calling thread's (in ``local``), reused chunk after
    chunk: a new one per chunk was a fresh mapping, faulted in page by page (1.3 µs a page
    here, a quarter of the last stage's kernel time on the month benchmark). The writer's
    threads end with its write, and their buffers with them: at most one frame per thread at
    once, as before.
    """
    if isinstance(codec, ZstdCodec) and LIBZSTD is not None:
        level, checksum = int(codec.level), bool(codec.checksum)

        def zstd(data: np.ndarray) -> np.ndarray:
            dst = getattr(local, "frame", None)
            if dst is None or dst.size < frame_bound(data.nbytes):
                dst = local.frame = np.empty(frame_bound(data.nbytes), dtype=np.uint8)
            frame = encode_frame(data, level, checksum, dst)
            assert frame is not None  # LIBZSTD is loaded
            return frame

        return zstd
    if isinstance(codec, BloscCodec) and codec.typesize is not None:
        # zarr's own numcodecs encoder of this codec (cname, level, shuffle, blocksize and
        # typesize as the array's metadata gives them): the same bytes, without the GIL.
        blosc = codec._blosc_codec

        def compress(data: np.ndarray) -> np.ndarray:
            return np.frombuffer(blosc.encode(data), dtype=np.uint8)

        return compress
    return None


def _put(path: Path, data: np.ndarray, durable: bool = False) -> None:
    """Write ``data`` at ``path`` as zarr's local store does: a temporary file, then a rename
    (the file fsynced first when ``durable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with partial.open("wb") as f:
            f.write(data.data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def read_region(arr: Any, box: tuple[slice, ...]) -> Iterator[np.ndarray]:
    """The values of ``arr[box]`` (``box``: one ``slice`` per dimension, step 1), for the
    ``with`` block.

    Decoded from the chunk files directly into a lent region buffer where :func:`direct_layout`
    holds, else read through zarr.
    """
    if not direct_layout(arr):
        yield np.asarray(arr[box])
        return
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, arr.shape, strict=True))
    with region_buffer(tuple(s.stop - s.start for s in box), np.dtype(arr.dtype)) as out:
        _decode_region(arr, box, out)
        yield out


def _decode_region(arr: Any, box: tuple[slice, ...], out: np.ndarray) -> None:
    chunks = tuple(int(c) for c in arr.chunks)
    folder = Path(arr.store_path.store.root) / arr.store_path.path
    grid = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, chunks, strict=True)]
    fill = arr.metadata.fill_value
    local = threading.local()

    def one(coords: tuple[int, ...]) -> None:
        path = folder / arr.metadata.encode_chunk_key(coords)
        _decode_into(path, coords, chunks, box, out, fill, local)

    with ThreadPoolExecutor(reader_threads(), thread_name_prefix="zp-inter") as pool:
        for done in [pool.submit(one, c) for c in itertools.product(*grid)]:
            done.result()


def _decode_into(
    path: Path,
    coords: tuple[int, ...],
    chunks: tuple[int, ...],
    box: tuple[slice, ...],
    out: np.ndarray,
    fill: Any,
    local: threading.local,
) -> None:
    """Decode one chunk file into its part of ``out`` (the region ``box`` of the array).

    The file is read into a buffer of the calling thread's (in ``local``), and a chunk reaching
    outside ``box`` is decoded into another, both reused file after file: fresh ones per file
    were faulted in page by page (see :func:`_encoder`). The reading threads end with the read,
    and their buffers with them: at most one file and one chunk per thread, as before.
    """
    starts = [c * n for c, n in zip(coords, chunks, strict=True)]
    lo = [max(a, s.start) for a, s in zip(starts, box, strict=True)]
    hi = [min(a + n, s.stop) for a, n, s in zip(starts, chunks, box, strict=True)]
    origin = [s.start for s in box]
    target = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))]
    data = _read_file(path, local)
    if data is None:  # a chunk never written holds the fill value
        target[...] = fill
        return
    if not data.nbytes:
        raise ChunkReleased(
            f"{path}: this intermediate chunk was released after the job that read it was "
            "recorded; a job of an earlier run may still be running. Nothing of this job was "
            "written: run the request again to resume."
        )
    whole = all(b - a == n for a, b, n in zip(lo, hi, chunks, strict=True))
    if whole and target.flags.c_contiguous:
        numcodecs.blosc.decompress(data, target)
        return
    chunk = getattr(local, "chunk", None)
    if chunk is None or chunk.shape != chunks or chunk.dtype != out.dtype:
        chunk = local.chunk = np.empty(chunks, dtype=out.dtype)
    numcodecs.blosc.decompress(data, chunk)
    target[...] = chunk[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, starts, strict=True))]


def _read_file(path: Path, local: threading.local) -> memoryview | None:
    """The bytes of the file at ``path``, in the calling thread's buffer (None: no such file)."""
    try:
        f = path.open("rb", buffering=0)
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        buf = getattr(local, "file", None)
        if buf is None or buf.size < size:
            buf = local.file = np.empty(size, dtype=np.uint8)
        view = buf.data[:size]
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]


class ChunkReleased(RunFailed):
    """A chunk file emptied by :func:`release_chunks` was read again."""


def release_chunks(arr: Any, box: tuple[slice, ...]) -> int:
    """Empty the chunk files of ``arr`` that lie wholly inside ``box`` (clipped to the array);
    the number emptied. Only for :func:`direct_layout` arrays (else none).

    For an intermediate region read by one job only, once that job is recorded (see the
    module). Chunks reaching outside ``box`` may be another job's and are kept.
    """
    if not direct_layout(arr):
        return 0
    chunks = tuple(int(c) for c in arr.chunks)
    folder = Path(arr.store_path.store.root) / arr.store_path.path
    inside = []
    for s, c, n in zip(box, chunks, arr.shape, strict=True):
        start, stop = s.indices(n)[:2]
        # Chunk i is inside when start <= i*c and min((i+1)*c, n) <= stop.
        inside.append(range(-(-start // c), -(-n // c) if stop >= n else stop // c))
    emptied = 0
    for coords in itertools.product(*inside):
        path = folder / arr.metadata.encode_chunk_key(coords)
        try:
            os.truncate(path, 0)
            emptied += 1
        except FileNotFoundError:
            continue
    return emptied
