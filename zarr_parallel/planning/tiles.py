"""Pure tile arithmetic: how a grid becomes tiles, and what a range of tiles reads.

A tiled cache cuts some dimensions of the target (say latitude and longitude) into tiles of a fixed
size and numbers the tiles along one *tile dimension*, in C order of the tile grid: ``order`` lists
the tiled dimensions from the slowest to the fastest varying. Within a tile the tiled dimensions
become *within-tile* dimensions of the tile's size, so each tile is exactly one Zarr chunk.

The planner sees the tile dimension as a :class:`TileAxisMap`: an
:class:`~zarr_parallel.planning.grid.AxisMap` whose source boundaries are the tile indices where no
source chunk is shared between the tiles before and after (so each source chunk is read by one job),
and whose read cost of a range of tiles is what the write path really decompresses for it. Nothing
here does I/O or imports xarray.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.grid import AxisMap, IntArray, write_grid

#: Most (chunk combination) pairs examined when finding clean tile boundaries.
_MAX_COMBOS = 20_000_000


@dataclass(frozen=True)
class DimTiles:
    """Tiles along one dimension of length ``length``: ``count`` windows of ``size``, ``stride``
    apart, the last one cut short by the end of the data (padded) when ``edge`` is pad."""

    name: str
    length: int
    size: int
    stride: int
    count: int

    @classmethod
    def plan(cls, name: str, length: int, size: int, overlap: int, edge: str) -> DimTiles:
        """Tiles along a dimension under an edge policy; a :class:`RequestError` if impossible.

        >>> DimTiles.plan("x", 10, 4, 0, "drop").count, DimTiles.plan("x", 10, 4, 0, "pad").count
        (2, 3)
        >>> DimTiles.plan("x", 10, 4, 1, "error").count  # starts 0, 3, 6
        3
        """
        stride = size - overlap
        if length < size:
            if edge == "pad":
                return cls(name, length, size, stride, 1)
            raise RequestError(
                f"tiles.size.{name}",
                size,
                f"is longer than {name} ({length} elements after the preprocessors)",
                f"Use a tile length of at most {length}, or set tiles.edge to 'pad'",
            )
        full = (length - size) // stride + 1
        rest = length - ((full - 1) * stride + size)
        if rest == 0 or edge == "drop":
            return cls(name, length, size, stride, full)
        if edge == "pad":
            return cls(name, length, size, stride, full + 1)
        exact = exact_sizes(length, overlap)
        below = [s for s in exact if s < size][-1:]
        above = [s for s in exact if s > size][:1]
        hint = ", ".join(str(s) for s in below + above)
        raise RequestError(
            f"tiles.size.{name}",
            size,
            f"does not tile {name} exactly: {full} tiles cover {length - rest} of its {length} "
            f"elements and {rest} are left over",
            f"Use a tile length that tiles it exactly ({hint}), or set tiles.edge to 'drop' (leave "
            f"out the last {rest}) or 'pad' (fill the last tile with tiles.fill_value)",
        )

    @property
    def starts(self) -> IntArray:
        """First element of every tile."""
        return np.arange(self.count, dtype=np.int64) * self.stride

    @property
    def covered(self) -> int:
        """Elements of the dimension inside some tile."""
        return min((self.count - 1) * self.stride + self.size, self.length)

    @property
    def padded(self) -> bool:
        """True when the last tile reaches past the data."""
        return (self.count - 1) * self.stride + self.size > self.length

    def window(self, lo: IntArray, hi: IntArray) -> tuple[IntArray, IntArray]:
        """Data range ``[a, b)`` covered by tiles ``lo`` up to (excluding) ``hi`` (``hi > lo``)."""
        lo = np.asarray(lo, dtype=np.int64)
        hi = np.asarray(hi, dtype=np.int64)
        return lo * self.stride, np.minimum((hi - 1) * self.stride + self.size, self.length)

    def to_json(self) -> dict[str, int | str]:
        """JSON description (attributes and fingerprints)."""
        return {
            "name": self.name,
            "length": self.length,
            "size": self.size,
            "stride": self.stride,
            "count": self.count,
        }


def exact_sizes(length: int, overlap: int) -> list[int]:
    """Tile lengths that cover ``length`` exactly with this overlap, ascending.

    >>> exact_sizes(12, 0)
    [1, 2, 3, 4, 6, 12]
    """
    return [s for s in range(overlap + 1, length + 1) if (length - s) % (s - overlap) == 0]


def range_boxes(
    starts: IntArray, stops: IntArray, shape: Sequence[int]
) -> tuple[IntArray, IntArray, IntArray]:
    """Cut ranges ``[start, stop)`` of C-order indices of a grid into boxes (hyper-rectangles).

    A range of tile indices is a partial first row, whole rows and a partial last row (and so on
    in more dimensions): at most ``2 * ndim - 1`` boxes, each a product of index ranges. The write
    path reads one data window per box; the planner costs the same boxes.

    Returns
    -------
    tuple
        ``(segment, lo, hi)``: for every box the position of its range in ``starts`` and its
        per-dimension bounds ``lo[i] <= index < hi[i]`` (arrays of shape ``(boxes, ndim)``).

    >>> seg, lo, hi = range_boxes(np.array([2]), np.array([9]), (3, 4))
    >>> [(a.tolist(), b.tolist()) for a, b in zip(lo, hi)]
    [([0, 2], [1, 4]), ([1, 0], [2, 4]), ([2, 0], [3, 1])]
    """
    m = len(shape)
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    keep = stops > starts
    seg = np.flatnonzero(keep).astype(np.int64)
    s, e = starts[keep], stops[keep]
    lo = np.zeros((seg.size, m), dtype=np.int64)
    hi = np.zeros((seg.size, m), dtype=np.int64)
    full = np.asarray(shape, dtype=np.int64)
    done: list[tuple[IntArray, IntArray, IntArray]] = []
    for k in range(m):
        inner = math.prod(shape[k + 1 :])
        r0, o0 = np.divmod(s, inner)
        r1, o1 = np.divmod(e, inner)
        if k == m - 1:
            lo[:, k], hi[:, k] = s, e
            done.append((seg, lo, hi))
            break
        same = r0 == r1
        head = ~same & (o0 > 0)
        mid_lo = r0 + head
        mid = ~same & (r1 > mid_lo)
        tail = ~same & (o1 > 0)
        # Whole rows: finished here, every later dimension complete.
        m_lo, m_hi = lo[mid].copy(), hi[mid].copy()
        m_lo[:, k], m_hi[:, k] = mid_lo[mid], r1[mid]
        m_lo[:, k + 1 :] = 0
        m_hi[:, k + 1 :] = full[k + 1 :]
        done.append((seg[mid], m_lo, m_hi))
        # Partial rows go on to the next dimension with this one fixed.
        parts_seg, parts_s, parts_e, parts_lo, parts_hi = [], [], [], [], []
        for mask, row, a, b in (
            (same, r0, o0, o1),
            (head, r0, o0, np.full_like(o0, inner)),
            (tail, r1, np.zeros_like(o1), o1),
        ):
            p_lo, p_hi = lo[mask].copy(), hi[mask].copy()
            p_lo[:, k], p_hi[:, k] = row[mask], row[mask] + 1
            parts_seg.append(seg[mask])
            parts_s.append(a[mask])
            parts_e.append(b[mask])
            parts_lo.append(p_lo)
            parts_hi.append(p_hi)
        seg = np.concatenate(parts_seg)
        s, e = np.concatenate(parts_s), np.concatenate(parts_e)
        lo, hi = np.concatenate(parts_lo), np.concatenate(parts_hi)
    out_seg = np.concatenate([d[0] for d in done])
    out_lo = np.concatenate([d[1] for d in done])
    out_hi = np.concatenate([d[2] for d in done])
    # Boxes of one range in index order (the order the write path reads them).
    order = np.lexsort((np.ravel_multi_index(tuple(out_lo.T), tuple(shape)), out_seg))
    return out_seg[order], out_lo[order], out_hi[order]


@dataclass(frozen=True, eq=False)
class TileAxisMap(AxisMap):
    """The tile dimension seen by the planner.

    Parameters
    ----------
    tiles
        Tiles along each tiled dimension, in ``order`` (slowest first).
    axes
        For each tiled dimension, how its data positions (before tiling) map onto the source
        chunk grid.

    Build it with :meth:`build`. ``touched`` is the sum over the boxes of a tile range (see
    :func:`range_boxes`) of the source elements their windows decompress; ``source_boundaries``
    are the tile indices that split no source chunk between the tiles before and after.
    """

    tiles: tuple[DimTiles, ...] = ()
    axes: tuple[AxisMap, ...] = ()
    _clean: IntArray = field(init=False, repr=False)

    @classmethod
    def build(cls, dim: str, tiles: Sequence[DimTiles], axes: Sequence[AxisMap]) -> TileAxisMap:
        """The tile axis of a variable tiled as ``tiles`` over data mapped by ``axes``."""
        count = math.prod(t.count for t in tiles)
        unit = math.prod(int(a.chunk_len.max()) if a.chunk_len.size else 1 for a in axes)
        return cls(
            dim,
            np.zeros(count, dtype=np.int64),
            np.array([max(unit, 1)], dtype=np.int64),
            tuple(tiles),
            tuple(axes),
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.tiles) != len(self.axes) or not self.tiles:
            raise ValueError("one AxisMap per tiled dimension is needed")
        for t, ax in zip(self.tiles, self.axes, strict=True):
            if ax.size != t.length:
                raise ValueError(f"{t.name}: the axis map has {ax.size} positions, not {t.length}")
        object.__setattr__(self, "_clean", self._clean_boundaries())

    @property
    def counts(self) -> tuple[int, ...]:
        """Tiles along each tiled dimension (the tile grid's shape, slowest first)."""
        return tuple(t.count for t in self.tiles)

    @property
    def source_boundaries(self) -> IntArray:
        """Tile indices where no source chunk is shared across, with 0 and the tile count."""
        return self._clean

    @property
    def needed(self) -> int:
        """Distinct data elements (over the tiled dimensions) inside some tile."""
        return math.prod(t.covered for t in self.tiles)

    def touched(self, starts: IntArray, stops: IntArray) -> IntArray:
        """Source elements (over the tiled dimensions) decompressed to write each tile range.

        Each range is read box by box (:func:`range_boxes`); a box reads one window per tiled
        dimension, decompressing every source chunk the window touches.
        """
        starts = np.asarray(starts, dtype=np.int64)
        seg, lo, hi = range_boxes(starts, np.asarray(stops, dtype=np.int64), self.counts)
        cost = np.ones(seg.size, dtype=np.int64)
        for k, (t, ax) in enumerate(zip(self.tiles, self.axes, strict=True)):
            a, b = t.window(lo[:, k], hi[:, k])
            cost *= ax.touched(a, b)
        out = np.zeros(starts.size, dtype=np.int64)
        np.add.at(out, seg, cost)
        return out

    def split_levels(self, chunk: int) -> list[IntArray]:
        """Cuts at whole tile rows first (one box per job), then at ever shorter runs of tiles.

        Level ``k`` cuts wherever the tile positions along the tiled dimensions after the
        ``k``-th are all zero, on the write grid (``chunk`` tiles per chunk or shard).
        """
        grid = write_grid(self.size, chunk)
        levels: list[IntArray] = []
        for k in range(len(self.tiles)):
            inner = math.prod(self.counts[k + 1 :])
            cuts = np.concatenate([np.arange(0, self.size, inner), [self.size]])
            levels.append(np.intersect1d(cuts, grid).astype(np.int64))
        return levels

    def tile_touched(self) -> int:
        """The most source elements (over the tiled dimensions) one tile alone decompresses."""
        worst = 1
        for t, ax in zip(self.tiles, self.axes, strict=True):
            p = np.arange(t.count, dtype=np.int64)
            a, b = t.window(p, p + 1)
            worst *= int(ax.touched(a, b).max())
        return worst

    def digest(self) -> str:
        """Stable digest of the tiling and the chunk mapping."""
        h = hashlib.sha256(self.dim.encode())
        for t, ax in zip(self.tiles, self.axes, strict=True):
            h.update(repr(sorted(t.to_json().items())).encode())
            h.update(ax.digest().encode())
        return h.hexdigest()

    def _clean_boundaries(self) -> IntArray:
        total = math.prod(self.counts)
        firsts: list[IntArray] = []
        lasts: list[IntArray] = []
        for t, ax in zip(self.tiles, self.axes, strict=True):
            offsets = np.arange(t.size, dtype=np.int64)
            pos = t.starts[:, None] + offsets[None, :]
            valid = pos < t.length
            owner = np.broadcast_to(np.arange(t.count, dtype=np.int64)[:, None], pos.shape)
            chunk = ax.chunk_of[np.where(valid, pos, 0)]
            n_chunks = int(ax.chunk_len.size)
            first = np.full(n_chunks, np.iinfo(np.int64).max, dtype=np.int64)
            last = np.full(n_chunks, -1, dtype=np.int64)
            np.minimum.at(first, chunk[valid], owner[valid])
            np.maximum.at(last, chunk[valid], owner[valid])
            used = last >= 0
            firsts.append(first[used])
            lasts.append(last[used])
        combos = math.prod(f.size for f in firsts)
        if combos > _MAX_COMBOS:
            return np.array([0, total], dtype=np.int64)
        # The tiles sharing a chunk combination form a box of the tile grid; in C order its first
        # tile is the tuple of per-dimension minima and its last the tuple of maxima.
        first_idx = np.zeros((), dtype=np.int64)
        last_idx = np.zeros((), dtype=np.int64)
        for k, (f, la) in enumerate(zip(firsts, lasts, strict=True)):
            inner = math.prod(self.counts[k + 1 :])
            first_idx = np.add.outer(first_idx, f * inner)
            last_idx = np.add.outer(last_idx, la * inner)
        # A boundary k splits a combination when first < k <= last.
        cuts = np.bincount(first_idx.ravel() + 1, minlength=total + 2)
        cuts -= np.bincount(last_idx.ravel() + 1, minlength=total + 2)
        open_ = np.cumsum(cuts)[: total + 1]
        return np.flatnonzero(open_ == 0).astype(np.int64)


@dataclass(frozen=True, eq=False)
class WithinTileAxisMap(AxisMap):
    """A within-tile dimension: always written whole, its reads counted by the tile axis."""

    @classmethod
    def build(cls, dim: str, size: int) -> WithinTileAxisMap:
        """A within-tile axis of ``size`` elements."""
        return cls(dim, np.zeros(size, dtype=np.int64), np.ones(1, dtype=np.int64))

    @property
    def needed(self) -> int:
        """The tile axis counts the needed elements of the tiled dimensions."""
        return 1
