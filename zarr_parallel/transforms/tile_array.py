"""A variable of the untiled data seen as tiles (:class:`TileArray`), read lazily box by box.

Selecting a range of tiles and loading it reads, box by box
(:func:`~zarr_parallel.planning.tiles.range_boxes`), one window of the untiled data per box and
cuts the tiles out of it: exactly the windows the planner costed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from zarr_parallel.planning.tiles import DimTiles, range_boxes

#: Boxes of the tile grid to read, and where each tile id goes in the result.
Boxes = tuple[list[tuple[np.ndarray, np.ndarray]], dict[int, int]]


def coordinate_fill(dtype: np.dtype[Any]) -> Any:
    """What padded positions of a coordinate hold: NaN, NaT or -1."""
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        return np.nan
    if np.issubdtype(dtype, np.datetime64) or np.issubdtype(dtype, np.timedelta64):
        return np.array("NaT", dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        return -1
    if np.issubdtype(dtype, np.bool_):
        return False
    return None


class TileArray(BackendArray):
    """A variable of the untiled data seen as tiles: ``(tile, ...dims with tiled ones replaced)``.

    Indexing reads only the windows of the selected tiles (one per box of the tile range) from
    the wrapped (lazy) variable; nothing is read before the result is loaded.
    """

    def __init__(
        self,
        variable: xr.Variable,
        tiles: Sequence[DimTiles],
        within: Mapping[str, str],
        fill: Any,
    ) -> None:
        self.variable = variable
        self.tiles = tuple(tiles)
        self.by_name = {t.name: t for t in self.tiles}
        self.grid_axis = {t.name: k for k, t in enumerate(self.tiles)}
        self.counts = tuple(t.count for t in self.tiles)
        self.base_dims = tuple(str(d) for d in variable.dims)
        self.out_dims = tuple(within.get(d, d) for d in self.base_dims)
        self.shape = (
            math.prod(self.counts),
            *(
                self.by_name[d].size if d in self.by_name else int(variable.sizes[d])
                for d in self.base_dims
            ),
        )
        self.dtype = variable.dtype
        self.fill = fill
        self.padded = any(t.padded for t in self.tiles)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> Any:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._getitem
        )

    def _getitem(self, key: tuple[Any, ...]) -> np.ndarray:
        ranges = [
            range(size)[k] if isinstance(k, slice) else range(size)[int(k) : int(k) + 1]
            for k, size in zip(key, self.shape, strict=True)
        ]
        squeeze = tuple(i for i, k in enumerate(key) if not isinstance(k, slice))
        tile_ids = np.asarray(ranges[0], dtype=np.int64)
        other = self._untiled_ranges(ranges[1:])
        out = self._empty(tile_ids.size, other)
        if out.size:
            boxes, slot = self._boxes(ranges[0], tile_ids)
            for box_lo, box_hi in boxes:
                self._read_box(box_lo, box_hi, other, slot, out)
        out = self._pick(out, ranges[1:], other)
        if squeeze:
            out = out.squeeze(axis=squeeze)
        return out

    def _untiled_ranges(self, ranges: Sequence[range]) -> dict[str, tuple[int, int]]:
        """Untiled dimensions: read the covering step-1 range, pick positions afterwards."""
        other: dict[str, tuple[int, int]] = {}
        for d, r in zip(self.base_dims, ranges, strict=True):
            if d not in self.by_name:
                other[d] = (min(r), max(r) + 1) if len(r) else (0, 0)
        return other

    def _empty(self, n_tiles: int, other: Mapping[str, tuple[int, int]]) -> np.ndarray:
        """The result before reading: filled where tiles may be padded."""
        shape = [n_tiles] + [
            self.by_name[d].size if d in self.by_name else other[d][1] - other[d][0]
            for d in self.base_dims
        ]
        if self.padded:
            return np.full(shape, self.fill, dtype=self.dtype)
        return np.empty(shape, dtype=self.dtype)

    def _boxes(self, tile_range: range, tile_ids: np.ndarray) -> Boxes:
        """The boxes to read: those of a step-1 range of tiles, else one box per tile."""
        if tile_range.step == 1:
            seg, lo, hi = range_boxes(
                np.array([tile_ids[0]]), np.array([tile_ids[-1] + 1]), self.counts
            )
            first = int(tile_ids[0])
            return [(lo[i], hi[i]) for i in range(seg.size)], {
                int(t): int(t) - first for t in tile_ids
            }
        pos = np.stack(np.unravel_index(tile_ids, self.counts), axis=1)
        return [(p, p + 1) for p in pos], {int(t): i for i, t in enumerate(tile_ids)}

    def _pick(
        self, out: np.ndarray, ranges: Sequence[range], other: Mapping[str, tuple[int, int]]
    ) -> np.ndarray:
        """Pick the asked positions where the key was not a plain step-1 range."""
        for axis, (d, r) in enumerate(zip(self.base_dims, ranges, strict=True), start=1):
            start = other[d][0] if d in other else 0
            if r.step == 1 and len(r) == out.shape[axis] and (len(r) == 0 or r.start == start):
                continue
            out = np.take(out, np.asarray(r, dtype=np.int64) - start, axis=axis)
        return out

    def _read_box(
        self,
        box_lo: np.ndarray,
        box_hi: np.ndarray,
        other: Mapping[str, tuple[int, int]],
        slot: Mapping[int, int],
        out: np.ndarray,
    ) -> None:
        window: dict[str, tuple[int, int]] = {}
        for k, t in enumerate(self.tiles):
            a, b = t.window(box_lo[k : k + 1], box_hi[k : k + 1])
            window[t.name] = (int(a[0]), int(b[0]))
        indexer = {
            d: slice(*window[d]) if d in window else slice(*other[d]) for d in self.base_dims
        }
        data = np.asarray(self.variable.isel(indexer).values)
        for pos in itertools.product(*(range(a, b) for a, b in zip(box_lo, box_hi, strict=True))):
            t_id = int(np.ravel_multi_index(pos, self.counts))
            if t_id not in slot:
                continue
            src: list[slice] = []
            dst: list[slice] = []
            for d in self.base_dims:
                if d in self.by_name:
                    t = self.by_name[d]
                    start = pos[self.grid_axis[d]] * t.stride
                    n = min(t.size, t.length - start)
                    local = start - window[d][0]
                    src.append(slice(local, local + n))
                    dst.append(slice(0, n))
                else:
                    src.append(slice(None))
                    dst.append(slice(None))
            target: tuple[int | slice, ...] = (slot[t_id], *dst)
            out[target] = data[tuple(src)]
