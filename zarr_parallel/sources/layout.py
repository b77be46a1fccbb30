"""A source's real on-disk chunk layout, read from its storage (docs/design.md §3.2).

HDF5 chunking comes through h5py, a Zarr store's from its array metadata, and file boundaries
along the concatenation dimension of a multi-file source; a kerchunk reference's layout is read
from its ``.zarray`` / ``zarr.json`` (:mod:`zarr_parallel.sources.references`). It is never
inferred from dask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.remote import fsspec_options_for, readable_file


@dataclass(frozen=True)
class VarLayout:
    """On-disk chunk grid of one source variable.

    ``boundaries[i]`` are the chunk boundaries along dimension ``dims[i]``, from 0 to its
    length; irregular grids (e.g. file boundaries) are allowed.
    """

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    boundaries: tuple[tuple[int, ...], ...]
    read_itemsize: int
    contiguous: bool = False

    def chunk_lengths(self, dim: str) -> np.ndarray:
        """Lengths of the chunks along ``dim``."""
        return np.diff(np.asarray(self.boundaries[self.dims.index(dim)], dtype=np.int64))

    def typical_chunk(self, dim: str) -> int:
        """The nominal chunk length along ``dim`` (what 'keep the source chunks' keeps).

        The largest length: file ends and the array's end only ever shorten chunks.
        """
        lengths = self.chunk_lengths(dim)
        return int(lengths.max()) if lengths.size else 1


@dataclass(frozen=True)
class FileGroup:
    """Variables that come from the same files of a multi-file source (docs/design.md §2b, UX).

    ERA5 and CMIP6 downloads hold one variable per file: each variable's chunk grid, identity
    and fast reads come from its own files, in order along the joining dimension.
    """

    variables: tuple[str, ...]
    files: tuple[str, ...]
    #: Per file, its length along the joining dimension (empty when the group has none).
    lengths: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON form (in the layout's ``groups``)."""
        return {
            "variables": list(self.variables),
            "files": list(self.files),
            "lengths": list(self.lengths),
        }


def group_files(layout: Mapping[str, Any], name: str) -> tuple[list[str], list[int]]:
    """The files holding variable ``name`` and their lengths, from a layout's JSON form.

    A source without variable groups holds every variable in every file.
    """
    for group in layout.get("groups") or []:
        if name in group.get("variables", []):
            return [str(f) for f in group["files"]], [int(n) for n in group["lengths"]]
    return [str(f) for f in layout.get("files") or []], [
        int(n) for n in layout.get("file_lengths") or []
    ]


@dataclass(frozen=True)
class SourceLayout:
    """Chunk layout of every variable of a source, with what identifies the source's state."""

    engine: str
    files: tuple[str, ...]
    concat_dim: str | None
    variables: Mapping[str, VarLayout]
    digest: str
    #: True when data is read over the network (a URL, or references to URLs).
    remote: bool = False
    #: Per file, what identified its state when opened (see ``file_stamp``); re-caching compares
    #: these to tell unchanged files from rewritten ones.
    file_states: tuple[Any, ...] = ()
    #: Per file, its length along ``concat_dim`` (multi-file sources only).
    file_lengths: tuple[int, ...] = ()
    #: Every source entry as planned (see :mod:`zarr_parallel.sources.identity`); jobs check against
    #: it.
    identity: Mapping[str, Any] | None = None
    #: Variables grouped by the files that hold them, when files hold different variables.
    groups: tuple[FileGroup, ...] = ()
    #: Steps some variables have and others do not yet, left out (one sentence each).
    pending: tuple[str, ...] = ()

    def files_of(self, name: str) -> tuple[str, ...]:
        """The files holding variable ``name``, in order along the joining dimension."""
        for group in self.groups:
            if name in group.variables:
                return group.files
        return self.files

    def lengths_of(self, name: str) -> tuple[int, ...]:
        """Per file of :meth:`files_of`, its length along the joining dimension."""
        for group in self.groups:
            if name in group.variables:
                return group.lengths
        return self.file_lengths

    def to_json(self) -> dict[str, Any]:
        """JSON description (stored in the cache's manifest)."""
        # Groups and pending steps only when there are some: single-group layouts read as before.
        extra: dict[str, Any] = {}
        if self.groups:
            extra["groups"] = [g.to_json() for g in self.groups]
        if self.pending:
            extra["pending"] = list(self.pending)
        return {
            **extra,
            "engine": self.engine,
            "files": list(self.files),
            "concat_dim": self.concat_dim,
            "digest": self.digest,
            "file_states": list(self.file_states),
            "file_lengths": list(self.file_lengths),
            "identity": self.identity,
            "variables": {
                name: {
                    "dims": list(v.dims),
                    "shape": list(v.shape),
                    "chunks": [sorted({int(x) for x in np.diff(b)}) for b in v.boundaries],
                    "read_itemsize": v.read_itemsize,
                    "contiguous": v.contiguous,
                }
                for name, v in self.variables.items()
            },
        }


def hdf5_layout(
    files: Sequence[str],
    ds: xr.Dataset,
    concat_dim: str | None,
    file_lengths: Sequence[int],
    req: CacheRequest,
    groups: Sequence[FileGroup] = (),
) -> dict[str, VarLayout]:
    """The chunk grid of every variable, read from the files that hold it.

    With ``groups`` (files holding different variables) each group's grid comes from its own
    files, so every variable keeps the chunking its files have.
    """
    if not groups:
        return _hdf5_group_layout(files, ds, concat_dim, file_lengths, req)
    layouts: dict[str, VarLayout] = {}
    for g in groups:
        part = ds[[v for v in g.variables if v in ds.data_vars]]
        layouts.update(_hdf5_group_layout(g.files, part, concat_dim, g.lengths, req))
    return layouts


def _hdf5_group_layout(
    files: Sequence[str],
    ds: xr.Dataset,
    concat_dim: str | None,
    file_lengths: Sequence[int],
    req: CacheRequest,
) -> dict[str, VarLayout]:
    group = req.open_options.get("group")
    names = [str(n) for n in ds.data_vars]
    along = [n for n in names if concat_dim and concat_dim in ds[n].dims]
    # Each file is opened once for all its variables (a remote file costs round trips): the
    # first file for every variable, the others only for those concatenated across files.
    per_file = [
        _hdf5_chunks(readable_file(f, req), names if i == 0 else along, group, ds)
        for i, f in enumerate(files if along else files[:1])
    ]
    layouts: dict[str, VarLayout] = {}
    for name in names:
        var = ds[name]
        dims = tuple(str(d) for d in var.dims)
        mine = [table[name] for table in per_file] if name in along else [per_file[0][name]]
        boundaries: list[tuple[int, ...]] = []
        for i, dim in enumerate(dims):
            if concat_dim == dim:
                offsets = np.cumsum([0, *file_lengths])
                bounds: list[int] = []
                for off, (shape, chunk, _, _) in zip(offsets[:-1], mine, strict=True):
                    bounds.extend(int(off + b) for b in range(0, shape[i], chunk[i]))
                bounds.append(int(offsets[-1]))
                # Steps left out (waiting for other variables' files) end the grid early.
                end = int(var.shape[i])
                boundaries.append(tuple(sorted({min(b, end) for b in bounds})))
            else:
                shape, chunk, _, _ = mine[0]
                boundaries.append((*range(0, shape[i], chunk[i]), shape[i]))
        layouts[name] = VarLayout(
            name,
            dims,
            tuple(int(s) for s in var.shape),
            tuple(boundaries),
            mine[0][2],
            mine[0][3],
        )
    return layouts


_Chunking = tuple[tuple[int, ...], tuple[int, ...], int, bool]


def _hdf5_chunks(
    path: Any, names: Sequence[str], group: str | None, ds: xr.Dataset
) -> dict[str, _Chunking]:
    """(shape, chunk shape, stored item size, contiguous) of each named variable in one file."""
    import h5py

    try:
        closing = contextlib.closing(path) if hasattr(path, "read") else contextlib.nullcontext()
        with closing, h5py.File(path, "r") as f:
            root = f[group] if group else f
            out: dict[str, _Chunking] = {}
            for name in names:
                node = root[name]
                shape = tuple(int(s) for s in node.shape)
                chunks = node.chunks
                itemsize = int(node.dtype.itemsize)
                if chunks is None:
                    out[name] = (shape, tuple(max(1, s) for s in shape), itemsize, True)
                else:
                    out[name] = (shape, tuple(int(c) for c in chunks), itemsize, False)
            return out
    except (OSError, KeyError):
        # Not HDF5 (netCDF3 classic): read as contiguous, one chunk per file.
        out = {}
        for name in names:
            var = ds[name]
            enc_dtype = np.dtype(var.encoding.get("dtype", var.dtype))
            out[name] = (
                tuple(int(s) for s in var.shape),
                tuple(max(1, int(s)) for s in var.shape),
                int(enc_dtype.itemsize),
                True,
            )
        return out


def zarr_layout(path: str, ds: xr.Dataset, req: CacheRequest) -> dict[str, VarLayout]:
    import zarr

    group = zarr.open_group(path, mode="r", storage_options=fsspec_options_for(path, req) or None)
    layouts: dict[str, VarLayout] = {}
    for name, var in ds.data_vars.items():
        arr = group[str(name)]
        assert isinstance(arr, zarr.Array)
        chunk = tuple(int(c) for c in arr.chunks)
        itemsize = int(np.dtype(str(arr.dtype)).itemsize) if hasattr(arr, "dtype") else 4
        layouts[str(name)] = regular_layout(str(name), var, tuple(arr.shape), chunk, itemsize)
    return layouts


def regular_layout(
    name: str, var: xr.DataArray, shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int
) -> VarLayout:
    bounds = tuple(
        (*range(0, s, max(1, c)), s) if s else (0,) for s, c in zip(shape, chunk, strict=True)
    )
    return VarLayout(name, tuple(str(d) for d in var.dims), shape, bounds, itemsize)
