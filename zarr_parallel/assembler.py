"""zarr-parallel 0.5's import path: ``from zarr_parallel.assembler import ZarrParallelAssembler``.

The Python door lives in :mod:`zarr_parallel.api`; this module only names it where 0.5 kept it.
Like the package's ``__init__``, it loads the door on first use, so importing this module costs
no xarray, zarr, dask or Prefect import until the name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zarr_parallel.api import ZarrParallelAssembler

__all__ = ["ZarrParallelAssembler"]


def __getattr__(name: str) -> Any:
    if name != "ZarrParallelAssembler":
        raise AttributeError(f"module 'zarr_parallel.assembler' has no attribute {name!r}")
    value = getattr(importlib.import_module("zarr_parallel.api"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
