"""Pure tile arithmetic: how a grid becomes tiles, and what a range of tiles reads.

A tiled cache cuts some dimensions of the target (say latitude and longitude) into tiles of a fixed
size and numbers the tiles along one *tile dimension*, in C order of the tile grid: ``order`` lists
the tiled dimensions from the slowest to the fastest varying. Within a tile the tiled dimensions
become *within-tile* dimensions of the tile's size, so each tile is exactly one Zarr chunk.

The planner sees the tile dimension as a :class:`TileAxisMap`: an
:class:`~zarr_parallel.planning.plan.AxisMap` whose source boundaries are the tile indices where no
source chunk is shared between the tiles before and after (so each source chunk is read by one job),
and whose read cost of a range of tiles is what the write path really decompresses for it. Nothing
here does I/O or imports xarray.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarr_parallel.errors import RequestError
from zarr_parallel.names import path_problem
from zarr_parallel.planning.plan import AxisMap, IntArray, write_grid

#: Keys of the long form of the ``tiles`` option; a mapping with none of them is the short form.
OPTION_KEYS = (
    "size",
    "overlap",
    "edge",
    "fill_value",
    "dim",
    "within",
    "order",
    "periods",
    "ascending",
)
EDGES = ("error", "drop", "pad")
#: Most (chunk combination) pairs examined when finding clean tile boundaries.
_MAX_COMBOS = 20_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class TileSpec:
    """The validated ``tiles`` option.

    Parameters
    ----------
    size
        Tile length per tiled dimension, e.g. ``{"latitude": 64, "longitude": 64}``.
    overlap
        Elements shared by neighbouring tiles per tiled dimension (0: tiles touch). The step from
        one tile to the next is ``size - overlap``.
    edge
        What to do when the tiles do not cover a dimension exactly: ``"error"`` (refuse, the
        default: nothing is dropped or invented silently), ``"drop"`` (leave out the remainder at
        the end) or ``"pad"`` (extend the last tile with ``fill_value``).
    fill_value
        Value of padded elements; ``None`` means NaN, which needs a floating-point variable.
    dim
        Name of the tile dimension.
    within
        Name of the within-tile dimension of each tiled dimension.
    order
        Tiled dimensions from the slowest to the fastest varying tile index; ``None`` follows the
        data's dimension order.
    periods
        Per tiled dimension, the period of its coordinate (e.g. 360 for longitude): a tile whose
        coordinate jumps by more than half of it crosses a seam and is refused.
    ascending
        Refuse tiled dimensions whose coordinates are not strictly ascending.
    """

    size: Mapping[str, int]
    overlap: Mapping[str, int] = field(default_factory=dict)
    edge: str = "error"
    fill_value: float | int | None = None
    dim: str = "tile"
    within: Mapping[str, str] = field(default_factory=dict)
    order: tuple[str, ...] | None = None
    periods: Mapping[str, float] = field(default_factory=dict)
    ascending: bool = False

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_edge()
        self._check_names()
        self._check_order()

    def _check_lengths(self) -> None:
        if not isinstance(self.size, Mapping) or not self.size:
            raise RequestError(
                "tiles.size",
                self.size,
                "must name at least one dimension with its tile length",
                "Write e.g. tiles: {size: {latitude: 64, longitude: 64}}",
            )
        for d, s in self.size.items():
            if not _is_int(s) or s <= 0:
                raise RequestError(
                    f"tiles.size.{d}",
                    s,
                    "must be a positive whole number of elements",
                    "Use e.g. 64",
                )
        tiled = set(self.size)
        overlap = dict(self.overlap)
        for d, ov in overlap.items():
            if d not in tiled:
                raise RequestError(
                    f"tiles.overlap.{d}", ov, "names a dimension that is not tiled", _names(tiled)
                )
            if not _is_int(ov) or not 0 <= ov < self.size[d]:
                raise RequestError(
                    f"tiles.overlap.{d}",
                    ov,
                    f"must be a whole number from 0 to {self.size[d] - 1} (less than the tile)",
                    "Use 0 for tiles that touch without sharing elements",
                )
        object.__setattr__(
            self, "overlap", {d: int(overlap.get(d, 0)) for d in self.size}
        )  # complete and in size order
        object.__setattr__(self, "size", {str(d): int(s) for d, s in self.size.items()})

    def _check_edge(self) -> None:
        if self.edge not in EDGES:
            raise RequestError(
                "tiles.edge", self.edge, "is not an edge policy", "Use 'error', 'drop' or 'pad'"
            )
        if self.fill_value is not None and not _is_number(self.fill_value):
            raise RequestError(
                "tiles.fill_value",
                self.fill_value,
                "must be a number",
                "Use e.g. -9999 (or leave it unset for NaN)",
            )
        if isinstance(self.fill_value, float) and math.isnan(self.fill_value):
            object.__setattr__(self, "fill_value", None)  # None means NaN: one spelling
        elif self.fill_value is not None and not math.isfinite(self.fill_value):
            # Infinities do not survive the request's JSON on the way to the workers.
            raise RequestError(
                "tiles.fill_value",
                self.fill_value,
                "must be finite",
                "Use a finite number, or leave it unset for NaN",
            )

    def _check_names(self) -> None:
        tiled = set(self.size)
        if not isinstance(self.dim, str) or not self.dim or self.dim in tiled:
            raise RequestError(
                "tiles.dim",
                self.dim,
                "must be a new dimension name, not a tiled dimension",
                "Use e.g. 'tile'",
            )
        _check_path_name("tiles.dim", self.dim)
        within = dict(self.within)
        for d in within:
            if d not in tiled:
                raise RequestError(
                    f"tiles.within.{d}", within[d], "names a dimension that is not tiled", ""
                )
        for d, name in within.items():
            _check_path_name(f"tiles.within.{d}", name)
        names = {d: str(within.get(d, f"{d}_in_tile")) for d in self.size}
        clash = [n for n in names.values() if not n or n in tiled or n == self.dim]
        if clash or len(set(names.values())) != len(names):
            raise RequestError(
                "tiles.within",
                names,
                "needs distinct new names, different from the tiled dimensions and tiles.dim",
                "Write e.g. within: {latitude: y, longitude: x}",
            )
        object.__setattr__(self, "within", names)

    def _check_order(self) -> None:
        tiled = set(self.size)
        if self.order is not None:
            order = tuple(str(d) for d in self.order)
            if sorted(order) != sorted(self.size):
                raise RequestError(
                    "tiles.order",
                    list(order),
                    "must list every tiled dimension once, slowest varying first",
                    f"Use an order of {list(self.size)}",
                )
            object.__setattr__(self, "order", order)
        for d, period in self.periods.items():
            if d not in tiled or not _is_number(period) or period <= 0:
                raise RequestError(
                    f"tiles.periods.{d}",
                    period,
                    "must be the positive period of a tiled dimension's coordinate",
                    "Use e.g. {longitude: 360}",
                )
        object.__setattr__(self, "periods", {d: float(p) for d, p in self.periods.items()})
        if not isinstance(self.ascending, bool):
            raise RequestError("tiles.ascending", self.ascending, "must be true or false", "")

    @classmethod
    def parse(cls, value: Any) -> TileSpec:
        """Validate the long form or the short form ``{latitude: 64, longitude: 64}``.

        In the short form the options may stand beside the lengths:
        ``{latitude: 64, longitude: 64, edge: pad}``.

        >>> TileSpec.parse({"latitude": 64}).to_json()["within"]
        {'latitude': 'latitude_in_tile'}
        """
        if isinstance(value, TileSpec):
            return value
        if not isinstance(value, Mapping):
            raise RequestError(
                "tiles",
                value,
                "must be a mapping",
                "Write e.g. tiles: {latitude: 64, longitude: 64} or "
                "tiles: {size: {latitude: 64, longitude: 64}, edge: pad}",
            )
        fields = {k: v for k, v in value.items() if k in OPTION_KEYS}
        lengths = {k: v for k, v in value.items() if k not in OPTION_KEYS}
        if "size" not in fields:
            # Short form: tile lengths at the top, options beside them.
            fields["size"] = lengths
        elif lengths:
            name = next(iter(lengths))
            raise RequestError(
                f"tiles.{name}",
                lengths[name],
                "is not a tiles option",
                f"Use {list(OPTION_KEYS)}; tile lengths go under size",
            )
        overlap = fields.get("overlap", 0)
        if _is_int(overlap):
            fields["overlap"] = {d: overlap for d in dict(fields["size"])}
        elif not isinstance(overlap, Mapping):
            raise RequestError(
                "tiles.overlap", overlap, "must be a number or a mapping", "Use e.g. 0 or {x: 4}"
            )
        if isinstance(fields.get("edge"), str):
            fields["edge"] = fields["edge"].lower()
        for key in ("within", "periods"):
            if fields.get(key) is None:
                fields.pop(key, None)
            elif not isinstance(fields[key], Mapping):
                raise RequestError(
                    f"tiles.{key}", fields[key], "must be a mapping per tiled dimension", ""
                )
        if fields.get("order") is not None:
            order = fields["order"]
            if isinstance(order, str) or not isinstance(order, Sequence):
                raise RequestError(
                    "tiles.order", order, "must be a list of the tiled dimensions", ""
                )
            fields["order"] = tuple(order)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        """The canonical form kept in the request (every default filled in)."""
        return {
            "size": dict(self.size),
            "overlap": dict(self.overlap),
            "edge": self.edge,
            "fill_value": self.fill_value,
            "dim": self.dim,
            "within": dict(self.within),
            "order": list(self.order) if self.order is not None else None,
            "periods": dict(self.periods),
            "ascending": self.ascending,
        }

    def stride(self, dim: str) -> int:
        """Step between the starts of neighbouring tiles along ``dim``."""
        return self.size[dim] - self.overlap[dim]


def _check_path_name(parameter: str, name: Any) -> None:
    """Refuse a tile dimension name that would not stay a folder inside the cache."""
    problem = path_problem(name)
    if problem is not None:
        raise RequestError(
            parameter,
            name,
            f"{problem}; dimension names become folders of the cache and must stay inside it",
            "Use a plain name such as 'tile' or 'y'",
        )


def _names(names: set[str]) -> str:
    return f"Use one of {sorted(names)}"


def from_v05(spec: Mapping[str, Any], parameter: str) -> dict[str, Any]:
    """Translate zarr-parallel 0.5's ``{"type": "tiled", ...}`` preprocessor into ``tiles``.

    0.5 cut tiles with xarray's ``coarsen(...).construct(...)`` and stacked them along
    ``batch_dim``; its ``boundary`` maps onto ``edge`` (``exact`` → error, ``trim`` → drop,
    ``pad`` → pad with NaN) and its dimension names are kept (``batch_dim``, ``<dim>_fine``), so
    code written for 0.5's caches finds them.

    >>> from_v05({"type": "tiled", "latitude": 8, "boundary": "trim"}, "p")["edge"]
    'drop'
    """
    args = {k: v for k, v in spec.items() if k != "type"}
    boundary = str(args.pop("boundary", "pad")).lower()
    edges = {"exact": "error", "trim": "drop", "pad": "pad"}
    if boundary not in edges:
        raise RequestError(
            f"{parameter}.boundary",
            boundary,
            "is not a boundary of 0.5's tiled transform",
            "Use 'exact', 'trim' or 'pad', or set the tiles option instead",
        )
    validate = args.pop("validate_axis_order", False)
    periods = args.pop("discontinuity_periods", None)
    sizes = dict(args)
    if periods is None:
        periods = {"longitude": 360.0, "lon": 360.0}  # 0.5's default guard
    periods = {d: p for d, p in dict(periods).items() if d in sizes}
    spec_obj = TileSpec.parse(
        {
            "size": sizes,
            "edge": edges[boundary],
            "dim": "batch_dim",
            "within": {d: f"{d}_fine" for d in sizes},
            "periods": periods,
            "ascending": bool(validate),
        }
    )
    return spec_obj.to_json()


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


def request_tiles(
    tiles: Any,
    preprocessors: Sequence[Any],
    chunks: Mapping[str, int] | str,
    shards: Mapping[str, int] | None,
) -> tuple[dict[str, Any] | None, list[Any]]:
    """The canonical ``tiles`` option of a request and its preprocessors without 0.5's ``tiled``.

    0.5's ``{"type": "tiled", ...}`` is translated when it is the last preprocessor (later
    transforms would see 0.5's tiled layout, which this version does not build). Chunks and shards
    must leave the tiled dimensions alone: a tiled cache holds one chunk per tile.
    """
    pre = list(preprocessors)
    last = pre[-1] if pre else None
    if isinstance(last, Mapping) and str(last.get("type")) == "tiled":
        where = f"preprocessors[{len(pre) - 1}]"
        if tiles is not None:
            raise RequestError(
                where,
                dict(last),
                "tiles twice: the tiles option is also set",
                "Keep one of them (the tiles option)",
            )
        tiles = from_v05(last, where)
        pre.pop()
    if tiles is None:
        return None, pre
    spec = TileSpec.parse(tiles)
    for field_name, given in (("chunks", chunks), ("shards", shards)):
        if not isinstance(given, Mapping):
            continue
        for d, value in given.items():
            if d in spec.size:
                raise RequestError(
                    f"{field_name}['{d}']",
                    value,
                    f"{d} is tiled: a tiled cache holds one chunk per tile",
                    f"Remove it; tiles.size sets the tile length along {d}",
                )
        if field_name == "chunks" and given.get(spec.dim, 1) != 1:
            raise RequestError(
                f"chunks['{spec.dim}']",
                given[spec.dim],
                "must be 1: a tiled cache holds one chunk per tile",
                f"Remove it, or group tiles into shards with shards: {{{spec.dim}: N}}",
            )
    return spec.to_json(), pre
