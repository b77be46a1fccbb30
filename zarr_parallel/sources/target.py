"""The target: the source after preprocessors and per-variable transforms, applied lazily.

Before the transforms run, every source dimension gets an integer index coordinate
(``_zpi_<dim>``). Transforms carry these along like any coordinate, so afterwards each target
index says exactly which source index it came from, whatever the selections, flips, rolls or
renames did. That mapping, with the source layout, is what the planner aligns to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.errors import RequestError, SourceChanged
from zarr_parallel.names import check_names
from zarr_parallel.planning.fingerprint import canonical_json
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput
from zarr_parallel.planning.tile_spec import TileSpec
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.identity import check_sources
from zarr_parallel.sources.layout import SourceLayout
from zarr_parallel.sources.source import Source, file_stamp, open_source
from zarr_parallel.transforms.registry import apply_transforms, names_before
from zarr_parallel.transforms.tiled_target import Tiling, tile_dataset

logger = logging.getLogger(__name__)

INDEX_PREFIX = "_zpi_"
SOURCE_ATTR = "_zp_source"


@dataclass(frozen=True)
class Target:
    """The lazily transformed dataset, ready to be planned and written.

    ``dataset`` still carries the index coordinates; :meth:`template` and :meth:`region`
    give clean views without them.
    """

    dataset: xr.Dataset
    layout: SourceLayout
    chunks: Mapping[str, dict[str, int]]
    shards: Mapping[str, dict[str, int]] | None
    sources: Mapping[str, str | None]
    tiling: Tiling | None = None

    @property
    def variables(self) -> list[str]:
        """Data variables written by jobs."""
        return [str(v) for v in self.dataset.data_vars]

    def clean(self, ds: xr.Dataset) -> xr.Dataset:
        """Drop the index coordinates and bookkeeping attributes."""
        ds = ds.drop_vars([c for c in ds.coords if str(c).startswith(INDEX_PREFIX)])
        for var in ds.data_vars.values():
            var.attrs.pop(SOURCE_ATTR, None)
        return ds

    def template(self) -> xr.Dataset:
        """The target without index coordinates (lazy data)."""
        return self.clean(self.dataset.copy())

    def array_inputs(self) -> list[ArrayInput]:
        """Planner inputs: per variable, how target indices map onto source chunks."""
        inputs = []
        for name in self.variables:
            var = self.dataset[name]
            src = self.sources.get(name)
            vlayout = self.layout.variables.get(src) if src else None
            axes = []
            for dim in var.dims:
                axes.append(self._axis(var, str(dim), vlayout))
            fixed = 1
            if vlayout is not None:
                for c in var.coords.values():
                    cname = str(c.name)
                    if cname.startswith(INDEX_PREFIX) and c.ndim == 0:
                        sdim = cname[len(INDEX_PREFIX) :]
                        if sdim in vlayout.dims:
                            bounds = np.asarray(vlayout.boundaries[vlayout.dims.index(sdim)])
                            k = int(np.searchsorted(bounds, int(c.values), side="right") - 1)
                            fixed *= int(bounds[k + 1] - bounds[k])
            write = tuple(
                (self.shards or {}).get(name, {}).get(str(d), self.chunks[name][str(d)])
                for d in var.dims
            )
            read_itemsize = vlayout.read_itemsize if vlayout else var.dtype.itemsize
            inputs.append(
                ArrayInput(name, tuple(axes), write, int(var.dtype.itemsize), read_itemsize, fixed)
            )
        return inputs

    def source_chunk_ranges(
        self, variables: Sequence[str], slices: Mapping[str, slice]
    ) -> dict[str, dict[str, tuple[int, int]]]:
        """Per source variable that target ``variables`` read in the region ``slices``, per
        source dimension, the source chunks ``[lo, hi)`` it covers (by the index coordinates;
        a dimension no coordinate maps counts whole). Jobs check the files holding these."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for name in variables:
            var = self.dataset[name]
            src = self.sources.get(name)
            vlayout = self.layout.variables.get(src) if src else None
            if src is None or vlayout is None:
                continue
            bounds_of = dict(zip(vlayout.dims, vlayout.boundaries, strict=True))
            spans = {d: (0, len(b) - 1) for d, b in bounds_of.items()}
            for c in var.coords.values():
                sdim = str(c.name)[len(INDEX_PREFIX) :]
                if not str(c.name).startswith(INDEX_PREFIX) or sdim not in spans:
                    continue
                index = np.asarray(c.values)[tuple(slices.get(str(d), slice(None)) for d in c.dims)]
                if index.size:
                    bounds = np.asarray(bounds_of[sdim])
                    lo = int(np.searchsorted(bounds, int(index.min()), side="right") - 1)
                    spans[sdim] = (lo, int(np.searchsorted(bounds, int(index.max()), side="right")))
            known = out.setdefault(src, spans)
            for d, (lo, hi) in spans.items():  # two target variables of one source variable
                known[d] = (min(known[d][0], lo), max(known[d][1], hi))
        return out

    def _axis(self, var: xr.DataArray, dim: str, vlayout: Any) -> AxisMap:
        if self.tiling is not None:
            tiled = self.tiling.axis(var, dim, vlayout, self._axis)
            if tiled is not None:
                return tiled
        size = int(var.sizes[dim])
        for c in var.coords.values():
            cname = str(c.name)
            if cname.startswith(INDEX_PREFIX) and c.dims == (dim,):
                sdim = cname[len(INDEX_PREFIX) :]
                if vlayout is not None and sdim in vlayout.dims:
                    bounds = np.asarray(vlayout.boundaries[vlayout.dims.index(sdim)])
                    src_idx = np.asarray(c.values, dtype=np.int64)
                    chunk_of = np.searchsorted(bounds, src_idx, side="right") - 1
                    return AxisMap(dim, chunk_of, np.diff(bounds))
        # No mapping known (a dimension a transform made): conservatively one chunk.
        return AxisMap(dim, np.zeros(size, dtype=np.int64), np.array([max(size, 1)]))


def indexed_source(req: CacheRequest, source: Source) -> xr.Dataset:
    """The source's requested variables with an index coordinate per dimension, untransformed.

    Applying the first ``k`` preprocessors to it gives the data as preprocessor ``k`` sees it,
    still saying which source index each position came from.
    """
    ds = source.dataset.copy()
    check_names(ds, "data_uri", req.data_uri, "the source has")
    if req.variables is not None:
        # A name the preprocessors' renames give is read under its source name.
        before = names_before(req.preprocessors)
        wanted = [v if v in ds.data_vars else before.get(v, v) for v in req.variables]
        missing = [v for v, w in zip(req.variables, wanted, strict=True) if w not in ds.data_vars]
        if missing:
            raise RequestError(
                "variables",
                missing,
                "are not variables of the source",
                f"Use names from {sorted(map(str, ds.data_vars))}",
            )
        ds = ds[list(dict.fromkeys(wanted))]
    ds = ds.assign_coords(
        {f"{INDEX_PREFIX}{d}": (d, np.arange(n, dtype=np.int64)) for d, n in ds.sizes.items()}
    )
    for name in ds.data_vars:
        ds[name].attrs = {**ds[name].attrs, SOURCE_ATTR: str(name)}
    return ds


def build_target(req: CacheRequest, source: Source | None = None) -> Target:
    """Apply the request's transforms lazily to the source and resolve the target chunks."""
    source = source or open_source(req)
    ds = apply_transforms(indexed_source(req, source), req.preprocessors, "preprocessors")
    check_names(ds, "preprocessors", req.preprocessors, "the preprocessors give")
    if req.variables:
        parts = []
        for name, specs in req.variables.items():
            if name not in ds.data_vars:
                now = {old: new for new, old in names_before(req.preprocessors).items()}
                raise RequestError(
                    f"variables['{name}']",
                    name,
                    "is no longer in the data after preprocessors",
                    f"Name it {now[name]!r}, as the preprocessors rename it"
                    if name in now
                    else "Name the variable as the preprocessors leave it",
                )
            parts.append(apply_transforms(ds[[name]], specs, f"variables['{name}']", name))
        try:
            ds = xr.merge(parts, join="exact", combine_attrs="override", compat="override")
        except ValueError as e:
            raise RequestError(
                "variables",
                list(req.variables),
                f"per-variable transforms left variables on different coordinates ({e})",
                "Select the same region for every variable (use preprocessors for that)",
            ) from e
        ds.attrs = dict(source.dataset.attrs)
        check_names(ds, "variables", req.variables, "the per-variable transforms give")
    ds.attrs = {**ds.attrs, **req.add_attrs}
    for dim, n in ds.sizes.items():
        if n == 0:
            raise RequestError(
                "preprocessors",
                req.preprocessors,
                f"leave no data along {dim!r}",
                "Widen the selection",
            )
    tiling = None
    if req.tiles is not None:
        ds, tiling = tile_dataset(ds, TileSpec.parse(req.tiles))
        check_names(ds, "tiles", req.tiles, "the tiles give")
    sources = {str(v): ds[v].attrs.get(SOURCE_ATTR) for v in ds.data_vars}
    chunks = _resolve_chunks(req, ds, source.layout, sources)
    if tiling is not None:
        chunks = tiling.fix_chunks(chunks, req.chunks)
    shards = _resolve_shards(req, ds, chunks)
    logger.debug("target: sizes %s, chunks %s, shards %s", dict(ds.sizes), chunks, shards)
    return Target(ds, source.layout, chunks, shards, sources, tiling)


def _source_dim(var: xr.DataArray, dim: str) -> str | None:
    for c in var.coords.values():
        if str(c.name).startswith(INDEX_PREFIX) and c.dims == (dim,):
            return str(c.name)[len(INDEX_PREFIX) :]
    return None


def _resolve_chunks(
    req: CacheRequest, ds: xr.Dataset, layout: SourceLayout, sources: Mapping[str, str | None]
) -> dict[str, dict[str, int]]:
    asked = {} if req.chunks == "auto" else dict(req.chunks)
    unknown = [d for d in asked if d not in ds.dims]
    if unknown:
        raise RequestError(
            f"chunks['{unknown[0]}']",
            asked[unknown[0]],
            "names no dimension of the target",
            f"Use dimensions of the target: {sorted(map(str, ds.dims))}",
        )
    out: dict[str, dict[str, int]] = {}
    for name in ds.data_vars:
        var = ds[name]
        src = sources.get(str(name))
        vlayout = layout.variables.get(src) if src else None
        per: dict[str, int] = {}
        for dim in var.dims:
            size = int(var.sizes[dim])
            if str(dim) in asked:
                c = asked[str(dim)]
                per[str(dim)] = size if c == -1 else min(int(c), size)
                continue
            sdim = _source_dim(var, str(dim))
            if vlayout is not None and sdim in vlayout.dims:
                per[str(dim)] = min(vlayout.typical_chunk(sdim), size)
            else:
                per[str(dim)] = size
            per[str(dim)] = max(per[str(dim)], 1)
        out[str(name)] = per
    return out


def _resolve_shards(
    req: CacheRequest, ds: xr.Dataset, chunks: Mapping[str, dict[str, int]]
) -> dict[str, dict[str, int]] | None:
    if not req.shards:
        return None
    out: dict[str, dict[str, int]] = {}
    for name, per in chunks.items():
        shard = {}
        for dim, c in per.items():
            s = req.shards.get(dim, c)
            s = int(ds.sizes[dim]) if s == -1 else s
            if s % c:
                raise RequestError(
                    f"shards['{dim}']",
                    s,
                    f"must be a multiple of the chunk length {c}",
                    f"Use {c * max(1, math.ceil(s / c))}",
                )
            shard[dim] = s
        out[name] = shard
    return out


def cached_source(req: CacheRequest) -> Source:
    """Open a source once per process (planning, recommendations and jobs share it).

    The key holds the files' sizes and modification times, so a changed source is reopened.
    """
    return _cached_source(req.source_json(), source_state(req))


def clear_source_cache() -> None:
    """Forget the sources this process opened: :func:`cached_source` opens them again."""
    _cached_source.cache_clear()


def fresh_source(req: CacheRequest) -> Source:
    """:func:`cached_source`, reopened if any source entry changed since it was opened.

    The per-process caches are keyed by cheap state (sizes and modification times of the files,
    a Zarr store's metadata documents); planning checks the full identity (a Zarr chunk
    rewritten in place) so that a long-lived process never plans from a stale source.
    """
    opened = _cached_source.cache_info().misses
    source = cached_source(req)
    if _cached_source.cache_info().misses != opened:
        return source  # just opened: its identity is current
    try:
        check_sources(req, source.layout.identity)
    except SourceChanged as e:
        logger.info("reopening the source: %s", e.change)
        _cached_source.cache_clear()
        _cached_target.cache_clear()
        source = cached_source(req)
    return source


def source_state(req: CacheRequest) -> str:
    """The source files' state (sizes and modification times): a key for per-process caches."""
    uris = [req.data_uri] if isinstance(req.data_uri, str) else list(req.data_uri)
    return canonical_json([file_stamp(u) for u in uris])


@lru_cache(maxsize=4)
def _cached_source(source_json: str, state: str) -> Source:
    fields = CacheRequest.model_validate_json(source_json)
    return open_source(fields)


def cached_target(request_json: str) -> Target:
    """Open and transform once per process (workers run many jobs of one request).

    Keyed like :func:`cached_source` by the files' state too: a long-lived process (a notebook,
    a reused dask worker) must not write a rewritten source's old values.
    """
    req = CacheRequest.model_validate_json(request_json)
    return _cached_target(request_json, source_state(req))


@lru_cache(maxsize=8)
def _cached_target(request_json: str, state: str) -> Target:
    req = CacheRequest.model_validate_json(request_json)
    return build_target(req, cached_source(req))
