"""zarr-parallel: source-chunk-aware, memory-bounded, resumable caching of datasets into Zarr."""

from importlib.metadata import PackageNotFoundError, version

from zarr_parallel.api import CacheHandle, CacheResult, ZarrParallelAssembler
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
from zarr_parallel.store.readers import open_cache

try:
    __version__ = version("zarr-parallel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "CacheHandle",
    "CacheLocked",
    "CacheResult",
    "LockLost",
    "PlanError",
    "RecommendationsPending",
    "RequestError",
    "RunFailed",
    "VersionUnavailable",
    "ZarrParallelAssembler",
    "ZarrParallelError",
    "__version__",
    "open_cache",
]
