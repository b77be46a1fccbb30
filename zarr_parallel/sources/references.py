"""Kerchunk reference documents: reading one, the files it points at, opening it, its layout."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.request import open_options
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import require_protocol
from zarr_parallel.request.secrets import redact
from zarr_parallel.sources.layout import VarLayout, regular_layout
from zarr_parallel.sources.remote import fsspec_options, fsspec_options_for


def read_references(path: str, req: CacheRequest) -> dict[str, Any]:
    """The reference file's JSON (read once: layout inspection needs nothing else)."""
    import fsspec

    with fsspec.open(path, "rt", **fsspec_options_for(path, req)) as f:
        return dict(json.load(f))


def refs_only(data: Mapping[str, Any]) -> dict[str, Any]:
    return dict(data.get("refs", data))


_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


def referenced_urls(data: Mapping[str, Any]) -> list[str]:
    """The distinct files a kerchunk reference document points at (templates filled in)."""
    templates = {str(k): str(v) for k, v in dict(data.get("templates") or {}).items()}
    seen: dict[str, None] = {}
    for value in refs_only(data).values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0]:
            url = _TEMPLATE.sub(lambda m: templates.get(m.group(1), m.group(0)), value[0])
            seen.setdefault(url, None)
    return list(seen)


def references_protocol(data: Mapping[str, Any]) -> str:
    for url in referenced_urls(data):
        if "://" in url:
            return url.split("://")[0]
    return "file"


def open_references(data: dict[str, Any], req: CacheRequest) -> xr.Dataset:
    """The dataset a kerchunk reference document describes, opened lazily through Zarr."""
    protocol = references_protocol(data)
    so: dict[str, Any] = {"fo": data, "remote_protocol": protocol}
    if protocol != "file":
        # A reference to S3 files is where the s3 protocol is first needed: name the extra.
        require_protocol(protocol, redact(req.data_uri))
        # Zarr opens the reference filesystem asynchronously; its target must match.
        so["remote_options"] = {
            **fsspec_options(
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


def kerchunk_layout(data: Mapping[str, Any], ds: xr.Dataset) -> dict[str, VarLayout]:
    refs = refs_only(data)
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
        layouts[str(name)] = regular_layout(str(name), var, shape, chunk, int(itemsize))
    return layouts
