"""Raw HDF5 chunks read by byte offset and inflated without the HDF5 library.

Per file and variable, the chunk index (byte offset, size and filter mask of every stored chunk)
is read once through h5py and cached per process (:func:`h5_storage`). Each chunk is then read
with ``os.pread`` (no HDF5 call, no lock), inflated with libdeflate (``deflate``) and un-shuffled
with numpy, in a thread pool (:func:`read_chunks`); :mod:`zarr_parallel.sources.fastread` decides
which chunks a job needs and where their elements go.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_deflate: Any
try:  # libdeflate inflates 3-4x faster than zlib (docs/design.md §8); zlib is the fallback.
    import deflate as _deflate
except ImportError:  # pragma: no cover - deflate is a dependency
    _deflate = None

#: HDF5 filter ids this reader undoes.
H5Z_DEFLATE = 1
H5Z_SHUFFLE = 2
SUPPORTED_FILTERS = frozenset({H5Z_DEFLATE, H5Z_SHUFFLE})


@dataclass(frozen=True)
class H5Storage:
    """Where one variable's bytes lie in one HDF5 file.

    ``chunks`` is None for contiguous storage (one block at ``contiguous``). ``index`` maps a
    chunk's element offset to ``(byte offset, size, filter mask)``; chunks never written are
    absent and read as ``fillvalue``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunks: tuple[int, ...] | None
    filters: tuple[tuple[int, int], ...]
    fillvalue: Any
    index: Mapping[tuple[int, ...], tuple[int, int, int]]
    contiguous: tuple[int, int] | None


class Unsupported(Exception):
    """The fast path cannot read this variable exactly; use the xarray path."""


def h5_storage(path: str, name: str, group: str | None = None) -> H5Storage:
    """The storage description of ``name`` in ``path`` (cached while the file is unchanged)."""
    st = os.stat(path)
    return _h5_storage(os.path.abspath(path), name, group, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _h5_storage(path: str, name: str, group: str | None, size: int, mtime: int) -> H5Storage:
    import h5py

    with h5py.File(path, "r") as f:
        node = f[group][name] if group else f[name]
        if not isinstance(node, h5py.Dataset):
            raise Unsupported(f"{name} in {path} is not an HDF5 dataset")
        dtype = np.dtype(node.dtype)
        if dtype.kind not in "iuf" or not dtype.isnative:
            raise Unsupported(f"{name}: dtype {dtype} is not a native-order number")
        dsid = node.id
        dcpl = dsid.get_create_plist()
        layout = dcpl.get_layout()
        shape = tuple(int(s) for s in node.shape)
        if any(s == 0 for s in shape):
            raise Unsupported(f"{name}: empty dimension")
        filters = []
        for i in range(dcpl.get_nfilters()):
            code, _flags, values, _fname = dcpl.get_filter(i)
            if code not in SUPPORTED_FILTERS:
                raise Unsupported(f"{name}: HDF5 filter {code} is not supported")
            filters.append((int(code), int(values[0]) if values else 0))
        fill = node.fillvalue
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dsid.get_offset()
            nbytes = dsid.get_storage_size()
            contiguous = None if offset is None else (int(offset), int(nbytes))
            return H5Storage(path, shape, dtype, None, (), fill, {}, contiguous)
        if layout != h5py.h5d.CHUNKED:
            raise Unsupported(f"{name}: HDF5 layout {layout} is not chunked or contiguous")
        index: dict[tuple[int, ...], tuple[int, int, int]] = {}

        def visit(info: Any) -> None:
            index[tuple(int(o) for o in info.chunk_offset)] = (
                int(info.byte_offset),
                int(info.size),
                int(info.filter_mask),
            )

        dsid.chunk_iter(visit)
        chunks = tuple(int(c) for c in node.chunks)
        return H5Storage(path, shape, dtype, chunks, tuple(filters), fill, index, None)


def _decode_chunk(raw: bytes, storage: H5Storage, mask: int, shape: tuple[int, ...]) -> np.ndarray:
    """Undo the filter pipeline of one stored chunk (in reverse order, skipping masked ones)."""
    nbytes = math.prod(shape) * storage.dtype.itemsize
    data: bytes | bytearray | memoryview = raw
    for pos in reversed(range(len(storage.filters))):
        if mask & (1 << pos):
            continue
        code, _ = storage.filters[pos]
        if code == H5Z_DEFLATE:
            if _deflate is not None:
                data = _deflate.zlib_decompress(bytes(data), nbytes)
            else:  # pragma: no cover
                data = zlib.decompress(data)
        elif code == H5Z_SHUFFLE:
            data = unshuffle(data, storage.dtype.itemsize)
    arr = np.frombuffer(data, dtype=storage.dtype)
    if arr.size != math.prod(shape):
        raise Unsupported(f"chunk of {storage.path} decodes to {arr.size} elements, not {shape}")
    return arr.reshape(shape)


class _Libdeflate:
    """libdeflate's zlib decoder called through ctypes, from the ``deflate`` package's library.

    Unlike ``deflate.zlib_decompress`` it inflates into a buffer the caller owns and releases
    the GIL while it runs (ctypes does), so reader threads inflate on every core and no fresh
    pages are faulted in per chunk. None of this is available: :func:`_decode_chunk` is used.
    """

    def __init__(self, path: str) -> None:
        import ctypes

        lib = ctypes.CDLL(path)
        self._alloc = lib.libdeflate_alloc_decompressor
        self._alloc.restype = ctypes.c_void_p
        self._alloc.argtypes = []
        self._free = lib.libdeflate_free_decompressor
        self._free.restype = None
        self._free.argtypes = [ctypes.c_void_p]
        self._inflate = lib.libdeflate_zlib_decompress
        self._inflate.restype = ctypes.c_int
        self._inflate.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_size_t),
        ]
        self._size_t = ctypes.c_size_t

    def new(self) -> int:
        """A decompressor (not thread-safe: one per thread at a time)."""
        handle = self._alloc()
        if not handle:
            raise MemoryError("libdeflate could not allocate a decompressor")
        return int(handle)

    def free(self, handle: int) -> None:
        self._free(handle)

    def inflate(self, handle: int, src: np.ndarray, dst: np.ndarray) -> int:
        """Inflate the zlib stream ``src`` into ``dst`` (both uint8, contiguous); bytes out."""
        out = self._size_t(0)
        code = self._inflate(handle, src.ctypes.data, src.size, dst.ctypes.data, dst.size, out)
        if code != 0:  # 1 bad data, 2 short output, 3 insufficient space
            raise Unsupported(f"libdeflate could not inflate a chunk (result {code})")
        return int(out.value)


def _load_libdeflate() -> _Libdeflate | None:
    if _deflate is None or os.environ.get("ZARR_PARALLEL_LIBDEFLATE", "1") == "0":
        return None
    try:
        from deflate import _deflate as ext

        lib = _Libdeflate(str(ext.__file__))
        lib.free(lib.new())  # the symbols resolve and work
        return lib
    except (ImportError, OSError, AttributeError, MemoryError) as e:  # pragma: no cover
        logger.debug("libdeflate through ctypes unavailable (%s); using deflate's API", e)
        return None


LIBDEFLATE = _load_libdeflate()


class _Scratch:
    """One reader thread's reusable buffers (raw bytes, inflated bytes, un-shuffled bytes) and
    its libdeflate decompressor: the chunks a thread holds, as the memory model counts them
    (FAST_READ_COPIES), without allocating (and faulting in) fresh pages per chunk."""

    def __init__(self, lib: _Libdeflate) -> None:
        self.lib = lib
        self.handle = lib.new()
        self.buffers: dict[str, np.ndarray] = {}

    def buffer(self, kind: str, nbytes: int) -> np.ndarray:
        buf = self.buffers.get(kind)
        if buf is None or buf.size < nbytes:
            buf = self.buffers[kind] = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes]

    def close(self) -> None:
        self.lib.free(self.handle)
        self.buffers.clear()


def unshuffle(data: bytes | bytearray | memoryview, size: int) -> memoryview:
    """Undo HDF5's byte shuffle: byte ``k`` of every element was stored in plane ``k``."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if size <= 1:
        return arr.data
    out = np.empty(arr.size, dtype=np.uint8)
    unshuffle_into(arr, out, size)
    return out.data


@dataclass
class ReadStats:
    """What a fast read did: bytes read from the files, chunks read, threads used."""

    bytes_read: int = 0
    chunks: int = 0
    threads: int = 1


#: One chunk to read: (storage, chunk origin in source order, fixed-axis positions in the chunk,
#: permutation of the kept chunk axes into target order, target positions, chunk positions in
#: target order).
ChunkTask = tuple[
    H5Storage, tuple[int, ...], dict[int, int], tuple[int, ...], tuple[Any, ...], tuple[Any, ...]
]


def read_chunks(
    tasks: Sequence[ChunkTask],
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    stats: ReadStats,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Read every chunk task into ``out`` (C-ordered, of ``shape`` and ``dtype``) or a new
    buffer, in ``stats.threads`` threads."""
    buffer = np.empty(shape, dtype=dtype) if out is None else out
    lock = threading.Lock()
    # Reusable per-thread buffers and decompressors, at most one set per thread at a time.
    idle: list[_Scratch] = []
    made: list[_Scratch] = []

    def run(task: ChunkTask) -> None:
        scratch = None
        if LIBDEFLATE is not None:
            with lock:
                if idle:
                    scratch = idle.pop()
                else:
                    scratch = _Scratch(LIBDEFLATE)
                    made.append(scratch)
        try:
            nread = read_chunk_into(task, buffer, scratch)
        finally:
            if scratch is not None:
                with lock:
                    idle.append(scratch)
        with lock:
            stats.bytes_read += nread
            stats.chunks += 1

    try:
        if stats.threads > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(stats.threads, thread_name_prefix="zp-read") as pool:
                list(pool.map(run, tasks))
        else:
            for task in tasks:
                run(task)
    finally:
        for scratch in made:
            scratch.close()
    return buffer


def read_chunk_into(task: ChunkTask, box: np.ndarray, scratch: _Scratch | None = None) -> int:
    """Read one stored chunk and copy its needed elements into ``box``; returns bytes read.

    With ``scratch`` (libdeflate through ctypes), the chunk is read and decoded in the thread's
    reusable buffers, and a chunk that fills a contiguous block of ``box`` is decoded straight
    into it (no copy).
    """
    storage, origin, fixed_local, perm, dest, local = task
    if storage.chunks is None:
        shape = storage.shape
        where = storage.contiguous
        entry = None if where is None else (where[0], where[1], 0)
    else:
        shape = storage.chunks
        entry = storage.index.get(origin)
    target = box[dest] if not any(isinstance(d, np.ndarray) for d in dest) else None
    if entry is None:
        _assign(box, dest, storage.fillvalue)
        return 0
    offset, size, mask = entry
    if scratch is not None:
        chunk = _decode_into(
            storage, shape, offset, size, mask, scratch, target, fixed_local, perm, local
        )
        if chunk is None:  # decoded in place
            return size
    else:
        fd = os.open(storage.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(raw) != size:
            raise Unsupported(f"short read from {storage.path} at {offset}")
        chunk = _decode_chunk(raw, storage, mask, shape)
    # Drop the fixed axes, then view the chunk in target dimension order.
    view = chunk[tuple(fixed_local.get(a, slice(None)) for a in range(chunk.ndim))]
    view = view.transpose(perm)
    if target is not None and not any(isinstance(sel, np.ndarray) for sel in local):
        target[...] = view[local]
    else:
        _assign(box, dest, view[_ix(local)])
    return size


def _decode_into(
    storage: H5Storage,
    shape: tuple[int, ...],
    offset: int,
    size: int,
    mask: int,
    scratch: _Scratch,
    target: np.ndarray | None,
    fixed_local: Mapping[int, int],
    perm: tuple[int, ...],
    local: tuple[Any, ...],
) -> np.ndarray | None:
    """Read and decode one chunk in ``scratch``'s buffers; None when it was decoded straight
    into ``target`` (the whole chunk, in source order, filling a contiguous block)."""
    nbytes = math.prod(shape) * storage.dtype.itemsize
    steps = [
        storage.filters[pos][0]
        for pos in reversed(range(len(storage.filters)))
        if not mask & (1 << pos)
    ]
    direct = bool(steps) and _fills_block(target, storage, shape, fixed_local, perm, local)
    raw = scratch.buffer("raw", size)
    fd = os.open(storage.path, os.O_RDONLY)
    try:
        got = os.preadv(fd, [raw.data], offset)
    finally:
        os.close(fd)
    if got != size:
        raise Unsupported(f"short read from {storage.path} at {offset}")
    data = raw
    for i, code in enumerate(steps):
        if direct and i == len(steps) - 1:
            assert target is not None
            out = target.reshape(-1).view(np.uint8)
        else:
            out = scratch.buffer("inflated" if code == H5Z_DEFLATE else "unshuffled", nbytes)
        _undo_filter(code, data, out, scratch, storage, shape)
        data = out
    if direct:
        return None
    if data.size != nbytes:
        raise Unsupported(f"a chunk of {storage.path} holds {data.size} bytes, not {shape}")
    return data.view(storage.dtype).reshape(shape)


def _fills_block(
    target: np.ndarray | None,
    storage: H5Storage,
    shape: tuple[int, ...],
    fixed_local: Mapping[int, int],
    perm: tuple[int, ...],
    local: tuple[Any, ...],
) -> bool:
    """True when the whole chunk, in source order, fills ``target``, a contiguous block."""
    return (
        target is not None
        and target.dtype == storage.dtype
        and target.shape == tuple(shape)
        and target.flags.c_contiguous
        and not fixed_local
        and perm == tuple(range(len(perm)))
        and all(
            isinstance(sel, slice) and sel == slice(0, n)
            for sel, n in zip(local, shape, strict=True)
        )
    )


def _undo_filter(
    code: int,
    data: np.ndarray,
    out: np.ndarray,
    scratch: _Scratch,
    storage: H5Storage,
    shape: tuple[int, ...],
) -> None:
    """Undo one HDF5 filter of a chunk's bytes ``data`` into ``out`` (uint8 buffers)."""
    nbytes = out.size
    if code == H5Z_DEFLATE:
        if scratch.lib.inflate(scratch.handle, data, out) != nbytes:
            raise Unsupported(f"a chunk of {storage.path} does not inflate to {shape}")
    else:  # H5Z_SHUFFLE
        if data.size != nbytes:
            raise Unsupported(f"a chunk of {storage.path} holds {data.size} bytes, not {shape}")
        unshuffle_into(data, out, storage.dtype.itemsize)


#: Unsigned integers whose bytes one shuffled element fills (shift-and-or un-shuffling).
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def unshuffle_into(src: np.ndarray, dst: np.ndarray, size: int) -> None:
    """Undo HDF5's byte shuffle of ``src`` into ``dst`` (uint8 arrays of the same length).

    Byte ``k`` of every element was stored in plane ``k``. For 2-, 4- and 8-byte elements on a
    little-endian host the element is rebuilt as an integer, ``plane[k] << 8k`` or-ed together
    in place: whole-word passes, ~1.6x faster than one strided byte copy per plane (measured
    0.16 vs 0.25 s per GB), which remains the way for other sizes.
    """
    if size <= 1:
        dst[...] = src
        return
    n = src.size // size
    planes = src[: n * size].reshape(size, n)
    word = _WORDS.get(size) if sys.byteorder == "little" else None
    if word is not None:
        words = dst[: n * size].view(word)
        np.copyto(words, planes[size - 1], casting="unsafe")
        for k in range(size - 2, -1, -1):
            words <<= 8
            np.bitwise_or(words, planes[k], out=words, casting="unsafe")
    else:
        columns = dst[: n * size].reshape(n, size)
        for k in range(size):
            columns[:, k] = planes[k]
    dst[n * size :] = src[n * size :]


def _ix(selectors: tuple[Any, ...]) -> Any:
    if not any(isinstance(s, np.ndarray) for s in selectors):
        return selectors
    return np.ix_(*[_to_array(s) for s in selectors])


def _to_array(sel: Any) -> np.ndarray:
    if isinstance(sel, slice):
        step = sel.step or 1
        stop = sel.stop if sel.stop is not None else -1
        return np.arange(sel.start, stop, step)
    return np.asarray(sel)


def _assign(box: np.ndarray, dest: tuple[Any, ...], value: Any) -> None:
    box[_ix(dest)] = value
