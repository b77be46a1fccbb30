"""The Zarr codec objects of a :class:`~zarr_parallel.planning.compression.Compression`, mapped
separately for Zarr v3 (``zarr.codecs``) and v2 (``numcodecs``), and the codec each variable gets.

The default ``zstd`` is exactly what zarr writes when given no compressor (level 0, no checksum),
so default caches keep their metadata and chunk bytes. ``zlib`` has no Zarr v3 codec of the
specification: v3 stores name it ``numcodecs.zlib`` (zarr-python reads it; other implementations
may not: ``gzip`` is the same deflate stream in the specification).
"""

from __future__ import annotations

from typing import Any

import numcodecs
import xarray as xr
from zarr.codecs import BloscCname, BloscCodec, GzipCodec, ZstdCodec
from zarr.codecs.numcodecs import Zlib

from zarr_parallel.planning.compression import Compression, parse_compression
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.store.disk_names import quiet_manifest
from zarr_parallel.transforms.registry import COMPRESSION_ASKED


def zarr_compressors(compression: Compression, zarr_format: int, blocksize: int = 0) -> Any:
    """The ``compressors`` encoding for xarray's ``to_zarr`` (``None``: uncompressed).

    Zarr v3: a tuple of ``zarr.codecs`` objects; v2: one ``numcodecs`` codec. ``blocksize``
    is Blosc's block in bytes (0: Blosc's choice); other codecs have none.

    >>> zarr_compressors(parse_compression("zlib:1", "compression"), 2)
    Zlib(level=1)
    """
    c = compression
    if c.codec == "none":
        return None
    if zarr_format == 2:
        return _v2_codec(c, blocksize)
    with quiet_manifest():  # zarr's note on numcodecs.zlib, said once in docs/request.md
        return (_v3_codec(c, blocksize),)


def _v2_codec(c: Compression, blocksize: int = 0) -> Any:
    if c.codec == "blosc":
        shuffle = numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname=c.cname, clevel=c.level, shuffle=shuffle, blocksize=blocksize)
    if c.codec == "zlib":
        return numcodecs.Zlib(level=c.level)
    if c.codec == "gzip":
        return numcodecs.GZip(level=c.level)
    return numcodecs.Zstd(level=c.level)


def _v3_codec(c: Compression, blocksize: int = 0) -> Any:
    if c.codec == "blosc":
        cname = BloscCname(c.cname)
        return BloscCodec(cname=cname, clevel=c.level, shuffle="shuffle", blocksize=blocksize)
    if c.codec == "zlib":
        return Zlib(level=c.level)
    if c.codec == "gzip":
        return GzipCodec(level=c.level)
    return ZstdCodec(level=c.level)


def variable_compression(req: CacheRequest, var: xr.DataArray) -> Compression:
    """The codec of one variable: its ``encoding`` transform's, else the request's."""
    asked = var.encoding.get(COMPRESSION_ASKED)
    if asked is not None:
        return parse_compression(asked, "encoding.compression")
    return parse_compression(req.compression, "compression")
