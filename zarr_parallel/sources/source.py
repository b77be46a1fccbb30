"""Open a request's source lazily, with its real on-disk chunk layout and its identity.

The layout comes from the storage itself (:mod:`zarr_parallel.sources.layout`); kerchunk
references are read by :mod:`zarr_parallel.sources.references`, several netCDF files are joined
by :mod:`zarr_parallel.sources.combine`, and what identifies each source entry is recorded by
:mod:`zarr_parallel.sources.identity`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.request import open_options
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import is_remote, protocol_of
from zarr_parallel.request.secrets import redact, redact_text, redact_url
from zarr_parallel.sources import combine, identity, merge
from zarr_parallel.sources.layout import SourceLayout, hdf5_layout, zarr_layout
from zarr_parallel.sources.references import (
    kerchunk_layout,
    open_references,
    read_references,
    referenced_urls,
    references_protocol,
)
from zarr_parallel.sources.remote import check_readable, fsspec_options_for

logger = logging.getLogger(__name__)

#: A check a kerchunk reference document must pass before anything it points at is read:
#: called with the references and the request, it raises :class:`RequestError` to refuse.
ReferenceCheck = Callable[[Mapping[str, Any], CacheRequest], None]
#: The checks installed by the layers above. The run layer installs the operator policy's
#: (:func:`zarr_parallel.run.policy.check_references`): in a deployment run a reference may only
#: lead where the policy allows, and this room needs no knowledge of deployments to enforce it.
_REFERENCE_CHECKS: list[ReferenceCheck] = []


def add_reference_check(check: ReferenceCheck) -> None:
    """Have every kerchunk reference opened in this process pass ``check`` (idempotent)."""
    if check not in _REFERENCE_CHECKS:
        _REFERENCE_CHECKS.append(check)


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
    try:
        if engine == "kerchunk":
            refs = read_references(uris[0], req)
            # In a deployment run the reference may only lead where the operator's policy allows
            # (the check the run layer installed, see add_reference_check).
            for check in _REFERENCE_CHECKS:
                check(refs, req)
        joined = _open_dataset(engine, uris, refs, req)
        ds, files, concat_dim, file_lengths = (
            joined.dataset,
            joined.files,
            joined.concat_dim,
            joined.file_lengths,
        )
    except RequestError:
        raise
    except Exception as e:  # libraries raise many types for an unreadable source
        raise _unreadable(e, engine, uris, refs, req) from (
            e if redact_text(str(e)) == str(e) else None
        )
    if engine == "kerchunk":
        layout_vars = kerchunk_layout(refs, ds)
    elif engine == "zarr":
        layout_vars = zarr_layout(uris[0], ds, req)
    else:
        layout_vars = hdf5_layout(files, ds, concat_dim, file_lengths, req, joined.groups)
    stats = [file_stamp(f) for f in files]
    if refs:
        # A remote reference file has no mtime: its content identifies the source's state.
        stats.append([fingerprint(canonical_json(refs))])
    if concat_dim is None:
        for dim in ds.dims:
            if dim in ds.coords and np.issubdtype(ds[dim].dtype, np.datetime64):
                combine.check_steps(ds, str(dim), files, [int(ds.sizes[dim])])
    ident = identity.record_identity(engine, files, refs, req, list(layout_vars))
    digest = fingerprint(
        canonical_json([engine, list(files), concat_dim, stats]),
        canonical_json(
            {k: [v.dims, v.boundaries, v.read_itemsize] for k, v in layout_vars.items()}
        ),
        # Every source entry as planned (a Zarr chunk rewritten in place, a file a reference
        # points at): a changed source is never resumed into or reported up to date.
        canonical_json(identity.digest_view(ident)),
        # Which files hold which variables (files holding different variables only).
        *merge.groups_digest(joined),
    )
    is_url = any(is_remote(f) for f in files) or (
        bool(refs) and references_protocol(refs) != "file"
    )
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
        joined.groups,
        joined.pending,
    )
    _log_layout(layout)
    return Source(ds, layout, refs or None)


def _open_dataset(
    engine: str, uris: Sequence[str], refs: dict[str, Any], req: CacheRequest
) -> merge.Joined:
    """The source's dataset, its files, joining dimension, per-file lengths along it and (for
    files holding different variables) which files hold which variables."""
    if engine == "kerchunk":
        return merge.Joined(open_references(refs, req), [uris[0]], None, [])
    if engine == "zarr":
        return merge.Joined(_open_zarr(uris[0], req), [uris[0]], None, [])
    return merge.open_files(uris, engine, req)


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
            storage_options=fsspec_options_for(uri, req) or None,
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
        check_readable(urls, req.storage_options, req.remote_concurrency, req.remote_retries)
    return RequestError(
        "data_uri",
        redact(req.data_uri),
        f"could not be opened as {engine} ({redact_text(text)})",
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


def file_stamp(path: str) -> list[Any]:
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


def _expand_remote_globs(req: CacheRequest) -> list[str]:
    """``data_uri`` as a list, with remote glob patterns (``s3://bucket/era5_*.nc``) expanded."""
    import fsspec

    uris = [req.data_uri] if isinstance(req.data_uri, str) else list(req.data_uri)
    out: list[str] = []
    for uri in uris:
        protocol = protocol_of(uri)
        if not is_remote(uri) or protocol in ("http", "https") or not glob_magic(uri):
            out.append(uri)
            continue
        fs = fsspec.filesystem(protocol, **fsspec_options_for(uri, req))
        found = sorted(fs.glob(uri))
        if not found:
            raise RequestError("data_uri", redact_url(uri), "matches no files", "Check the pattern")
        out += [f if "://" in f else f"{protocol}://{f}" for f in found]
    return out


def glob_magic(uri: str) -> bool:
    """True when a path has glob characters."""
    return any(c in uri for c in "*?[")


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
