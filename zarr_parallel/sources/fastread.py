"""Fast reads of netCDF4/HDF5 sources: raw chunk bytes by offset, inflated in threads.

xarray reads HDF5 through h5py behind one lock per process, inflating with zlib: a job's reads
neither scale over threads nor approach what the machine can do (docs/design.md §8). This module
reads the same values another way, for the cases where it provably gives exactly what xarray gives:

1. Per file and variable, the HDF5 chunk index (byte offset, size and filter mask of every stored
   chunk) is read once through h5py and cached per process.
2. A job's region is mapped back onto source indices through the target's ``_zpi_<dim>`` index
   coordinates (:mod:`zarr_parallel.sources.target`), so only the chunks holding needed elements are
   read.
3. Each chunk is read with ``os.pread`` (no HDF5 call, no lock), inflated with libdeflate
   (``deflate``), un-shuffled with numpy and copied into a compact buffer, in a thread pool.
4. The buffer is put in target order and decoded with xarray's own CF rules.

Anything outside what is supported (other filters, remote files, value-changing transforms,
time-like or string variables, open options) returns ``None`` from :func:`fast_plan`, and the
caller uses the xarray path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.planning.inputs import ArrayInput
from zarr_parallel.planning.memory import FAST_READ_THREADS
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import is_remote
from zarr_parallel.sources.hdf5_chunks import (
    ChunkTask,
    H5Storage,
    ReadStats,
    Unsupported,
    h5_storage,
    read_chunks,
)
from zarr_parallel.sources.target import INDEX_PREFIX, Target, cached_source

logger = logging.getLogger(__name__)

#: Set ``ZARR_PARALLEL_FAST_READ=0`` to always read through xarray (comparisons, debugging).
FAST_READ_ENV = "ZARR_PARALLEL_FAST_READ"
#: Transforms that only select, reorder or rename indices (or touch attributes/encoding): the
#: ``_zpi_`` coordinates then say exactly where every target element comes from. ``astype`` is
#: applied as the last step, as xarray does. Anything else (plug-ins included) falls back.
INDEX_ONLY_TRANSFORMS = frozenset(
    {
        "sel",
        "subset",
        "isel",
        # Planned as an isel of the positions kept (transforms/registry.py): the index follows.
        "drop_sel",
        "drop_isel",
        "rename",
        "reverse",
        "reverse_axis",
        "roll",
        "transpose",
        "sortby",
        "squeeze",
        "drop_vars",
        "assign_attrs",
        "encoding",
        "astype",
    }
)
#: Encoding keys CF decoding reads (xarray moves them from attributes to encoding when it opens).
_CF_KEYS = ("_FillValue", "missing_value", "scale_factor", "add_offset", "_Unsigned")


def process_cores() -> int:
    """Cores this process may use: ``ZARR_PARALLEL_THREADS`` if set, else its CPU affinity.

    Worker processes that share a node set ``ZARR_PARALLEL_THREADS`` to their share of its cores
    (:func:`zarr_parallel.orchestration.runners.worker_environment`), so that they do not each start
    a thread per core and fight over the same cores.
    """
    env = os.environ.get("ZARR_PARALLEL_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def reader_threads() -> int:
    """Threads used to read and inflate chunks: :func:`process_cores`, at most
    :data:`~zarr_parallel.planning.memory.FAST_READ_THREADS`."""
    # The memory model counts at most FAST_READ_THREADS chunks in flight.
    return min(process_cores(), FAST_READ_THREADS)


@dataclass(frozen=True)
class FastVar:
    """How to read one target variable by raw chunk reads.

    ``axes[i]`` is, for target dimension ``i``, the source dimension position it indexes;
    ``index[i]`` the source index of every target index along it. ``fixed`` holds source
    dimensions selected to one index (dropped from the target).
    """

    name: str
    source_name: str
    group: str | None
    dims: tuple[str, ...]
    source_dims: tuple[str, ...]
    axes: tuple[int, ...]
    index: tuple[np.ndarray, ...]
    fixed: Mapping[int, int]
    files: tuple[str, ...]
    concat_axis: int | None
    cf_attrs: Mapping[str, Any]
    decoded_dtype: np.dtype[Any]
    dtype: np.dtype[Any]

    @cached_property
    def file_starts(self) -> tuple[int, ...]:
        """Where each file starts along the concatenated axis (and the total length).

        Read once per :class:`FastVar`, which is made per source state (a file grown in place
        gets a new one), so the starts are never those of an older file.
        """
        return _file_starts(self.files, self.source_name, self.group, self.concat_axis)


def _file_starts(
    files: tuple[str, ...], name: str, group: str | None, axis: int | None
) -> tuple[int, ...]:
    # Only shapes: opened lazily at the first read, not at planning (many files are cheap).
    import h5py

    starts = [0]
    for f in files:
        length = 0
        if axis is not None:
            with h5py.File(f, "r") as h5:
                length = int((h5[group][name] if group else h5[name]).shape[axis])
        starts.append(starts[-1] + length)
    return tuple(starts)


def fast_plan(target: Target, req: CacheRequest, name: str) -> FastVar | None:
    """A :class:`FastVar` when the fast path reads ``name`` exactly as xarray would, else None."""
    try:
        return _fast_plan(target, req, name)
    except Unsupported as e:
        logger.info("fast read not used for %s: %s", name, e)
        return None


def mark_fast(target: Target, req: CacheRequest, inputs: Sequence[ArrayInput]) -> list[ArrayInput]:
    """Planner inputs with ``fast`` set for the variables the fast path will read.

    The planner then sizes those jobs by the fast path's memory model. Set
    ``ZARR_PARALLEL_FAST_READ=0`` (planning and workers alike) to plan and run the xarray path.
    """
    if os.environ.get(FAST_READ_ENV, "1") == "0":
        return list(inputs)
    return [replace(a, fast=fast_plan(target, req, a.name) is not None) for a in inputs]


def _fast_plan(target: Target, req: CacheRequest, name: str) -> FastVar:
    specs = _check_source_and_transforms(target, req)
    layout = target.layout
    src = target.sources.get(name)
    vlayout = layout.variables.get(src) if src else None
    if src is None or vlayout is None:
        raise Unsupported("no source variable")
    var = target.dataset[name]
    source_dims = vlayout.dims
    axes, index, fixed = _source_axes(var, source_dims)
    group = req.open_options.get("group")
    concat_axis = (
        source_dims.index(layout.concat_dim)
        if layout.concat_dim and layout.concat_dim in source_dims
        else None
    )
    # The files holding this variable (files may hold different variables, docs/design.md §2b).
    mine = layout.files_of(src)
    files = tuple(mine) if concat_axis is not None else tuple(mine[:1])
    cf_attrs, decoded = _decoding(req, src, h5_storage(files[0], src, group).dtype)
    dtype = np.dtype(var.dtype)
    if dtype != decoded and "astype" not in {str(s.get("type")) for s in specs}:
        raise Unsupported(f"target dtype {dtype} differs from the decoded {decoded}")
    return FastVar(
        name,
        src,
        group,
        tuple(str(d) for d in var.dims),
        source_dims,
        axes,
        index,
        fixed,
        files,
        concat_axis,
        cf_attrs,
        decoded,
        dtype,
    )


def _check_source_and_transforms(target: Target, req: CacheRequest) -> list[dict[str, Any]]:
    """Refuse sources and transforms the fast path cannot read exactly; the transform specs."""
    layout = target.layout
    if getattr(target, "tiling", None) is not None:
        raise Unsupported("tiled targets are built by their own lazy arrays")
    if layout.engine not in ("h5netcdf", "netcdf4"):
        raise Unsupported(f"engine {layout.engine}")
    if set(req.open_options) - {"group"}:
        raise Unsupported(f"open_options {sorted(req.open_options)} change how xarray decodes")
    if any(is_remote(f) for f in layout.files):
        raise Unsupported("remote files")
    specs = list(req.preprocessors) + [s for v in (req.variables or {}).values() for s in v]
    for spec in specs:
        kind = str(spec.get("type"))
        if kind not in INDEX_ONLY_TRANSFORMS:
            raise Unsupported(f"transform {kind!r} may change values")
        if kind == "roll" and not bool(spec.get("roll_coords", True)):
            raise Unsupported("roll with roll_coords=False moves data but not the index")
    return specs


def _source_axes(
    var: xr.DataArray, source_dims: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[np.ndarray, ...], dict[int, int]]:
    """Per target dimension the source axis it indexes and the source index of each element,
    and the source axes selected to one index (``FastVar.axes``, ``.index``, ``.fixed``)."""
    axes: list[int] = []
    index: list[np.ndarray] = []
    for dim in var.dims:
        coord = _index_coord(var, str(dim))
        sdim = str(coord.name)[len(INDEX_PREFIX) :]
        if sdim not in source_dims or source_dims.index(sdim) in axes:
            raise Unsupported(f"dimension {dim!r} does not map onto one source dimension")
        axes.append(source_dims.index(sdim))
        index.append(np.asarray(coord.values, dtype=np.int64))
    fixed: dict[int, int] = {}
    for c in var.coords.values():
        cname = str(c.name)
        if cname.startswith(INDEX_PREFIX) and c.ndim == 0:
            sdim = cname[len(INDEX_PREFIX) :]
            if sdim in source_dims and source_dims.index(sdim) not in axes:
                fixed[source_dims.index(sdim)] = int(c.values)
    if len(axes) + len(fixed) != len(source_dims):
        raise Unsupported("some source dimensions are neither indexed nor fixed")
    return tuple(axes), tuple(index), fixed


def _index_coord(var: xr.DataArray, dim: str) -> xr.DataArray:
    """The (last) ``_zpi_`` index coordinate along ``dim``."""
    coord: xr.DataArray | None = None
    for c in var.coords.values():
        if str(c.name).startswith(INDEX_PREFIX) and c.dims == (dim,):
            coord = c
    if coord is None:
        raise Unsupported(f"dimension {dim!r} has no source index")
    return coord


def _decoding(
    req: CacheRequest, src: str, stored: np.dtype[Any]
) -> tuple[dict[str, Any], np.dtype[Any]]:
    """The CF attributes that decode ``src`` and the dtype decoding gives, checked against
    what xarray gave and against the HDF5 dtype ``stored``."""
    source_var = _source_variable(req, src)
    enc = source_var.encoding
    on_disk = np.dtype(enc.get("dtype", source_var.dtype))
    if on_disk != stored:
        raise Unsupported(f"on-disk dtype {on_disk} differs from the HDF5 dtype")
    cf_attrs = {k: enc[k] for k in _CF_KEYS if k in enc}
    probe = _decode(np.zeros((1,), dtype=on_disk), ("x",), cf_attrs, src)
    if probe.dtype != np.dtype(source_var.dtype):
        raise Unsupported(f"decoding gives {probe.dtype}, xarray gave {source_var.dtype}")
    return cf_attrs, probe.dtype


def _source_variable(req: CacheRequest, src: str) -> xr.DataArray:
    """The source variable as xarray opened it (its encoding holds the CF attributes)."""
    return cached_source(req).dataset[src]


def _decode(raw: np.ndarray, dims: Sequence[str], attrs: Mapping[str, Any], name: str) -> Any:
    """CF-decode raw values exactly as xarray does (its own coders)."""
    fill = attrs.get("_FillValue")
    if raw.dtype.kind == "f" and set(attrs) <= {"_FillValue"} and (fill is None or _isnan(fill)):
        # Masking NaN with NaN changes nothing: skip xarray's copy.
        return raw
    var = xr.Variable(tuple(dims), raw, attrs=dict(attrs))
    decoded = xr.conventions.decode_cf_variable(
        name, var, decode_times=False, decode_timedelta=False, stack_char_dim=False
    )
    return np.asarray(decoded.values)


def _isnan(value: Any) -> bool:
    try:
        return bool(np.all(np.isnan(np.asarray(value, dtype="float64"))))
    except (TypeError, ValueError):
        return False


def read_region(
    fv: FastVar,
    region: Mapping[str, slice],
    threads: int | None = None,
    out: Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray] | None = None,
) -> tuple[np.ndarray, ReadStats]:
    """Read the target region of ``fv`` (``{target dim: slice}``), decoded, in target order.

    Every stored chunk holding needed elements is read once and its elements are copied
    straight to their target positions (selections, flips, rolls and transposes included), so
    the only region-sized buffer is the result itself (plus xarray's decoded copy when decoding
    changes the dtype, e.g. packed integers). ``out(shape, dtype)``, when given, provides that
    buffer (e.g. :func:`zarr_parallel.buffers.take`).
    """
    nthreads = threads or reader_threads()
    stats = ReadStats(threads=nthreads)
    picks = [fv.index[i][region.get(dim, slice(None))] for i, dim in enumerate(fv.dims)]
    storages = [h5_storage(f, fv.source_name, fv.group) for f in fv.files]
    tasks = _chunk_tasks(fv, storages, picks)
    shape, dtype = tuple(p.size for p in picks), storages[0].dtype
    box = read_chunks(tasks, shape, dtype, stats, out(shape, dtype) if out else None)
    values = _decode_in_place(box, fv)
    if values.dtype != fv.dtype:
        values = values.astype(fv.dtype)
    return values, stats


def _decode_in_place(box: np.ndarray, fv: FastVar) -> np.ndarray:
    """CF-decode ``box`` as xarray would, in place where decoding keeps the dtype."""
    attrs = fv.cf_attrs
    if box.dtype.kind == "f" and set(attrs) <= {"_FillValue", "missing_value"}:
        # Masking only: elements equal to a fill value become NaN, the dtype stays (xarray's
        # CFMaskCoder does the same with a copy). NaN fill values change nothing.
        for key in ("_FillValue", "missing_value"):
            if key in attrs:
                for fill in np.atleast_1d(np.asarray(attrs[key], dtype=box.dtype)):
                    if not np.isnan(fill):
                        box[box == fill] = np.nan
        return box
    return np.asarray(_decode(box, [f"d{i}" for i in range(box.ndim)], attrs, fv.source_name))


def _as_index(values: np.ndarray) -> slice | np.ndarray:
    """``values`` as a slice when it is a step ±1 progression (a view, no copy), else itself."""
    n = values.size
    if n == 0:
        return values
    first, last = int(values[0]), int(values[-1])
    if n == 1 or (last - first == n - 1 and np.all(np.diff(values) == 1)):
        return slice(first, last + 1)
    if first - last == n - 1 and np.all(np.diff(values) == -1):
        return slice(first, None if last == 0 else last - 1, -1)
    return values


def _groups(keys: np.ndarray, local: np.ndarray) -> list[tuple[int, Any, Any]]:
    """Group target positions by chunk key: (key, target positions, positions in the chunk)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    out = []
    for part in np.split(order, cuts):
        out.append((int(keys[part[0]]), _as_index(part), _as_index(local[part])))
    return out


def _chunk_len(storage: H5Storage, axis: int) -> int:
    return storage.chunks[axis] if storage.chunks else storage.shape[axis]


def _chunk_tasks(
    fv: FastVar, storages: Sequence[H5Storage], picks: Sequence[np.ndarray]
) -> list[ChunkTask]:
    """Per stored chunk touched, where its needed elements go in the target region."""
    ndim = len(fv.source_dims)
    starts = np.asarray(fv.file_starts, dtype=np.int64)
    for axis in range(ndim):
        if axis != fv.concat_axis and len({_chunk_len(st, axis) for st in storages}) > 1:
            raise Unsupported("files are chunked differently along a non-concatenated axis")
    # Along the concatenated axis a chunk's key encodes (file, chunk): file * n_chunks_max + chunk.
    n_chunks_max = 1 + max(
        (st.shape[fv.concat_axis] // _chunk_len(st, fv.concat_axis) for st in storages)
        if fv.concat_axis is not None
        else [0]
    )
    per_dim = _groups_per_dim(fv, storages, picks, starts, n_chunks_max)
    fixed_file, fixed_origin, fixed_local = _fixed_positions(fv, storages, starts)
    kept = [a for a in range(ndim) if a not in fixed_local]
    perm = tuple(kept.index(a) for a in fv.axes)
    tasks: list[ChunkTask] = []
    for combo in np.ndindex(*[len(g) for g in per_dim]):
        picked = [per_dim[i][k] for i, k in enumerate(combo)]
        origin = [0] * ndim
        file_idx = fixed_file if fixed_file is not None else 0
        for i, axis in enumerate(fv.axes):
            key = picked[i][0]
            if axis == fv.concat_axis:
                file_idx, c = divmod(key, n_chunks_max)
                origin[axis] = c * _chunk_len(storages[file_idx], axis)
            else:
                origin[axis] = key * _chunk_len(storages[0], axis)
        for axis, o in fixed_origin.items():
            origin[axis] = o
        tasks.append(
            (
                storages[file_idx],
                tuple(origin),
                fixed_local,
                perm,
                tuple(g[1] for g in picked),
                tuple(g[2] for g in picked),
            )
        )
    return tasks


def _groups_per_dim(
    fv: FastVar,
    storages: Sequence[H5Storage],
    picks: Sequence[np.ndarray],
    starts: np.ndarray,
    n_chunks_max: int,
) -> list[list[tuple[int, Any, Any]]]:
    """Per target dimension: groups of (chunk key, target positions, chunk positions)."""
    per_dim: list[list[tuple[int, Any, Any]]] = []
    for i, axis in enumerate(fv.axes):
        p = picks[i]
        if axis == fv.concat_axis:
            f = np.searchsorted(starts, p, side="right") - 1
            local_all = p - starts[f]
            clens = np.array([_chunk_len(st, axis) for st in storages], dtype=np.int64)[f]
            c = local_all // clens
            keys = f * n_chunks_max + c
            local = local_all - c * clens
        else:
            clen = _chunk_len(storages[0], axis)
            keys = p // clen
            local = p - keys * clen
        per_dim.append(_groups(keys, local))
    return per_dim


def _fixed_positions(
    fv: FastVar, storages: Sequence[H5Storage], starts: np.ndarray
) -> tuple[int | None, dict[int, int], dict[int, int]]:
    """For the source axes selected to one index: the file holding it (if that axis is the
    concatenated one), the origin of its chunk and its position in the chunk, per axis."""
    fixed_file: int | None = None
    fixed_origin: dict[int, int] = {}
    fixed_local: dict[int, int] = {}
    for axis, k in fv.fixed.items():
        if axis == fv.concat_axis:
            fixed_file = int(np.searchsorted(starts, k, side="right") - 1)
            k = k - int(starts[fixed_file])
            clen = _chunk_len(storages[fixed_file], axis)
        else:
            clen = _chunk_len(storages[0], axis)
        fixed_origin[axis] = (k // clen) * clen
        fixed_local[axis] = k - fixed_origin[axis]
    return fixed_file, fixed_origin, fixed_local
