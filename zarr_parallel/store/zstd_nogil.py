"""zarr's ``zstd`` codec encoding through libzstd without holding the GIL (docs/design.md §8).

zarr encodes a write's chunks in threads (``asyncio.to_thread``), but numcodecs' ``Zstd`` holds
the GIL while it compresses: with the default ``zstd`` codec every chunk of a write is encoded
one at a time, whatever the threads. On the month map → time-series benchmark the last stage of
a staged plan (zstd level 3, about 1 CPU s per 110 MB) kept one of the two cores busy. A call
through ctypes releases the GIL, so :class:`NoGilZstdCodec` compresses with the system's libzstd
that way, with the same parameters (level, checksum flag): the output is an ordinary zstd frame
with its content size, which numcodecs and every other zstd reader decode; the array's metadata
is unchanged (``{"name": "zstd", ...}``). Decoding stays numcodecs'.

:func:`use_nogil_zstd` selects it as zarr's implementation of ``zstd`` for this process (zarr's
``codecs.zstd`` setting); without libzstd nothing changes. ``ZARR_PARALLEL_NOGIL_ZSTD=0`` turns it
off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zarr
from zarr.codecs.zstd import ZstdCodec
from zarr.registry import register_codec

logger = logging.getLogger(__name__)

#: Environment switch: "0" keeps numcodecs' encoder.
NOGIL_ZSTD_ENV = "ZARR_PARALLEL_NOGIL_ZSTD"
#: ZSTD_cParameter values (zstd.h, stable API).
_C_COMPRESSION_LEVEL = 100
_C_CHECKSUM_FLAG = 201


class _Libzstd:
    """The few libzstd functions the encoder needs, through ctypes (which releases the GIL)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        size_t, void_p = ctypes.c_size_t, ctypes.c_void_p
        self._create = lib.ZSTD_createCCtx
        self._create.restype, self._create.argtypes = void_p, []
        self.free = lib.ZSTD_freeCCtx
        self.free.restype, self.free.argtypes = size_t, [void_p]
        self._set = lib.ZSTD_CCtx_setParameter
        self._set.restype, self._set.argtypes = size_t, [void_p, ctypes.c_int, ctypes.c_int]
        self._reset = lib.ZSTD_CCtx_reset
        self._reset.restype, self._reset.argtypes = size_t, [void_p, ctypes.c_int]
        self._bound = lib.ZSTD_compressBound
        self._bound.restype, self._bound.argtypes = size_t, [size_t]
        self._compress = lib.ZSTD_compress2
        self._compress.restype = size_t
        self._compress.argtypes = [void_p, void_p, size_t, void_p, size_t]
        self._is_error = lib.ZSTD_isError
        self._is_error.restype, self._is_error.argtypes = ctypes.c_uint, [size_t]
        self._error_name = lib.ZSTD_getErrorName
        self._error_name.restype, self._error_name.argtypes = ctypes.c_char_p, [size_t]

    def context(self) -> int:
        """A compression context (one thread at a time)."""
        handle = self._create()
        if not handle:
            raise MemoryError("libzstd could not allocate a compression context")
        return int(handle)

    def _check(self, code: int) -> int:
        if self._is_error(code):
            raise RuntimeError(f"libzstd: {self._error_name(code).decode()}")
        return int(code)

    def compress(
        self, ctx: int, src: np.ndarray, level: int, checksum: bool, dst: np.ndarray | None = None
    ) -> np.ndarray:
        """``src`` (contiguous bytes) as one zstd frame, in ``dst`` or a buffer of its own.

        The result is a view of ``dst`` (when at least :meth:`bound` bytes) or of a new
        ``compressBound``-sized buffer: only the pages the frame fills become resident, as with
        numcodecs' encoder.
        """
        self._check(self._reset(ctx, 1))  # ZSTD_reset_session_only
        self._check(self._set(ctx, _C_COMPRESSION_LEVEL, level))
        self._check(self._set(ctx, _C_CHECKSUM_FLAG, int(checksum)))
        if dst is None or dst.size < self.bound(src.nbytes):
            dst = np.empty(self.bound(src.nbytes), dtype=np.uint8)
        n = self._check(self._compress(ctx, dst.ctypes.data, dst.size, src.ctypes.data, src.nbytes))
        return dst[:n]

    def bound(self, nbytes: int) -> int:
        """The largest frame of ``nbytes`` bytes (``ZSTD_compressBound``)."""
        return int(self._bound(nbytes))


def _load_libzstd() -> _Libzstd | None:
    if os.environ.get(NOGIL_ZSTD_ENV, "1") == "0":
        return None
    path = ctypes.util.find_library("zstd")
    if path is None:
        return None
    try:
        lib = _Libzstd(path)
        lib.free(lib.context())  # the symbols resolve and work
        return lib
    except (OSError, AttributeError, MemoryError) as e:  # pragma: no cover - a broken library
        logger.debug("libzstd through ctypes unavailable (%s); zarr encodes with numcodecs", e)
        return None


LIBZSTD = _load_libzstd()


class _Context:
    """A thread's compression context, freed with the thread (its ``threading.local``)."""

    def __init__(self, lib: _Libzstd) -> None:
        self.lib = lib
        self.handle = lib.context()

    def __del__(self) -> None:
        self.lib.free(self.handle)


#: Compression contexts, shared by every array (the level and checksum flag are set on each
#: call) and by every thread that encodes: at most zarr's ``threading.max_workers`` at once (the
#: process's cores in a job process). A level-3 context holds a few MB of tables and window: one
#: per writing thread (``FAST_WRITE_INFLIGHT``) would add to what the memory model counts, which
#: is what zarr's own encoding threads held (docs/design.md §5).
_idle: list[_Context] = []
_idle_lock = threading.Lock()
_slots: list[threading.BoundedSemaphore] = []


def _context_slots() -> threading.BoundedSemaphore:
    with _idle_lock:
        if not _slots:
            workers = zarr.config.get("threading.max_workers") or os.cpu_count() or 1
            _slots.append(threading.BoundedSemaphore(max(1, int(workers))))
        return _slots[0]


@dataclass
class _NoGilZstd:
    """numcodecs' ``Zstd`` interface (``encode``/``decode``), encoding through :data:`LIBZSTD`."""

    level: int
    checksum: bool
    fallback: Any

    def encode(self, buf: Any, dst: np.ndarray | None = None) -> np.ndarray:
        assert LIBZSTD is not None
        src = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        with _context_slots():
            with _idle_lock:
                ctx = _idle.pop() if _idle else None
            if ctx is None:
                ctx = _Context(LIBZSTD)
            try:
                return LIBZSTD.compress(ctx.handle, src, self.level, self.checksum, dst)
            finally:
                with _idle_lock:
                    _idle.append(ctx)

    def decode(self, buf: Any, out: Any = None) -> Any:
        return self.fallback.decode(buf, out)


@dataclass(frozen=True)
class NoGilZstdCodec(ZstdCodec):
    """zarr's ``zstd`` codec (same metadata, same frames) that compresses without the GIL."""

    @cached_property
    def _zstd_codec(self) -> Any:
        numcodecs_zstd = super()._zstd_codec
        if LIBZSTD is None:
            return numcodecs_zstd
        return _NoGilZstd(self.level, self.checksum, numcodecs_zstd)


_QUALNAME = f"{NoGilZstdCodec.__module__}.{NoGilZstdCodec.__qualname__}"


def encode_frame(
    values: np.ndarray, level: int, checksum: bool, dst: np.ndarray | None = None
) -> np.ndarray | None:
    """``values``' bytes (C order) as the zstd frame zarr's ``zstd`` codec with this level and
    checksum flag writes for them, compressed without the GIL; None without libzstd.

    ``dst``: a byte buffer the frame is written into when it has room for any frame of these
    values (:func:`frame_bound`), so a writer reuses one buffer chunk after chunk; the result
    is then a view of it.
    """
    if LIBZSTD is None:
        return None
    return _NoGilZstd(level, checksum, None).encode(values, dst)


def frame_bound(nbytes: int) -> int:
    """The largest zstd frame of ``nbytes`` bytes (0 without libzstd)."""
    return LIBZSTD.bound(nbytes) if LIBZSTD is not None else 0


def use_nogil_zstd() -> bool:
    """Make :class:`NoGilZstdCodec` zarr's ``zstd`` codec in this process; False (and nothing
    changed) without libzstd or with ``ZARR_PARALLEL_NOGIL_ZSTD=0``."""
    if LIBZSTD is None:
        return False
    register_codec("zstd", NoGilZstdCodec, qualname=_QUALNAME)
    zarr.config.set({"codecs.zstd": _QUALNAME})
    return True
