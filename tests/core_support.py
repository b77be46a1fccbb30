"""Helpers shared by the core tests (round trips, CLI)."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from zarr_parallel.provenance import PREFIX as PROVENANCE


def open_cache(path: Path) -> xr.Dataset:
    """A cache, loaded, without its provenance attributes (those are tested in test_sources_*)."""
    cache = xr.open_zarr(path).load()
    cache.attrs = {k: v for k, v in cache.attrs.items() if not k.startswith(PROVENANCE)}
    return cache
