"""A version's Zarr store: metadata-only initialisation, aligned region writes, finalising.

Writing has three steps (docs/design.md §2a): :func:`initialise_store` writes metadata, coordinates
and attributes only; each job writes whole chunks of its region (:func:`write_region` through
xarray, or :func:`write_values` with zarr directly), after an alignment check; :func:`finalise`
consolidates the metadata once and marks the version complete. Checksums of what jobs wrote are
computed here too.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from zarr_parallel.errors import RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.planning.compression import (
    DEFAULT_COMPRESSION,
    Compression,
    parse_compression,
)
from zarr_parallel.planning.memory import FAST_WRITE_INFLIGHT
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.target import Target
from zarr_parallel.store.codecs import variable_compression, zarr_compressors
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir, quiet_manifest
from zarr_parallel.store.files import sync_files, write_json_atomic
from zarr_parallel.store.paths import CachePaths, owns_version, pending_record
from zarr_parallel.store.provenance import provenance_attrs
from zarr_parallel.store.raw_chunks import chunk_writer
from zarr_parallel.store.zstd_nogil import use_nogil_zstd
from zarr_parallel.transforms.registry import COMPRESSION_ASKED, PACKING_ASKED

# Every process that writes a version imports this module: from here on zarr compresses the
# default zstd codec's chunks in parallel threads (numcodecs' encoder holds the GIL), the same
# frames and metadata (docs/design.md §8).
use_nogil_zstd()

#: Encoding keys that describe the source's storage, not the data; never copied to the cache.
_STORAGE_KEYS = {
    "chunksizes",
    "chunks",
    "zlib",
    "complevel",
    "shuffle",
    "contiguous",
    "source",
    "original_shape",
    "preferred_chunks",
    "szip",
    "bzip2",
    "blosc",
    "zstd",
    "fletcher32",
    "compressor",
    "compressors",
    "filters",
    "serializer",
    "shards",
    "endian",
    "least_significant_digit",
    "quantize_mode",
    "significant_digits",
    # netCDF's list of auxiliary coordinates (e.g. CDS's "number expver"): xarray rebuilds it.
    "coordinates",
    # The encoding transform's codec: made into "compressors" here.
    COMPRESSION_ASKED,
}
_PACKING_KEYS = {"scale_factor", "add_offset"}


def _encoding(
    var: xr.DataArray,
    chunks: dict[str, int],
    shards: dict[str, int] | None,
    req: CacheRequest,
    compressors: Any = None,
) -> dict[str, Any]:
    keep_packing = req.keep_packing
    enc = {k: v for k, v in var.encoding.items() if k not in _STORAGE_KEYS}
    enc.update(_codec(var, variable_compression(req, var), req.zarr_format))
    asked = bool(enc.pop(PACKING_ASKED, False))
    if _PACKING_KEYS & set(enc) and not keep_packing and not asked:
        # Decoded as xarray decodes (docs/design.md §2a): write the floats, not the packed integers.
        # With keep_packing, dtype/scale_factor/add_offset/_FillValue stay: xarray packs on
        # write exactly as the source was packed, and decodes the cache to the same values.
        for key in (*_PACKING_KEYS, "dtype", "_FillValue", "missing_value"):
            enc.pop(key, None)
    if enc.get("missing_value") is not None and enc.get("_FillValue") is None:
        # A Zarr array always has a fill value; left unset it would be NaN/0 and xarray's
        # region writes would refuse it as conflicting with missing_value. CF treats both as
        # "missing", so the source's missing_value becomes the array's fill value too.
        enc["_FillValue"] = enc["missing_value"]
    enc["chunks"] = tuple(chunks[str(d)] for d in var.dims)
    if shards:
        enc["shards"] = tuple(shards[str(d)] for d in var.dims)
    if compressors is not None:
        enc["compressors"] = compressors
    return enc


def initialise_store(
    target: Target,
    version: Path,
    req: CacheRequest,
    plan_json: dict[str, Any],
    compressors: Any = None,
    fence: Callable[[str], None] | None = None,
) -> None:
    """Write metadata, coordinates and attributes only; no data array is computed.

    ``plan.json`` is written last: a version without it was interrupted during initialisation
    and is started again. ``compressors`` (Zarr v3 codecs) replace the default codec of the
    data variables (an intermediate store's zstd level 1, :mod:`zarr_parallel.store.intermediate`).
    ``fence`` (the run's lock check) is called just before ``plan.json`` is written: a run
    paused here while another broke its lock and started this same version again must not
    mark the other's half-made version initialised.
    """
    paths = CachePaths(Path(str(plan_json["cache_path"]))) if "cache_path" in plan_json else None
    _clear(version, paths)
    template = target.template()
    attrs = {
        **template.attrs,
        **provenance_attrs(
            req.data_uri, target.layout.engine, req.digest(), str(plan_json.get("fingerprint", ""))
        ),
    }
    out = xr.Dataset(coords={k: v for k, v in template.coords.items()}, attrs=attrs)
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in template.data_vars.items():
        chunks = target.chunks[str(name)]
        shards = (target.shards or {}).get(str(name))
        grid = tuple((shards or chunks)[str(d)] for d in var.dims)
        lazy = da.zeros(var.shape, chunks=grid or (), dtype=var.dtype)
        out[name] = xr.DataArray(lazy, dims=var.dims, attrs=var.attrs)
        codecs = compressors if req.zarr_format == 3 else None
        encoding[str(name)] = _encoding(var, chunks, shards, req, codecs)
    codec = parse_compression(req.compression, "compression")
    for name, coord in template.coords.items():
        coord_enc = {k: v for k, v in coord.encoding.items() if k not in _STORAGE_KEYS}
        encoding[str(name)] = _codec(coord, codec, req.zarr_format) | coord_enc
        out[name].encoding = {}
    # Coordinates are small and loaded here; data variables are dask placeholders, not written.
    out = out.assign_coords({k: v.load() for k, v in out.coords.items()})
    if paths is not None:
        write_json_atomic(pending_record(paths, version), {"cache_path": paths.canonical})
    with quiet_manifest():
        out.to_zarr(
            version,
            mode="w-",
            compute=False,
            consolidated=False,
            zarr_format=req.zarr_format,
            encoding=encoding,
            write_empty_chunks=True,
        )
    if paths is not None:
        # First thing after zarr made the folder: whose version it is, so that a run killed
        # before plan.json is written leaves a version the next run may prove is its own.
        write_json_atomic(manifest_dir(version) / OWNER_FILE, {"cache_path": paths.canonical})
        with contextlib.suppress(OSError):  # owner.json now decides; a stale record is harmless
            pending_record(paths, version).unlink(missing_ok=True)
            # One version is created at a time (under the lock): the folder is empty again.
            pending_record(paths, version).parent.rmdir()
    # Metadata and coordinates durable before plan.json says the version is initialised.
    sync_files((p for p in version.rglob("*") if p.is_file()), version)
    fault_point("init")
    if fence is not None:
        fence("writing the plan of the new version")
    # No parents: the plan never brings back a version another run removed meanwhile.
    write_json_atomic(manifest_dir(version) / "plan.json", plan_json, parents=False)


def _clear(version: Path, paths: CachePaths | None) -> None:
    """Remove what an interrupted initialisation of ``version`` left (only if the cache owns
    it), and make its parent folder."""
    if version.exists():
        if paths is not None and not owns_version(paths, version):
            raise RunFailed(
                f"{version} exists and is not a version of {paths.final}; it is left alone. "
                "Move it away and run again"
            )
        shutil.rmtree(version)
    version.parent.mkdir(parents=True, exist_ok=True)


def _codec(var: xr.DataArray, codec: Compression, zarr_format: int) -> dict[str, Any]:
    """The ``compressors`` encoding of one array (data variable or coordinate).

    Text arrays with the default codec keep zarr's own choice (blosc for v2 text), so default
    caches keep the metadata they always had; any other codec applies to them too (a reader
    without zstd must read the coordinates as well).
    """
    if codec.text == DEFAULT_COMPRESSION and var.dtype.kind not in "biufcmM":
        return {}
    return {"compressors": zarr_compressors(codec, zarr_format)}


def write_region(version: Path, name: str, data: xr.DataArray, region: dict[str, slice]) -> None:
    """Write whole chunks of one variable into an initialised store, after an alignment check."""
    with quiet_manifest():
        arr = zarr.open_array(version, path=name, mode="r+")
    _check_aligned(arr, name, region)
    ds = xr.Dataset({name: data.variable})
    with quiet_manifest():
        ds.to_zarr(version, region=region, mode="r+", consolidated=False, write_empty_chunks=True)


def _check_aligned(arr: Any, name: str, region: Mapping[str, slice]) -> None:
    grid = arr.shards or arr.chunks
    for (dim, sl), chunk, size in zip(region.items(), grid, arr.shape, strict=True):
        start, stop = sl.start, sl.stop
        if start % chunk or (stop % chunk and stop != size):
            raise RunFailed(
                f"refusing to write {name}[{dim} {start}:{stop}]: not aligned to the chunk "
                f"length {chunk}; concurrent jobs could tear a chunk"
            )


#: Attributes under which xarray's CF encoding would change the values it stores.
_VALUE_ENCODING_ATTRS = {"scale_factor", "add_offset", "calendar", "_Unsigned", "dtype"}


def _stores_as_is(arr: Any, dtype: np.dtype[Any]) -> bool:
    """True when xarray's CF encoding leaves values of ``dtype`` unchanged in this array."""
    attrs = dict(arr.attrs)
    if np.dtype(str(arr.dtype)) != dtype or dtype.kind not in "iuf":
        return False
    if _VALUE_ENCODING_ATTRS & set(attrs) or "since" in str(attrs.get("units", "")):
        return False
    for key in ("_FillValue", "missing_value"):
        if key in attrs and dtype.kind == "f" and not _is_nan_attr(attrs[key]):
            # NaNs would be stored as the fill value.
            return False
    return True


def _is_nan_attr(value: Any) -> bool:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
            if len(raw) in (4, 8):
                return bool(np.isnan(np.frombuffer(raw, dtype=f"<f{len(raw)}")[0]))
        except ValueError:
            pass
        return value.lower() == "nan"
    try:
        return bool(np.isnan(float(value)))
    except (TypeError, ValueError):
        return False


def write_values(
    version: Path,
    name: str,
    values: np.ndarray,
    dims: Sequence[str],
    region: Mapping[str, slice],
    durable: bool = False,
) -> None:
    """Write decoded values of one variable's region as whole chunks, with zarr directly.

    The same alignment check as :func:`write_region`. zarr encodes the chunks concurrently (its
    async pipeline, codecs in threads). When xarray's CF encoding would change the stored values
    (packing, a non-NaN fill for floats, times), the write goes through :func:`write_region`.
    ``durable``: chunk files written directly are fsynced as they are written (see
    :func:`_write_chunkwise`).
    """
    full = {d: region.get(d, slice(0, n)) for d, n in zip(dims, values.shape, strict=True)}
    with quiet_manifest():
        arr = zarr.open_array(version, path=name, mode="r+")
    ordered = {d: full[d] for d in dims}
    if not _stores_as_is(arr, values.dtype):
        write_region(version, name, xr.DataArray(values, dims=list(dims)), ordered)
        return
    _check_aligned(arr, name, ordered)
    arr = arr.with_config({"write_empty_chunks": True})
    if arr.shards is None:
        _write_chunkwise(arr, ordered, values, FAST_WRITE_INFLIGHT, durable)
        return
    # The memory model counts FAST_WRITE_INFLIGHT chunks being encoded at once.
    with zarr.config.set({"async.concurrency": FAST_WRITE_INFLIGHT}):
        arr[tuple(ordered.values())] = values


def write_values_raw(
    version: Path,
    name: str,
    values: np.ndarray,
    dims: Sequence[str],
    region: Mapping[str, slice],
) -> None:
    """Write stored (already encoded) values of one variable's region as whole chunks.

    For copies between stores initialised from one template (a staged plan's last stage): the
    values go to zarr as they are, after the alignment check. No checksum here: the caller
    records that of the decoded values (a CRC32 of the stored ones cost a single-threaded pass
    over the region, 16 ms in every 0.4 s copy of the month benchmark, and was never used).
    """
    arr = zarr.open_array(version, path=name, mode="r+")
    ordered = {d: region[d] for d in dims}
    _check_aligned(arr, name, ordered)
    arr = arr.with_config({"write_empty_chunks": True})
    if arr.shards is None:
        # A copy has no slab of its own to fsync while the next is written (as the fast path
        # does): its chunk files are fsynced as they are written.
        _write_chunkwise(arr, ordered, values, FAST_WRITE_INFLIGHT, durable=True)
    else:
        with zarr.config.set({"async.concurrency": FAST_WRITE_INFLIGHT}):
            arr[tuple(ordered.values())] = values


def _write_chunkwise(
    arr: Any, region: Mapping[str, slice], values: np.ndarray, threads: int, durable: bool = False
) -> None:
    """Hand zarr one whole chunk at a time from a reused buffer, ``threads`` chunks at once.

    Given a region of many chunks, zarr makes a new chunk-sized buffer for each chunk, fills it
    with the fill value and copies the chunk into it before encoding: two passes over the data,
    on fresh pages (job processes return freed memory to the system, see write.py). A value of
    exactly one chunk's shape is encoded as it is, so each thread copies its chunk into its own
    buffer, reused from chunk to chunk. Chunks at the array's edge go through zarr's padding.
    With the default codec, a thread encodes and writes its whole chunks itself
    (:func:`~zarr_parallel.store.raw_chunks.chunk_writer`): the same files, without zarr's
    crossings to its event loop and thread pools for each chunk (fsynced as they are written
    when ``durable``).
    """
    chunks = tuple(int(c) for c in arr.chunks)
    bounds = list(region.values())
    local = threading.local()
    direct = chunk_writer(arr, durable)

    def write(corner: tuple[int, ...]) -> None:
        box = tuple(
            slice(a, min(a + c, int(sl.stop)))
            for a, c, sl in zip(corner, chunks, bounds, strict=True)
        )
        part = values[
            tuple(
                slice(b.start - sl.start, b.stop - sl.start)
                for b, sl in zip(box, bounds, strict=True)
            )
        ]
        if part.shape != chunks:
            # zarr pads an edge chunk into a new buffer: let go of this thread's first, so a
            # thread never holds more than one chunk-sized copy (the memory model's count).
            local.buffer = None
            arr[box] = part
            return
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = np.empty(chunks, dtype=values.dtype)
        np.copyto(buffer, part)
        if direct is not None:
            direct(tuple(a // c for a, c in zip(corner, chunks, strict=True)), buffer)
        else:
            arr[box] = buffer

    corners = itertools.product(
        *(range(int(sl.start), int(sl.stop), c) for sl, c in zip(bounds, chunks, strict=True))
    )
    with ThreadPoolExecutor(threads, thread_name_prefix="zp-chunk") as pool:
        for done in [pool.submit(write, corner) for corner in corners]:
            done.result()


def finalise(version: Path, summary: Mapping[str, Any]) -> None:
    """Consolidate metadata once, make it durable, and mark the version complete."""
    with quiet_manifest():
        zarr.consolidate_metadata(version)
    # complete.json promises a readable version after a crash of the machine: the consolidated
    # metadata (v3: the root zarr.json; v2: .zmetadata and .zgroup) must be on disk before it.
    sync_files([version / n for n in ("zarr.json", ".zmetadata", ".zgroup")], version)
    # No parents: a version another run removed is never brought back as "complete".
    write_json_atomic(
        manifest_dir(version) / "complete.json", {**summary, "time": time.time()}, parents=False
    )


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 (zlib's), continuing from ``value``; libdeflate's is ~7x faster when present."""
    try:
        import deflate

        return int(deflate.crc32(data, value))
    except ImportError:  # pragma: no cover - deflate is a dependency
        import zlib

        return zlib.crc32(data, value)


def array_checksum(values: np.ndarray, value: int = 0) -> str:
    """CRC32 of an array's bytes in C order (what a job wrote), as hex, continuing from ``value``.

    Times (``datetime64``, ``timedelta64``) count as their 8-byte integers, which Python's
    buffer protocol does not export as they are.
    """
    return f"{crc32(buffer_of(values), value):08x}"


def buffer_of(values: np.ndarray) -> memoryview:
    """The bytes of ``values`` in C order (a view when already contiguous)."""
    contiguous = np.ascontiguousarray(values)
    if contiguous.dtype.kind in "mM":
        contiguous = contiguous.view(np.int64)
    return contiguous.data
