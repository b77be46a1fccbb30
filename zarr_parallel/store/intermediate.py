"""The intermediate stores of a staged plan (docs/design.md §3.4, "Strategies").

Stage ``n`` of a staged plan writes ``P.versions/.stage-<n>-<fingerprint12>/`` (or, when the
request names a ``temp_store``, ``<temp_store>/<P's name>.stage-<n>-<fingerprint12>/``): a Zarr
store of the target's arrays with the intermediate chunks, zstd level 1 in Blosc with byte
shuffle and 1 MiB blocks, with its own manifest (plan, job records, owner), so a killed stage
resumes job by job. A dot-folder, never counted as a version; kept for resume, removed once the
target is published. Only folders whose manifest names this cache are ever removed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.target import Target
from zarr_parallel.store.codecs import zarr_compressors
from zarr_parallel.store.disk_names import quiet_manifest
from zarr_parallel.store.manifest import version_owner
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.raw_chunks import read_region, release_chunks
from zarr_parallel.store.zarr_io import buffer_of, crc32, initialise_store, write_values_raw

logger = logging.getLogger(__name__)

#: The intermediate's codec: zstd level 1 inside Blosc, with byte shuffle. It lives only until
#: publish, and every byte of it is written once and read once: on ERA5-like float32 maps, plain
#: zstd level 1 stored 1.73x smaller than the values, the shuffled one 2.02x smaller at 2.5x the
#: encoding speed, which took the month benchmark's source + intermediate reads from 2.33x to
#: about 2.1x the source's stored bytes (docs/benchmarks.md, "Map → time series").
INTERMEDIATE_COMPRESSION = "blosc:zstd:1"
#: Blosc's block, in bytes. Blosc picks 32 KiB for zstd level 1, and shuffles and compresses
#: each block on its own: zstd starts over every 32 KiB. With 1 MiB blocks the same data stored
#: 2.26x smaller instead of 2.02x, encoded 1.7x and decoded 2x faster (12 MB chunks of the
#: month benchmark, one thread; docs/benchmarks.md, "December 7: the intermediate's blocks").
#: A chunk smaller than a block is one block.
INTERMEDIATE_BLOCKSIZE = 2**20


def stage_path(
    paths: CachePaths, stage: int, fingerprint: str, temp_store: str | None = None
) -> Path:
    """Where stage ``stage`` of the plan with this fingerprint writes its intermediate.

    >>> stage_path(CachePaths(Path("/c/era5.zarr")), 1, "abcdef0123456789").as_posix()
    '/c/era5.zarr.versions/.stage-1-abcdef012345'
    >>> stage_path(CachePaths(Path("/c/era5.zarr")), 1, "abcdef0123456789", "/s").as_posix()
    '/s/era5.zarr.stage-1-abcdef012345'
    """
    name = f"stage-{stage}-{fingerprint[:12]}"
    if temp_store:
        return Path(temp_store) / f"{paths.final.name}.{name}"
    return paths.versions / f".{name}"


def initialise_intermediate(
    target: Target, path: Path, req: CacheRequest, plan_json: dict[str, Any]
) -> None:
    """Create the intermediate store of a stage (metadata only), :data:`INTERMEDIATE_COMPRESSION`
    in blocks of :data:`INTERMEDIATE_BLOCKSIZE`, no shards."""
    compression = parse_compression(INTERMEDIATE_COMPRESSION, "compression")
    codecs = zarr_compressors(compression, 3, blocksize=INTERMEDIATE_BLOCKSIZE)
    initialise_store(target, path, req, plan_json, compressors=codecs)


def copy_region(
    source: Path,
    version: Path,
    name: str,
    dims: Sequence[str],
    region: Mapping[str, slice],
    inspect: Callable[[np.ndarray], None] | None = None,
) -> tuple[int, str]:
    """Copy one variable's region from an intermediate store into a version, as stored.

    Both stores were initialised from one template, so the stored (encoded) values are copied
    unchanged: no decoding, no re-encoding. The checksum a direct job records is that of the
    values as xarray decodes them from the cache (what ``verify`` compares): the stored values
    already in memory are decoded piece by piece (:func:`decoded_checksum`), never read again.

    Parameters
    ----------
    source, version
        The intermediate store and the version being written.
    name, dims, region
        The variable, its dimensions and the region (whole chunks of the version).
    inspect
        Called with each decoded piece, in C order (e.g. to gather statistics).

    Returns
    -------
    tuple of int and str
        The bytes copied and the CRC32 (hex) of the decoded region.
    """
    src = zarr.open_array(source, path=name, mode="r")
    box = tuple(region.get(d, slice(0, n)) for d, n in zip(dims, src.shape, strict=True))
    with read_region(src, box) as values:
        write_values_raw(version, name, values, dims, dict(zip(dims, box, strict=True)))
        checksum = decoded_checksum(values, stored_variable(version, name), name, inspect)
        return int(values.nbytes), checksum


def release_region(
    source: Path,
    version: Path,
    names: Sequence[str],
    dims: Mapping[str, Sequence[str]],
    region: Mapping[str, slice],
) -> int:
    """Empty the chunk files of intermediate ``source`` that only the (recorded) job of
    ``region`` of ``version`` read (:func:`~zarr_parallel.store.raw_chunks.release_chunks`);
    how many. Nothing when ``source``'s manifest does not name ``version``'s cache.

    Each intermediate chunk of a staged plan lies in one job's region of the next stage (the
    plan aligns them), so after that job's record nothing needs it again: its pages go back
    now, for the next job's writes, and publish has less to remove.
    """
    owner = version_owner(version)
    if owner is None or version_owner(source) != owner:
        logger.warning("not releasing chunks of %s: its manifest does not name this cache", source)
        return 0
    emptied = 0
    for name in names:
        src = zarr.open_array(source, path=name, mode="r")
        box = tuple(region.get(d, slice(0, n)) for d, n in zip(dims[name], src.shape, strict=True))
        emptied += release_chunks(src, box)
    return emptied


#: Most elements decoded at once for a copy's checksum, and the fewest worth a decode call.
#: A piece is at most an eighth of the region between these bounds: with its temporaries
#: (xarray's masked copy, a float copy of packed integers) it stays well inside the copies of
#: the region the memory model counts (docs/design.md §5).
DECODE_PIECE = 2**20
DECODE_PIECE_MIN = 2**16


def stored_variable(version: Path, name: str) -> xr.Variable:
    """The variable ``name`` of a store as xarray reads it before decoding (its attributes and
    encoding as the zarr backend presents them, e.g. ``_FillValue``); no values are read."""
    with (
        quiet_manifest(),
        xr.open_zarr(
            version,
            consolidated=False,
            chunks=None,
            decode_cf=False,
            create_default_indexes=False,
        ) as ds,
    ):
        var = ds[name].variable
        return xr.Variable(var.dims, np.empty((0,) * var.ndim, var.dtype), var.attrs, var.encoding)


def decoded_checksum(
    values: np.ndarray,
    stored: xr.Variable,
    name: str,
    inspect: Callable[[np.ndarray], None] | None = None,
) -> str:
    """CRC32 (hex) of stored ``values`` as xarray decodes them with ``stored``'s attributes.

    The same as ``zlib.crc32`` of ``xr.open_zarr(..., decode_timedelta=True)[name].values``
    over the region (``verify`` compares that), computed without reading the store: CF decoding
    (mask, scale and offset, times) is element-wise, so numeric values are decoded in flat
    pieces (views of the C-ordered region) and the CRC chained over them.
    """
    elementwise = values.dtype.kind in "biufcmM"
    flat = values.reshape(-1) if elementwise else values
    step = min(DECODE_PIECE, max(DECODE_PIECE_MIN, flat.size // 8)) if elementwise else flat.size
    crc = 0
    for start in range(0, flat.size, max(step, 1)):
        piece = flat[start : start + step] if elementwise else flat
        dims = ("piece",) if elementwise else stored.dims
        raw = xr.Variable(dims, piece, dict(stored.attrs), dict(stored.encoding))
        decoded = xr.decode_cf(xr.Dataset({name: raw}), decode_timedelta=True)[name].values
        crc = crc32(buffer_of(decoded), crc)
        if inspect is not None:
            inspect(decoded)
        del decoded
    return f"{crc:08x}"


def remove_intermediates(paths: CachePaths, folders: Sequence[str]) -> int:
    """Remove the intermediate stores this cache made (their manifest names it); the count."""
    removed = 0
    for folder in folders:
        path = Path(folder)
        if not path.is_dir():
            continue
        if version_owner(path) != paths.canonical:
            logger.warning("not removing %s: its manifest does not name this cache", path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def stale_intermediates(paths: CachePaths, keep: Sequence[str]) -> list[Path]:
    """Intermediate folders beside the versions that this cache made and no longer needs."""
    if not paths.versions.is_dir():
        return []
    kept = {str(Path(k)) for k in keep}
    return [
        p
        for p in sorted(paths.versions.glob(".stage-*"))
        if p.is_dir() and str(p) not in kept and version_owner(p) == paths.canonical
    ]


def check_temp_store(temp_store: str, sources: Sequence[str]) -> None:
    """Refuse a ``temp_store`` that cannot be written or lies inside a source.

    Raises
    ------
    RequestError
        Not a writable folder, or inside a source path.
    """
    path = Path(temp_store).resolve()
    for src in sources:
        if "://" in src:
            continue
        s = Path(src).resolve()
        if path == s or s in path.parents:
            raise RequestError(
                "temp_store",
                temp_store,
                f"lies inside the source {src}; the run never writes into its sources",
                "Name a folder outside the source, on a file system every worker can see",
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".zarr-parallel-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RequestError(
            "temp_store",
            temp_store,
            f"cannot be written ({e})",
            "Name a writable folder every worker can see, or leave temp_store unset",
        ) from e
