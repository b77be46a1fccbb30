"""zarr-parallel: source-chunk-aware, memory-bounded, resumable caching of datasets into Zarr."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zarr_parallel.errors import (
    CacheLocked,
    LockLost,
    PlanError,
    RecommendationsPending,
    RequestError,
    RunFailed,
    VersionUnavailable,
    ZarrParallelError,
)
from zarr_parallel.version import __version__

if TYPE_CHECKING:
    from zarr_parallel.api import CacheHandle, CacheResult, ZarrParallelAssembler
    from zarr_parallel.run.plan_view import PlanView
    from zarr_parallel.store.readers import open_cache

#: Names loaded on first use: the Python door and the reader import xarray, zarr and dask, which
#: ``import zarr_parallel`` (and so the command's ``--help``) should not pay for.
_LAZY = {
    "CacheHandle": "zarr_parallel.api",
    "CacheResult": "zarr_parallel.api",
    "ZarrParallelAssembler": "zarr_parallel.api",
    "open_cache": "zarr_parallel.store.readers",
    "PlanView": "zarr_parallel.run.plan_view",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zarr_parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CacheHandle",
    "CacheLocked",
    "CacheResult",
    "LockLost",
    "PlanError",
    "PlanView",
    "RecommendationsPending",
    "RequestError",
    "RunFailed",
    "VersionUnavailable",
    "ZarrParallelAssembler",
    "ZarrParallelError",
    "__version__",
    "open_cache",
]
