"""Tiled caches: the tiled target, built lazily with xarray, and its planning checks.

:func:`tile_dataset` replaces the tiled dimensions of the transformed dataset by a tile dimension
plus within-tile dimensions. Its data variables are lazily indexed arrays
(:class:`~zarr_parallel.transforms.tile_array.TileArray`): selecting a range of tiles and loading
it reads, box by box (:func:`~zarr_parallel.planning.tiles.range_boxes`), one window of the untiled
data per box and cuts the tiles out of it. So the write path stays the plain one (select the job's
region, load, write whole chunks) and a job's tiles are produced from exactly the windows the
planner costed. :class:`Tiling` records how a target was tiled and refuses, before any write, a
tile whose job cannot fit the memory budget.

Coordinates: ``tile`` (0, 1, ...), ``<tile>_<dim>`` (the tile's position along each tiled
dimension) and every coordinate along a tiled dimension as a per-tile array, e.g.
``latitude(tile, latitude_in_tile)``. Padded positions hold NaN (floats), NaT (times) or -1
(integers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from xarray.core import indexing

from zarr_parallel.errors import PlanError, RequestError
from zarr_parallel.planning.grid import AxisMap, write_grid
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.planning.tile_spec import TileSpec
from zarr_parallel.planning.tiles import DimTiles, TileAxisMap, WithinTileAxisMap, exact_sizes
from zarr_parallel.transforms.tile_array import TileArray, coordinate_fill
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)

AxisOf = Callable[[xr.DataArray, str, Any], AxisMap]


@dataclass(frozen=True, eq=False)
class Tiling:
    """How a target was tiled: the option, the tiles per dimension and the untiled dataset."""

    spec: TileSpec
    tiles: tuple[DimTiles, ...]
    base: xr.Dataset
    variables: tuple[str, ...]
    _axes: dict[tuple[str, int], TileAxisMap] = field(default_factory=dict, repr=False)

    @property
    def order(self) -> tuple[str, ...]:
        """Tiled dimensions, slowest varying tile index first."""
        return tuple(t.name for t in self.tiles)

    @property
    def count(self) -> int:
        """Number of tiles."""
        return math.prod(t.count for t in self.tiles)

    @property
    def within_dims(self) -> dict[str, int]:
        """Within-tile dimension names with their lengths."""
        return {self.spec.within[t.name]: t.size for t in self.tiles}

    def describe(self) -> dict[str, Any]:
        """The ``tiles`` attribute of a tiled cache: enough to map tiles back to the grid."""
        fill = self.spec.fill_value
        return {
            "dim": self.spec.dim,
            "order": list(self.order),
            "size": {t.name: t.size for t in self.tiles},
            "overlap": {t.name: t.size - t.stride for t in self.tiles},
            "stride": {t.name: t.stride for t in self.tiles},
            "count": {t.name: t.count for t in self.tiles},
            "length": {t.name: t.length for t in self.tiles},
            "within": {t.name: self.spec.within[t.name] for t in self.tiles},
            "edge": self.spec.edge,
            "fill_value": "NaN" if fill is None else fill,
        }

    def dim_axes(self, name: str, vlayout: Any, axis_of: AxisOf) -> tuple[AxisMap, ...]:
        """Per tiled dimension (in order), how the untiled data maps onto source chunks."""
        var = self.base[name]
        return tuple(axis_of(var, t.name, vlayout) for t in self.tiles)

    def axis(self, var: xr.DataArray, dim: str, vlayout: Any, axis_of: AxisOf) -> AxisMap | None:
        """The planner's axis for the tile or a within-tile dimension of ``var``, else None."""
        name = str(var.name)
        if name not in self.variables:
            return None
        if dim == self.spec.dim:
            key = (name, id(vlayout))
            if key not in self._axes:
                axes = self.dim_axes(name, vlayout, axis_of)
                self._axes[key] = TileAxisMap.build(dim, self.tiles, axes)
            return self._axes[key]
        sizes = self.within_dims
        if dim in sizes:
            return WithinTileAxisMap.build(dim, sizes[dim])
        return None

    def fix_chunks(
        self, chunks: dict[str, dict[str, int]], asked: Mapping[str, int] | str
    ) -> dict[str, dict[str, int]]:
        """One tile per chunk: the tile dimension chunked by 1, within-tile dimensions whole."""
        sizes = self.within_dims
        asked = {} if isinstance(asked, str) else asked
        for dim, size in sizes.items():
            if dim in asked and asked[dim] not in (-1, size):
                raise RequestError(
                    f"chunks['{dim}']",
                    asked[dim],
                    f"would cut tiles: a tiled cache holds one chunk per tile ({size} along {dim})",
                    f"Remove chunks['{dim}'] (or change tiles.size)",
                )
        out = {k: dict(v) for k, v in chunks.items()}
        for name in self.variables:
            out[name][self.spec.dim] = 1
            for dim, size in sizes.items():
                out[name][dim] = size
        return out

    def check_fits(self, inputs: Sequence[ArrayInput], limits: Limits) -> None:
        """Refuse before any write when one tile's job cannot fit the memory budget.

        The message gives the estimate, the budget and the largest tile size that would fit.
        """
        for arr in inputs:
            if arr.name not in self.variables:
                continue
            touched = 1
            lengths: list[int] = []
            for ax, chunk in zip(arr.axes, arr.write_chunks, strict=True):
                grid = write_grid(ax.size, chunk)
                touched *= int(ax.touched(grid[:-1], grid[1:]).max())
                lengths.append(int(np.diff(grid).max()))
            # The planner's own model for this array (whichever read path writes it).
            memory = int(arr.memory(touched, lengths))
            if memory > limits.memory_budget:
                raise self._refusal(arr, memory, limits)

    def _refusal(self, arr: ArrayInput, memory: int, limits: Limits) -> PlanError:
        tile_axis = next(ax for ax in arr.axes if isinstance(ax, TileAxisMap))
        other_t = other_l = 1
        others: list[str] = []
        per_tile = 1
        for ax, chunk in zip(arr.axes, arr.write_chunks, strict=True):
            if ax is tile_axis:
                per_tile = chunk
            elif not isinstance(ax, WithinTileAxisMap):
                grid = write_grid(ax.size, chunk)
                other_t *= int(ax.touched(grid[:-1], grid[1:]).max())
                other_l *= int(np.diff(grid).max())
                others.append(f"{ax.dim}: {chunk}")

        def estimate(tiles: Sequence[DimTiles]) -> int:
            single = 1
            for t, ax in zip(tiles, tile_axis.axes, strict=True):
                p = np.arange(t.count, dtype=np.int64)
                a, b = t.window(p, p + 1)
                single *= int(ax.touched(a, b).max())
            region = math.prod(t.size for t in tiles)
            return int(
                job_memory(
                    per_tile * single * other_t * arr.fixed_touched,
                    per_tile * region * other_l,
                    arr.itemsize,
                    arr.read_itemsize,
                )
            )

        fitting = self._largest_fitting(estimate, limits.memory_budget)
        src = ", ".join(
            f"{t.name}: {int(ax.chunk_len.max())}"
            for t, ax in zip(self.tiles, tile_axis.axes, strict=True)
        )
        sizes = {t.name: t.size for t in self.tiles}
        along = f", target chunks {{{', '.join(others)}}}" if others else ""
        problem = (
            f"one tile of {arr.name!r} (tiles.size={sizes}{along}) with the source chunks it "
            f"touches ({{{src}}} along the tiled dimensions) needs about "
            f"{format_bytes(memory)}, more than the {format_bytes(limits.memory_budget)} a job "
            f"may use ({limits.held_back()})"
        )
        raise_to = f"raise memory_limit by at least {format_bytes(memory - limits.memory_budget)}"
        if fitting is not None:
            cand, cand_memory = fitting
            fix = (
                f"The largest tiles that fit are tiles.size={cand} (about "
                f"{format_bytes(cand_memory)} per job); use them, or {raise_to}"
            )
        else:
            fix = (
                "No tile size fits: even the smallest tile decompresses whole source chunks. "
                f"{raise_to[0].upper()}{raise_to[1:]}"
                + (
                    f", or use smaller chunks along {', '.join(o.split(':')[0] for o in others)}"
                    if others
                    else ""
                )
            )
        # The value shown is memory_limit itself (the budget plus what is held back).
        return PlanError("memory_limit", format_bytes(limits.memory_limit), problem, fix)

    def _largest_fitting(
        self, estimate: Callable[[Sequence[DimTiles]], int], budget: int
    ) -> tuple[dict[str, int], int] | None:
        """The largest tiles (same proportions) whose one-tile job fits ``budget``."""
        spec = self.spec
        top = max(t.size for t in self.tiles)
        seen: set[tuple[int, ...]] = set()
        for scale in range(top - 1, 0, -1):
            sizes: list[int] = []
            for t in self.tiles:
                overlap = t.size - t.stride
                s = max(overlap + 1, (t.size * scale) // top)
                if spec.edge == "error":
                    exact = [e for e in exact_sizes(t.length, overlap) if e <= s]
                    if not exact:
                        break
                    s = exact[-1]
                sizes.append(min(s, t.size))
            if len(sizes) != len(self.tiles) or tuple(sizes) in seen:
                continue
            seen.add(tuple(sizes))
            try:
                cand = [
                    DimTiles.plan(t.name, t.length, s, t.size - t.stride, spec.edge)
                    for t, s in zip(self.tiles, sizes, strict=True)
                ]
            except RequestError:
                continue
            memory = estimate(cand)
            if memory <= budget:
                return {t.name: t.size for t in cand}, memory
        return None


def tile_dataset(ds: xr.Dataset, spec: TileSpec) -> tuple[xr.Dataset, Tiling]:
    """Tile ``ds`` lazily as ``spec`` says; a RequestError naming the ``tiles`` field if not."""
    names = _tiled_variables(ds, spec)
    order = spec.order or tuple(str(d) for d in ds[names[0]].dims if d in spec.size)
    tiles = tuple(
        DimTiles.plan(d, int(ds.sizes[d]), spec.size[d], spec.overlap[d], spec.edge) for d in order
    )
    _check_new_names(ds, spec, order)
    _check_coordinates(ds, spec, tiles)
    fill = _data_fill(ds, names, spec, tiles)
    out = xr.Dataset(attrs={**ds.attrs, "tiles": {}})
    coords = _tiled_coords(ds, spec, tiles)
    for name, var in ds.data_vars.items():
        if str(name) not in names:
            out[name] = var.variable
            continue
        arr = TileArray(var.variable, tiles, dict(spec.within), fill)
        lazy = xr.Variable(
            (spec.dim, *arr.out_dims),
            indexing.LazilyIndexedArray(arr),
            attrs=dict(var.attrs),
            encoding=dict(var.encoding),
        )
        out[name] = lazy
    out = out.assign_coords(coords)
    tiling = Tiling(spec, tiles, ds, tuple(names))
    out.attrs["tiles"] = tiling.describe()
    sizes = {t.name: t.size for t in tiles}
    logger.info("tiled %s into %d tiles of %s", list(order), tiling.count, sizes)
    return out, tiling


def _tiled_variables(ds: xr.Dataset, spec: TileSpec) -> list[str]:
    """The data variables to tile: those with every tiled dimension (none may have only some)."""
    tiled_dims = list(spec.size)
    for d in tiled_dims:
        if d not in ds.dims:
            raise RequestError(
                f"tiles.size.{d}",
                spec.size[d],
                "names no dimension of the data after the preprocessors",
                f"Tile dimensions of {sorted(map(str, ds.dims))}",
            )
    names: list[str] = []
    for name, var in ds.data_vars.items():
        have = [d for d in tiled_dims if d in var.dims]
        if not have:
            continue
        if len(have) != len(tiled_dims):
            raise RequestError(
                "tiles.size",
                dict(spec.size),
                f"variable {name!r} has only {have} of the tiled dimensions",
                "Tile dimensions every tiled variable has, or leave the variable out "
                "(variables, or a drop_vars preprocessor)",
            )
        names.append(str(name))
    if not names:
        raise RequestError(
            "tiles.size", dict(spec.size), "no data variable has all the tiled dimensions", ""
        )
    return names


def _check_new_names(ds: xr.Dataset, spec: TileSpec, order: Sequence[str]) -> None:
    """The tile, within-tile and tile-position names must be new to the data."""
    made = [spec.dim, *spec.within.values(), *(f"{spec.dim}_{d}" for d in order)]
    clash = [n for n in made if n in ds.dims or n in ds.variables]
    if clash:
        raise RequestError(
            "tiles.dim" if clash[0] == spec.dim else "tiles.within",
            clash[0],
            "is already a name in the data",
            "Choose names the data does not use (tiles.dim, tiles.within)",
        )


def _tiled_coords(
    ds: xr.Dataset, spec: TileSpec, tiles: Sequence[DimTiles]
) -> dict[str, xr.Variable]:
    """Coordinates of the tiled dataset: those along a tiled dimension as per-tile arrays, the
    tile index and each tile's position along every tiled dimension."""
    order = {t.name for t in tiles}
    within = dict(spec.within)
    coords: dict[str, xr.Variable] = {}
    for cname, coord in ds.coords.items():
        if not set(map(str, coord.dims)) & order:
            coords[str(cname)] = coord.variable
            continue
        arr = TileArray(coord.variable, tiles, within, coordinate_fill(coord.dtype))
        values = arr[indexing.BasicIndexer((slice(None),) * len(arr.shape))]
        coords[str(cname)] = xr.Variable((spec.dim, *arr.out_dims), values, attrs=coord.attrs)
    count = math.prod(t.count for t in tiles)
    coords[spec.dim] = xr.Variable(spec.dim, np.arange(count, dtype=np.int64))
    positions = np.unravel_index(np.arange(count), tuple(t.count for t in tiles))
    for t, pos in zip(tiles, positions, strict=True):
        coords[f"{spec.dim}_{t.name}"] = xr.Variable(
            spec.dim,
            pos.astype(np.int64),
            attrs={"long_name": f"position of the tile along {t.name}", "stride": t.stride},
        )
    return coords


def _data_fill(
    ds: xr.Dataset, names: Sequence[str], spec: TileSpec, tiles: Sequence[DimTiles]
) -> Any:
    """The pad value of the data variables, checked against their dtypes."""
    fill = np.nan if spec.fill_value is None else spec.fill_value
    if not any(t.padded for t in tiles):
        return fill
    for name in names:
        dtype = ds[name].dtype
        if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
            continue
        if spec.fill_value is None:
            raise RequestError(
                "tiles.fill_value",
                None,
                f"padding {name!r} ({dtype}) needs a fill value: NaN is not a {dtype} value",
                "Set tiles.fill_value, e.g. -9999, or use tiles.edge 'drop'",
            )
        if np.asarray(fill).astype(dtype) != fill:
            raise RequestError(
                "tiles.fill_value",
                fill,
                f"cannot be stored in {name!r} ({dtype})",
                f"Use a value of {dtype}",
            )
    return fill


def _check_coordinates(ds: xr.Dataset, spec: TileSpec, tiles: Sequence[DimTiles]) -> None:
    """0.5's guards: ascending coordinates, and no tile across a periodic seam."""
    for t in tiles:
        if t.name not in ds.coords or ds[t.name].ndim != 1:
            continue
        values = np.asarray(ds[t.name].values)
        if values.size < 2:
            continue
        numeric = np.issubdtype(values.dtype, np.number)
        if spec.ascending and (numeric or np.issubdtype(values.dtype, np.datetime64)):
            zero = 0 if numeric else np.timedelta64(0, "ns")
            if not np.all(np.diff(values) > zero):
                raise _not_ascending(t.name)
        if not numeric:
            continue
        period = spec.periods.get(t.name)
        if period is None:
            continue
        jump = np.abs(np.diff(values.astype(np.float64))) > period / 2
        # A jump between positions i and i+1 is crossed by tiles holding both.
        for p, start in enumerate(t.starts):
            stop = min(int(start) + t.size, t.length)
            if jump[int(start) : stop - 1].any():
                raise RequestError(
                    f"tiles.periods.{t.name}",
                    period,
                    f"tile {p} along {t.name} crosses the coordinate's seam (a jump of more "
                    f"than {period / 2:g} inside the tile)",
                    f"Roll {t.name} so the seam falls between tiles, or drop tiles.periods",
                )


def _not_ascending(dim: str) -> RequestError:
    return RequestError(
        "tiles.ascending",
        True,
        f"{dim} is not strictly ascending",
        f"Add a reverse or sortby preprocessor for {dim}, or set tiles.ascending to false",
    )
