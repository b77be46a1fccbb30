"""The fsspec protocol of a source URI, and the optional package each remote protocol needs."""

from __future__ import annotations

import importlib

from zarr_parallel.errors import RequestError

#: Protocols whose fsspec filesystem lives in a package of its own, and the extra installing it.
PROTOCOL_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3")}


def protocol_of(uri: str) -> str:
    """The fsspec protocol of a URI (``file`` for local paths).

    >>> protocol_of("S3://bucket/a.nc"), protocol_of("/data/a.nc")
    ('s3', 'file')
    """
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_remote(uri: str) -> bool:
    """True for URLs fsspec opens remotely (``https://``, ``s3://``...)."""
    return "://" in uri and not uri.startswith("file://")


def require_protocol(protocol: str, value: object, parameter: str = "data_uri") -> None:
    """Refuse a protocol whose filesystem package is not installed, naming the extra.

    ``value`` is what the error shows (the URI, credentials already redacted).

    Raises
    ------
    RequestError
        On ``parameter``, with the ``pip install`` line of the extra as the fix.
    """
    needed = PROTOCOL_EXTRAS.get(protocol)
    if needed is None:
        return
    package, extra = needed
    try:
        importlib.import_module(package)
    except ImportError:
        raise RequestError(
            parameter,
            value,
            f"is an {protocol} URL, which needs the {package} package (not installed)",
            f"pip install 'zarr-parallel[{extra}]'",
        ) from None
