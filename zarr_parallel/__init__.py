"""zarr-parallel: source-chunk-aware, memory-bounded, resumable caching of datasets into Zarr."""

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
from zarr_parallel.version import __version__

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
