"""Open a source lazily and read its real on-disk chunk layout (DESIGN §3.2).

The layout comes from the storage itself: HDF5 chunking through h5py, the ``.zarray`` /
``zarr.json`` of a kerchunk reference or a Zarr store, and file boundaries along the
concatenation dimension of a multi-file source. It is never inferred from dask.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.request import open_options
from zarr_parallel.request.model import CacheRequest, is_remote
from zarr_parallel.run import policy
from zarr_parallel.sources import combine, identity, remote

logger = logging.getLogger(__name__)


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
class SourceLayout:
    """Chunk layout of every variable of a source, with what identifies the source's state."""

    engine: str
    files: tuple[str, ...]
    concat_dim: str | None
    variables: Mapping[str, VarLayout]
    digest: str
    #: True when data is read over the network (a URL, or references to URLs).
    remote: bool = False
    #: Per file, what identified its state when opened (see ``_file_state``); re-caching compares
    #: these to tell unchanged files from rewritten ones.
    file_states: tuple[Any, ...] = ()
    #: Per file, its length along ``concat_dim`` (multi-file sources only).
    file_lengths: tuple[int, ...] = ()
    #: Every source entry as planned (see :mod:`zarr_parallel.sources.identity`); jobs check against
    #: it.
    identity: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON description (stored in the cache's manifest)."""
        return {
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


@dataclass(frozen=True)
class Source:
    """A lazily opened source (dask arrays on the on-disk chunks) with its layout."""

    dataset: xr.Dataset
    layout: SourceLayout
    #: A kerchunk source's reference document (read once; layout and checks use it).
    refs: Mapping[str, Any] | None = None


def detect_engine(req: CacheRequest) -> str:
    """The engine named in the request, or detected from ``data_uri``."""
    return open_options.detect_engine(req.data_uri, req.engine)


def open_source(req: CacheRequest) -> Source:
    """Open the request's source lazily, inspect its chunk layout and record its identity."""
    engine = detect_engine(req)
    uris = _expand_remote_globs(req)
    refs: dict[str, Any] = {}
    file_lengths: list[int] = []
    try:
        if engine == "kerchunk":
            refs = _kerchunk_refs(uris[0], req)
            # In a deployment run the reference may only lead where the operator's policy allows.
            policy.check_references(refs, req)
            ds = _open_kerchunk(refs, req)
        elif engine == "zarr":
            ds = _open_zarr(uris[0], req)
        else:
            ds, files, concat_dim, file_lengths = _open_netcdf(uris, engine, req)
    except RequestError:
        raise
    except Exception as e:  # libraries raise many types for an unreadable source
        raise _unreadable(e, engine, uris, refs, req) from (
            e if remote.redact_text(str(e)) == str(e) else None
        )
    if engine == "kerchunk":
        layout_vars = _kerchunk_layout(refs, ds)
        files, concat_dim = [uris[0]], None
    elif engine == "zarr":
        layout_vars = _zarr_layout(uris[0], ds, req)
        files, concat_dim = [uris[0]], None
    else:
        layout_vars = _hdf5_layout(files, ds, concat_dim, file_lengths, req)
    stats = [_file_state(f) for f in files]
    if refs:
        # A remote reference file has no mtime: its content identifies the source's state.
        stats.append([fingerprint(canonical_json(refs))])
    if concat_dim is None:
        for dim in ds.dims:
            if dim in ds.coords and np.issubdtype(ds[dim].dtype, np.datetime64):
                combine.check_steps(ds, str(dim), files, [int(ds.sizes[dim])])
    ident = record_identity(engine, files, refs, req)
    digest = fingerprint(
        canonical_json([engine, list(files), concat_dim, stats]),
        canonical_json(
            {k: [v.dims, v.boundaries, v.read_itemsize] for k, v in layout_vars.items()}
        ),
        # Every source entry as planned (a Zarr chunk rewritten in place, a file a reference
        # points at): a changed source is never resumed into or reported up to date.
        canonical_json(identity.digest_view(ident)),
    )
    is_url = any(is_remote(f) for f in files) or (bool(refs) and _remote_protocol(refs) != "file")
    layout = SourceLayout(
        engine,
        tuple(files),
        concat_dim,
        layout_vars,
        digest,
        is_url,
        tuple(stats[: len(files)]),
        tuple(file_lengths),
        ident,
    )
    _log_layout(layout)
    return Source(ds, layout, refs or None)


def _open_zarr(uri: str, req: CacheRequest) -> xr.Dataset:
    with warnings.catch_warnings():
        # A store without consolidated metadata is read member by member, as intended;
        # xarray's advice to consolidate it is not the user's concern here.
        warnings.filterwarnings(
            "ignore", "Failed to open Zarr store with consolidated", RuntimeWarning
        )
        return xr.open_dataset(
            uri,
            engine="zarr",
            chunks={},
            storage_options=_options(uri, req) or None,
            **open_options.read_only("zarr", req.open_options),
        )


def _unreadable(
    e: Exception, engine: str, uris: Sequence[str], refs: Mapping[str, Any], req: CacheRequest
) -> RequestError:
    """The error for a source that could not be opened, naming unreadable URLs if any."""
    text = f"{type(e).__name__}: {e}"
    # Say which URLs cannot be read, and why, rather than the library's first error (a
    # Zarr store is a folder: its URL itself is not a file to probe).
    urls = [u for u in uris if is_remote(u) and engine != "zarr"]
    urls += referenced_urls(refs) if refs else []
    if urls:
        remote.check_readable(urls, req.storage_options, req.remote_concurrency, req.remote_retries)
    return RequestError(
        "data_uri",
        remote.redact(req.data_uri),
        f"could not be opened as {engine} ({remote.redact_text(text)})",
        "Check that the files are complete netCDF4/HDF5, kerchunk JSON or Zarr, that "
        "engine matches them, and for URLs that they exist and the credentials allow reading",
    )


def _log_layout(layout: SourceLayout) -> None:
    logger.info(
        "source: %d file(s) via %s%s, variables %s",
        len(layout.files),
        layout.engine,
        f", joined along {layout.concat_dim!r}" if layout.concat_dim else "",
        sorted(layout.variables),
    )
    for v in layout.variables.values():
        logger.debug(
            "layout of %s: dims %s, shape %s, chunks %s%s",
            v.name,
            v.dims,
            v.shape,
            [sorted({int(x) for x in np.diff(b)}) for b in v.boundaries],
            " (contiguous)" if v.contiguous else "",
        )


# ---------------------------------------------------------------------------------------------
# Source identity: recorded at planning, checked by every job and before publishing


_ZARR_ROOT_DOCS = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")


def record_identity(
    engine: str, files: Sequence[str], refs: Mapping[str, Any], req: CacheRequest
) -> identity.Identity:
    """Each source entry as it is now (see :mod:`zarr_parallel.sources.identity`)."""
    entries: dict[str, dict[str, Any]] = {}
    if engine == "kerchunk":
        ref = files[0]
        # A remote reference by its version headers (a HEAD per check, not the whole JSON;
        # its content is in the layout digest already).
        entries[ref] = _entry_state(ref, req)
        for url in referenced_urls(refs):
            # Files a reference points at on this machine; remote ones only through the
            # reference itself (a request per referenced file and job would cost too much).
            if not is_remote(url):
                path = url.removeprefix("file://")
                entries[path] = identity.file_state(path)
    elif engine == "zarr" and not is_remote(files[0]):
        store = files[0]
        for doc in _ZARR_ROOT_DOCS:
            if os.path.exists(os.path.join(store, doc)):
                entries[os.path.join(store, doc)] = identity.file_state(os.path.join(store, doc))
        with os.scandir(store) as found:
            for entry in sorted(found, key=lambda d: d.name):
                if entry.is_dir():
                    entries[entry.path] = identity.zarr_array_state(entry.path)
    elif engine == "zarr":
        # A remote store: its root metadata documents (listing every chunk would cost a
        # request per chunk prefix).
        for doc in _ZARR_ROOT_DOCS:
            url = f"{files[0].rstrip('/')}/{doc}"
            try:
                state = identity.url_state(url, _options(url, req))
            except PermissionError:  # S3 answers 403 for a missing key without list rights
                continue
            if not state.get("missing"):
                entries[url] = state
    else:
        for f in files:
            entries[f] = _entry_state(f, req)
    return identity.new_identity(entries)


def _entry_state(path: str, req: CacheRequest) -> dict[str, Any]:
    """A file's identity entry: its fsspec info if remote, else its ``stat``."""
    if is_remote(path):
        return identity.url_state(path, _options(path, req))
    return identity.file_state(path)


def _remote_checker(req: CacheRequest) -> identity.StateOf:
    """How a check measures remote entries now (one request each)."""

    def state(name: str, planned: Mapping[str, Any]) -> dict[str, Any]:
        return identity.url_state(name, _options(name, req))

    return state


def check_sources(req: CacheRequest, ident: Mapping[str, Any] | None) -> int:
    """Check every entry of the planned identity ``ident``; returns how many were checked.

    Raises
    ------
    SourceChanged
        Naming the entry that changed and what changed.
    """
    return identity.check_identity(ident, None, _remote_checker(req))


def job_entries(
    planned: Mapping[str, Any],
    refs: Mapping[str, Any] | None,
    variables: Sequence[str] | None,
    concat_range: tuple[int, int] | None,
) -> list[str]:
    """The identity entries a job reads.

    ``planned`` is the layout as planned (``SourceLayout.to_json``), ``refs`` a kerchunk
    source's references, ``variables`` the source variables the job reads (None: all) and
    ``concat_range`` its source index range along the joining dimension (None: all of it).
    """
    entries = dict((planned.get("identity") or {}).get("entries") or {})
    files = [str(f) for f in planned.get("files") or []]
    if variables is None or not files:
        return list(entries)
    if planned.get("engine") == "zarr":
        arrays = {os.path.join(files[0].rstrip("/"), v) for v in variables}
        return [e for e in entries if e in arrays or os.path.basename(e) in _ZARR_ROOT_DOCS]
    if planned.get("engine") == "kerchunk":
        return [files[0], *_referenced_entries(refs or {}, variables, entries)]
    return _files_in_range(files, planned.get("file_lengths") or [], concat_range)


def _files_in_range(
    files: Sequence[str], lengths: Sequence[int], concat_range: tuple[int, int] | None
) -> list[str]:
    """The files of a multi-file source holding steps ``[lo, hi)`` along the joining dimension."""
    if concat_range is None or len(lengths) != len(files):
        return list(files)
    starts = np.cumsum([0, *[int(n) for n in lengths]])
    lo, hi = concat_range
    return [f for i, f in enumerate(files) if starts[i] < hi and lo < starts[i + 1]]


def _referenced_entries(
    refs: Mapping[str, Any], variables: Sequence[str], entries: Mapping[str, Any]
) -> list[str]:
    """The local files a kerchunk reference points at for ``variables`` (identity entries)."""
    mine = {k: v for k, v in _refs_only(refs).items() if k.split("/")[0] in variables}
    used = referenced_urls({"refs": mine, "templates": refs.get("templates") or {}})
    return sorted({u.removeprefix("file://") for u in used} & set(entries))


def check_job_sources(
    req: CacheRequest,
    planned: Mapping[str, Any],
    refs: Mapping[str, Any] | None,
    variables: Sequence[str] | None,
    concat_range: tuple[int, int] | None,
) -> int:
    """Check the entries one job reads (see :func:`job_entries`) before it reads them.

    Returns the number of entries checked.

    Raises
    ------
    SourceChanged
        Naming the entry that changed and what changed.
    """
    names = job_entries(planned, refs, variables, concat_range)
    return identity.check_identity(planned.get("identity"), names, _remote_checker(req))


@lru_cache(maxsize=8)
def _read_concurrency(request_json: str) -> int:
    return CacheRequest.model_validate_json(request_json).remote_concurrency


def read_settings(request_json: str, layout: SourceLayout) -> dict[str, Any]:
    """Dask settings for a job's reads: ``remote_concurrency`` threads for remote sources, so
    that many chunk requests are in flight; synchronous for local files (HDF5 reads are
    serialised behind one lock anyway)."""
    if layout.remote:
        return {"scheduler": "threads", "num_workers": _read_concurrency(request_json)}
    return {"scheduler": "synchronous"}


def _file_state(path: str) -> list[Any]:
    """What identifies a file's state: size and modification time (the URL if remote)."""
    if is_remote(path):
        return [path]
    st = os.stat(path)
    if os.path.isdir(path):
        # A Zarr store: its metadata documents (cheap; a chunk rewritten in place is seen by
        # the identity, see target.fresh_source).
        meta = [os.path.join(path, m) for m in ("zarr.json", ".zmetadata", ".zgroup")]
        return [path, [os.stat(m).st_mtime_ns for m in meta if os.path.exists(m)]]
    return [path, st.st_size, st.st_mtime_ns]


def _options(uri: str, req: CacheRequest) -> dict[str, Any]:
    """fsspec options for opening ``uri`` in this process ({} for local paths)."""
    if not is_remote(uri):
        return {}
    return remote.fsspec_options(
        req.storage_options, remote.protocol_of(uri), req.remote_concurrency, req.remote_retries
    )


def _expand_remote_globs(req: CacheRequest) -> list[str]:
    """``data_uri`` as a list, with remote glob patterns (``s3://bucket/era5_*.nc``) expanded."""
    import fsspec

    uris = [req.data_uri] if isinstance(req.data_uri, str) else list(req.data_uri)
    out: list[str] = []
    for uri in uris:
        protocol = remote.protocol_of(uri)
        if not is_remote(uri) or protocol in ("http", "https") or not glob_magic(uri):
            out.append(uri)
            continue
        fs = fsspec.filesystem(protocol, **_options(uri, req))
        found = sorted(fs.glob(uri))
        if not found:
            raise RequestError(
                "data_uri", remote.redact_url(uri), "matches no files", "Check the pattern"
            )
        out += [f if "://" in f else f"{protocol}://{f}" for f in found]
    return out


def glob_magic(uri: str) -> bool:
    """True when a path has glob characters."""
    return any(c in uri for c in "*?[")


def _h5_target(uri: str, req: CacheRequest) -> Any:
    """What h5py and xarray open: the path itself, or an fsspec file object for a URL."""
    if not is_remote(uri):
        return uri
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **_options(uri, req))
    return fs.open(path, "rb")


#: Datasets read through Python file objects (remote netCDF), closed at exit: HDF5 files left
#: to the interpreter's final teardown outlive their file objects and crash it.
_FILE_OBJECT_DATASETS: list[xr.Dataset] = []


def _close_file_object_datasets() -> None:
    while _FILE_OBJECT_DATASETS:
        with contextlib.suppress(Exception):
            _FILE_OBJECT_DATASETS.pop().close()


def _open_nc(uri: str, req: CacheRequest, opts: dict[str, Any]) -> xr.Dataset:
    ds = xr.open_dataset(_h5_target(uri, req), **opts)
    if is_remote(uri):
        if not _FILE_OBJECT_DATASETS:
            atexit.register(_close_file_object_datasets)
        _FILE_OBJECT_DATASETS.append(ds)
    return ds


def _open_netcdf(
    uris: Sequence[str], engine: str, req: CacheRequest
) -> tuple[xr.Dataset, list[str], str | None, list[int]]:
    opts = {"engine": engine, "chunks": {}, **open_options.read_only(engine, req.open_options)}
    if len(uris) == 1:
        return _open_nc(uris[0], req, opts), [uris[0]], None, []
    parts = []
    for uri in uris:
        try:
            parts.append(_open_nc(uri, req, opts))
        except Exception as e:
            raise RequestError(
                "data_uri",
                remote.redact_url(uri),
                remote.redact_text(f"could not be opened ({remote.describe_failure(e)}: {e})"),
                "Remove or replace the damaged file (for a URL: check it exists and may be read)",
            ) from e
    _check_same_variables(parts, uris)
    concat_dim = _concat_dim(parts, uris)
    combine.check_calendars(parts, uris, concat_dim)
    order = sorted(range(len(parts)), key=lambda i: _first_label(parts[i], concat_dim))
    parts = [parts[i] for i in order]
    files = [uris[i] for i in order]
    try:
        ds = xr.concat(
            parts,
            dim=concat_dim,
            data_vars="minimal",
            coords="minimal",
            compat="override",
            join="exact",
            combine_attrs="override",
        )
    except ValueError as e:
        raise RequestError(
            "data_uri",
            [os.path.basename(f) for f in files],
            f"files do not combine along {concat_dim!r} ({e})",
            "Use files that share the same grid and variables",
        ) from e
    lengths = [int(p.sizes[concat_dim]) for p in parts]
    combine.check_steps(ds, concat_dim, files, lengths)
    ds = combine.harmonise_time_encoding(ds, parts, concat_dim)
    return ds, files, concat_dim, lengths


def _check_same_variables(parts: Sequence[xr.Dataset], uris: Sequence[str]) -> None:
    """Refuse files holding different variables: xarray would fill the gaps with NaN."""
    first = sorted(map(str, parts[0].data_vars))
    for uri, part in zip(uris[1:], parts[1:], strict=True):
        names = sorted(map(str, part.data_vars))
        if names != first:
            a, b = os.path.basename(uris[0]), os.path.basename(uri)
            raise RequestError(
                "data_uri",
                [a, b],
                f"files hold different variables ({a} has {first}, {b} has {names}); joining "
                "them would invent missing values",
                "Use files of one dataset with the same variables in each, or list only those",
            )


def _first_label(ds: xr.Dataset, dim: str) -> Any:
    return ds[dim].values[0] if dim in ds.coords else 0


def _concat_dim(parts: Sequence[xr.Dataset], uris: Sequence[str]) -> str:
    first, second = parts[0], parts[1]
    for dim in first.dims:
        if dim in first.coords and dim in second.coords:
            a, b = first[dim].values, second[dim].values
            if a.shape != b.shape or not np.array_equal(a, b):
                return str(dim)
    for dim in first.dims:
        if first.sizes[dim] != second.sizes.get(dim):
            return str(dim)
    raise RequestError(
        "data_uri",
        [os.path.basename(u) for u in uris[:2]],
        "files do not differ along any dimension, so they cannot be joined",
        "Pass the files of one dataset split along time (or another dimension)",
    )


def _hdf5_layout(
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
        _hdf5_chunks(_h5_target(f, req), names if i == 0 else along, group, ds)
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
                boundaries.append(tuple(bounds))
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


def _kerchunk_refs(path: str, req: CacheRequest) -> dict[str, Any]:
    """The reference file's JSON (read once: layout inspection needs nothing else)."""
    import fsspec

    with fsspec.open(path, "rt", **_options(path, req)) as f:
        return dict(json.load(f))


def _refs_only(data: Mapping[str, Any]) -> dict[str, Any]:
    return dict(data.get("refs", data))


_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


def referenced_urls(data: Mapping[str, Any]) -> list[str]:
    """The distinct files a kerchunk reference document points at (templates filled in)."""
    templates = {str(k): str(v) for k, v in dict(data.get("templates") or {}).items()}
    seen: dict[str, None] = {}
    for value in _refs_only(data).values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0]:
            url = _TEMPLATE.sub(lambda m: templates.get(m.group(1), m.group(0)), value[0])
            seen.setdefault(url, None)
    return list(seen)


def _remote_protocol(data: Mapping[str, Any]) -> str:
    for url in referenced_urls(data):
        if "://" in url:
            return url.split("://")[0]
    return "file"


def _open_kerchunk(data: dict[str, Any], req: CacheRequest) -> xr.Dataset:
    protocol = _remote_protocol(data)
    so: dict[str, Any] = {"fo": data, "remote_protocol": protocol}
    if protocol != "file":
        # Zarr opens the reference filesystem asynchronously; its target must match.
        so["remote_options"] = {
            **remote.fsspec_options(
                req.storage_options, protocol, req.remote_concurrency, req.remote_retries
            ),
            "asynchronous": True,
        }
    return xr.open_dataset(
        "reference://",
        engine="zarr",
        chunks={},
        backend_kwargs={"storage_options": so, "consolidated": False},
        **open_options.read_only("kerchunk", req.open_options),
    )


def _kerchunk_layout(data: Mapping[str, Any], ds: xr.Dataset) -> dict[str, VarLayout]:
    refs = _refs_only(data)
    layouts: dict[str, VarLayout] = {}
    for name, var in ds.data_vars.items():
        meta_raw = refs.get(f"{name}/.zarray") or refs.get(f"{name}/zarr.json")
        meta = json.loads(meta_raw) if isinstance(meta_raw, str) else dict(meta_raw or {})
        shape = tuple(int(s) for s in var.shape)
        if "chunks" in meta:
            chunk = tuple(int(c) for c in meta["chunks"])
            itemsize = np.dtype(meta["dtype"]).itemsize
        elif "chunk_grid" in meta:
            chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            itemsize = np.dtype(meta["data_type"]).itemsize
        else:
            chunk, itemsize = shape, np.dtype(var.dtype).itemsize
        layouts[str(name)] = _regular(str(name), var, shape, chunk, int(itemsize))
    return layouts


def _zarr_layout(path: str, ds: xr.Dataset, req: CacheRequest) -> dict[str, VarLayout]:
    import zarr

    group = zarr.open_group(path, mode="r", storage_options=_options(path, req) or None)
    layouts: dict[str, VarLayout] = {}
    for name, var in ds.data_vars.items():
        arr = group[str(name)]
        assert isinstance(arr, zarr.Array)
        chunk = tuple(int(c) for c in arr.chunks)
        itemsize = int(np.dtype(str(arr.dtype)).itemsize) if hasattr(arr, "dtype") else 4
        layouts[str(name)] = _regular(str(name), var, tuple(arr.shape), chunk, itemsize)
    return layouts


def _regular(
    name: str, var: xr.DataArray, shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int
) -> VarLayout:
    bounds = tuple(
        (*range(0, s, max(1, c)), s) if s else (0,) for s, c in zip(shape, chunk, strict=True)
    )
    return VarLayout(name, tuple(str(d) for d in var.dims), shape, bounds, itemsize)


def source_stem(req: CacheRequest) -> str:
    """Default cache name: the kerchunk file's or store's stem, or the files' common stem."""
    uris = [req.data_uri] if isinstance(req.data_uri, str) else list(req.data_uri)
    stems = [Path(u.rstrip("/")).name for u in uris]
    for suffix in (".json", ".zarr", ".nc", ".nc4", ".h5", ".hdf5"):
        stems = [s.removesuffix(suffix) for s in stems]
    if len(stems) == 1:
        return stems[0] or "cache"
    # A character-wise common prefix is what is wanted here: "era5_2020" and "era5_2021" share
    # the stem "era5".
    common = os.path.commonprefix(stems).rstrip("_-. 0123456789")  # noqa: RUF071
    return common or "cache"
