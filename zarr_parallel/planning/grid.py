"""The grids the planner aligns jobs to: :class:`AxisMap` (one target dimension over the source
chunk grid), the write grid and the units whole in both.

Terms (see docs/design.md §3.4): per dimension the *write grid* is the target chunk (or shard) grid;
the *source grid* is the source chunk grid mapped into target index space. A *unit* is the smallest
block whole in both grids. Pure arithmetic, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class AxisMap:
    """How one target dimension maps onto the source chunk grid of one source dimension.

    Parameters
    ----------
    dim
        Target dimension name.
    chunk_of
        For each target index, the index of the source chunk (along the source dimension) that
        holds it. Monotone for slices; any order is accepted (planned conservatively).
    chunk_len
        Length of each source chunk along the source dimension.
    """

    dim: str
    chunk_of: IntArray
    chunk_len: IntArray
    _runs: tuple[IntArray, IntArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        chunk_of = np.asarray(self.chunk_of, dtype=np.int64)
        chunk_len = np.asarray(self.chunk_len, dtype=np.int64)
        object.__setattr__(self, "chunk_of", chunk_of)
        object.__setattr__(self, "chunk_len", chunk_len)
        if chunk_of.ndim != 1 or chunk_len.ndim != 1:
            raise ValueError("chunk_of and chunk_len must be one-dimensional")
        if chunk_of.size and (chunk_of.min() < 0 or chunk_of.max() >= chunk_len.size):
            raise ValueError(f"chunk_of of {self.dim!r} refers to chunks outside chunk_len")
        # Runs of equal chunk index: their starts are the source boundaries in target space.
        if chunk_of.size:
            change = np.flatnonzero(np.diff(chunk_of)) + 1
            starts = np.concatenate([[0], change, [chunk_of.size]]).astype(np.int64)
            touch = chunk_len[chunk_of[starts[:-1]]]
            prefix = np.concatenate([[0], np.cumsum(touch)]).astype(np.int64)
        else:
            starts = np.zeros(1, dtype=np.int64)
            prefix = np.zeros(1, dtype=np.int64)
        object.__setattr__(self, "_runs", (starts, prefix))

    @classmethod
    def uniform(
        cls,
        dim: str,
        size: int,
        source_chunk: int,
        start: int = 0,
        source_size: int | None = None,
    ) -> AxisMap:
        """Map a step-1 selection ``[start, start + size)`` of a regularly chunked source axis.

        ``source_size`` is the source axis length (default: the selection's end); the last
        source chunk is cut short there.

        >>> AxisMap.uniform("latitude", 721, 100).chunk_len[-2:].tolist()
        [100, 21]
        """
        source_size = start + size if source_size is None else source_size
        idx = np.arange(start, start + size, dtype=np.int64)
        n_chunks = max(1, math.ceil(source_size / source_chunk))
        lens = np.full(n_chunks, source_chunk, dtype=np.int64)
        lens[-1] = max(1, source_size - source_chunk * (n_chunks - 1))
        return cls(dim, idx // source_chunk, lens)

    @property
    def size(self) -> int:
        """Target length."""
        return int(self.chunk_of.size)

    @property
    def source_boundaries(self) -> IntArray:
        """Target indices where the source chunk changes, with 0 and ``size``."""
        return self._runs[0]

    @property
    def needed(self) -> int:
        """Source elements needed along this axis: the target length (tiled axes differ)."""
        return self.size

    def split_levels(self, chunk: int) -> list[IntArray]:
        """Boundaries to cut units at when they exceed the budget, coarsest first.

        The write grid here; a tiled axis first cuts at tile rows (see
        ``zarr_parallel.planning.tiles``).
        """
        return [write_grid(self.size, chunk)]

    def touched(self, starts: IntArray, stops: IntArray) -> IntArray:
        """Source elements decompressed along this axis to read each segment ``[start, stop)``.

        A chunk that appears in two separate runs of one segment is counted twice: an upper
        bound, which is what memory estimates need.
        """
        run_starts, prefix = self._runs
        first = np.searchsorted(run_starts, starts, side="right") - 1
        last = np.searchsorted(run_starts, stops - 1, side="right") - 1
        return np.asarray(prefix[last + 1] - prefix[first], dtype=np.int64)

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256(self.dim.encode())
        h.update(self.chunk_of.tobytes())
        h.update(self.chunk_len.tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """Stable digest of the mapping (for grouping and fingerprints)."""
        return self._digest


def write_grid(size: int, chunk: int) -> IntArray:
    """Boundaries of the write grid ``0, chunk, 2*chunk, ..., size``.

    >>> write_grid(10, 4).tolist()
    [0, 4, 8, 10]
    """
    grid = np.arange(0, size + chunk, chunk, dtype=np.int64)
    grid[-1] = size  # the last chunk may be partial (or the array empty)
    return grid if size else grid[:1]


def unit_boundaries(axis: AxisMap, chunk: int) -> IntArray:
    """Boundaries whole in both the write grid and the source grid (the units along an axis).

    >>> unit_boundaries(AxisMap.uniform("t", 10, 3), 2).tolist()
    [0, 6, 10]
    """
    bounds = axis.source_boundaries  # sorted, with 0 and the size: keep those on the write grid
    keep = (bounds % chunk == 0) | (bounds == axis.size)
    return np.asarray(bounds[keep], dtype=np.int64)
