"""Region-sized buffers, kept from one job to the next job of the same plan (docs/design.md §8).

Job processes hand freed memory back to the system (a fixed mmap threshold and ``malloc_trim``,
docs/design.md §5), so every region-sized array a job makes is fresh pages the kernel zeroes
and faults in: on the month map → time-series benchmark, zeroing alone took about 10 % of the
first stage's samples. The fast read path and a later stage's copies take their region buffers
from here (:func:`take`) and give them back (:func:`give`); the process keeps at most
:data:`KEPT` of them and lends them to the next job of the same plan, whose regions are alike.
A job of another plan (another stage, another run), one whose estimate is smaller than what the
pool keeps, or one that reads through xarray, empties the pool first (:func:`claim`,
:func:`clear`): kept buffers stand in for the buffers a job would have made, and count as its
memory (its ``peak_memory`` is its rise above its start plus what it was lent at its start).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

#: Buffers kept at most: the fast path holds two slabs at once (one written, one read).
KEPT = 2
#: Bytes of a memory page: :func:`reserve` writes one byte per page to map them all.
_PAGE = 4096

_kept: list[np.ndarray] = []
_owner: list[str] = []
_lock = threading.Lock()


def claim(owner: str, budget: int | None = None) -> int:
    """Keep the pool for a job of ``owner`` (a plan's fingerprint) whose memory estimate is
    ``budget``; empty it for a new owner, or when it keeps more than the budget (a plan's
    smaller last job). Returns the bytes kept for the job: they count as its memory."""
    with _lock:
        kept = sum(b.nbytes for b in _kept)
        if _owner != [owner] or (budget is not None and kept > budget):
            _kept.clear()
            _owner[:] = [owner]
            return 0
        return kept


def clear() -> None:
    """Let go of every kept buffer."""
    with _lock:
        _kept.clear()


def take(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An uninitialised C-ordered array of ``shape``: a view of the smallest kept buffer that is
    large enough (no longer kept), else a new one; :func:`give` its ``base`` back when done.

    When no kept buffer is large enough, the kept ones are let go before the new one is made.
    """
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with _lock:
        fits = sorted((b for b in _kept if b.nbytes >= n), key=lambda b: b.nbytes)
        if fits:
            buffer = fits[0]
            _kept.remove(buffer)
        else:
            _kept.clear()
            buffer = None
    if buffer is None:
        buffer = np.empty(max(n, 1), dtype=np.uint8)
    return buffer[:n].view(dtype).reshape(shape)


def base_of(array: np.ndarray) -> np.ndarray:
    """The buffer an array from :func:`take` is a view of."""
    return array if array.base is None else array.base  # numpy keeps the owner as ``base``


def give(array: np.ndarray) -> None:
    """Give back an array from :func:`take`: its buffer is kept (at most :data:`KEPT`, the
    largest) for the next :func:`take`."""
    buffer = base_of(array)
    if not isinstance(buffer, np.ndarray):
        return
    with _lock:
        if any(b is buffer for b in _kept):
            return
        _kept.append(buffer)
        _kept.sort(key=lambda b: b.nbytes, reverse=True)
        del _kept[KEPT:]


def reserve(owner: str, nbytes: int, count: int = KEPT) -> int:
    """Keep ``count`` buffers of ``nbytes`` for the jobs of ``owner`` (a plan's fingerprint),
    their pages touched now: a job process does this before its first job
    (:mod:`zarr_parallel.run.warm`), which then finds them as a later job would. Buffers the
    pool keeps for ``owner`` already, as large, are kept as they are. Returns the bytes kept."""
    with _lock:
        if _owner == [owner] and len(_kept) >= count and all(b.nbytes >= nbytes for b in _kept):
            return sum(b.nbytes for b in _kept)
        _kept.clear()
        _owner[:] = [owner]
    made = [np.empty(max(nbytes, 1), dtype=np.uint8) for _ in range(count)]
    for buffer in made:
        # One write a page: the kernel zeroes and maps each page now, not in the first job.
        buffer[::_PAGE] = 0
    with _lock:
        if _owner == [owner]:
            _kept[:] = sorted(made, key=lambda b: b.nbytes, reverse=True)[:KEPT]
        return sum(b.nbytes for b in _kept)


def kept_bytes() -> int:
    """Bytes the pool keeps now."""
    with _lock:
        return sum(b.nbytes for b in _kept)
