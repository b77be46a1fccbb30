"""The cache's codec as the request names it: ``zstd``, ``zstd:5``, ``blosc:lz4:5``, ``zlib:1``,
``gzip:5`` or ``none`` (docs/request.md).

Pure text arithmetic: :func:`parse_compression` checks a value and gives its canonical form, which
is what the content fingerprint hashes (``ZSTD:0`` and ``zstd`` are one codec, one fingerprint).
The Zarr objects are built from it by the store (:mod:`zarr_parallel.store.codecs`), separately for
Zarr v3 and v2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zarr_parallel.errors import RequestError

#: The default: zstd at zarr's default level (0, zstd's own default), as caches were always written.
DEFAULT_COMPRESSION = "zstd"
#: Blosc's inner compressors (numcodecs and the Zarr v3 blosc codec accept the same names).
BLOSC_CNAMES = ("lz4", "lz4hc", "zstd", "zlib", "blosclz")
#: Per codec: the level range and the default level (zarr's and numcodecs' defaults).
_LEVELS = {"zstd": (0, 22, 0), "blosc": (0, 9, 5), "zlib": (0, 9, 1), "gzip": (0, 9, 5)}
FORMS = (
    "'zstd' or 'zstd:LEVEL' (0-22), 'blosc:CNAME:LEVEL' (CNAME one of "
    f"{', '.join(BLOSC_CNAMES)}; LEVEL 0-9), 'zlib:LEVEL' (0-9), 'gzip:LEVEL' (0-9) or 'none'"
)


@dataclass(frozen=True)
class Compression:
    """One codec and its settings; ``codec`` is ``"none"`` for uncompressed chunks.

    >>> parse_compression("Blosc:LZ4", "compression").text
    'blosc:lz4:5'
    >>> parse_compression("zstd:0", "compression").text
    'zstd'
    """

    codec: str
    level: int = 0
    cname: str = ""

    @property
    def text(self) -> str:
        """The canonical form (what the request keeps and the fingerprint hashes)."""
        if self.codec == "none" or (self.codec == "zstd" and self.level == 0):
            return self.codec
        if self.codec == "blosc":
            return f"blosc:{self.cname}:{self.level}"
        return f"{self.codec}:{self.level}"

    @property
    def compresses(self) -> bool:
        """Whether chunks go through a compressor (the memory model counts its buffers)."""
        return self.codec != "none"


def parse_compression(value: Any, parameter: str) -> Compression:
    """Check a ``compression`` value and return it as a :class:`Compression`.

    Raises
    ------
    RequestError
        Naming ``parameter``, the value and the allowed forms.
    """

    def refuse(problem: str) -> RequestError:
        return RequestError(parameter, value, problem, f"Use {FORMS}")

    if not isinstance(value, str) or not value.strip():
        raise refuse("must be a codec name such as 'zstd' or 'zlib:1'")
    parts = [p.strip() for p in value.strip().lower().split(":")]
    codec, args = parts[0], parts[1:]
    if codec == "none":
        if args:
            raise refuse("'none' takes no settings")
        return Compression("none")
    if codec == "lz4":
        raise refuse("is written 'blosc:lz4:LEVEL' here (lz4 inside blosc, with byte shuffle)")
    if codec not in _LEVELS:
        raise refuse(f"names no codec this tool writes ({codec!r})")
    cname = ""
    if codec == "blosc":
        cname = args.pop(0) if args else "lz4"
        if cname not in BLOSC_CNAMES:
            raise refuse(f"names no blosc compressor ({cname!r})")
    if len(args) > 1:
        raise refuse(f"has too many ':' parts for {codec}")
    low, high, default = _LEVELS[codec]
    level = default
    if args:
        try:
            level = int(args[0])
        except ValueError:
            raise refuse(f"has a level that is not a whole number ({args[0]!r})") from None
        if not low <= level <= high:
            raise refuse(f"has a {codec} level outside {low}-{high} ({level})")
    return Compression(codec, level, cname)
