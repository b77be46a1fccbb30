"""The chunk (or shard) files of a version's arrays: which hold a region, which are missing.

A file is named from the array's own metadata (its chunk key encoding), so the names are what zarr
writes. Jobs fsync exactly their files (:func:`sync_job`) before they are recorded.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import zarr

from zarr_parallel.store.disk_names import quiet_manifest
from zarr_parallel.store.files import sync_files

logger = logging.getLogger(__name__)


@lru_cache(maxsize=256)
def array_grid(
    version: str, name: str
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], Any]:
    """Dimension names, shape, file grid (shards or chunks) and metadata of one array."""
    with quiet_manifest():
        arr = zarr.open_array(version, path=name, mode="r")
    md = arr.metadata
    if md.zarr_format == 3:
        dims = tuple(str(d) for d in (md.dimension_names or ()))
    else:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")
        dims = tuple(str(d) for d in names) if isinstance(names, list) else ()
    return dims, tuple(arr.shape), tuple(arr.shards or arr.chunks), md


def chunk_files(version: Path, name: str, region: Mapping[str, tuple[int, int]]) -> list[Path]:
    """The chunk (or shard) files of array ``name`` that hold ``region`` (dim → start, stop)."""
    dims, shape, grid, md = array_grid(str(version), name)
    ranges = []
    for dim, size, chunk in zip(dims, shape, grid, strict=True):
        start, stop = region.get(dim, (0, size))
        ranges.append(range(start // chunk, -(-stop // chunk)))
    return [version / name / md.encode_chunk_key(c) for c in itertools.product(*ranges)]


def sync_job(version: Path, record: Mapping[str, Any]) -> int:
    """fsync every chunk file a job wrote (from its record's variables and region).

    A record without ``variables`` and ``region`` cannot say which files are its own: then the
    whole system is synced (slower, still correct).
    """
    if "region" not in record or "variables" not in record:
        logger.warning("job record without variables/region: syncing every file system")
        os.sync()
        return 0
    region = {str(d): (int(a), int(b)) for d, a, b in record["region"]}
    return sync_region(version, [str(n) for n in record["variables"]], region)


def sync_region(version: Path, names: Sequence[str], region: Mapping[str, tuple[int, int]]) -> int:
    """fsync the chunk files of arrays ``names`` that hold ``region`` (and their folders)."""
    files = [f for name in names for f in chunk_files(version, name, region)]
    return sync_files(files, version)


def array_names(version: Path) -> list[str]:
    """Names of every array (data variables and coordinates) of a version."""
    with quiet_manifest():
        return sorted(str(n) for n, _ in zarr.open_group(version, mode="r").arrays())


def missing_chunk_files(version: Path, name: str) -> list[Path]:
    """The chunk (or shard) files of array ``name`` that do not exist (one listing, no stats)."""
    dims, shape, _, _ = array_grid(str(version), name)
    expected = chunk_files(version, name, {d: (0, s) for d, s in zip(dims, shape, strict=True)})
    present = {os.path.join(root, f) for root, _, files in os.walk(version / name) for f in files}
    return [p for p in expected if str(p) not in present]
