"""Provenance attributes of a cache: where it came from, from which request, by what, when.

They live on the cache's root group under keys of their own (``zarr_parallel_*``), so no source
attribute changes, and never on the arrays, so array metadata and chunk files of two runs stay
byte-comparable.
"""

from __future__ import annotations

import datetime as dt
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from zarr_parallel.request.secrets import redact

PREFIX = "zarr_parallel_"
#: Most source paths listed one by one; a longer list is summarised.
MAX_LISTED = 50


def _source_text(data_uri: str | list[str]) -> str | list[str]:
    uris: str | list[str] = redact(data_uri)
    if isinstance(uris, str) or len(uris) <= MAX_LISTED:
        return uris
    return [*uris[:3], f"... {len(uris) - 6} more ...", *uris[-3:]]


def package_version() -> str:
    """This package's version, as ``zarr_parallel.__version__`` gives it.

    Read from the installed distribution here rather than imported from the package root, which
    imports the doors (the store is below them).
    """
    try:
        return version("zarr-parallel")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def provenance_attrs(
    data_uri: str | list[str], engine: str | None, request_fingerprint: str, plan_fingerprint: str
) -> dict[str, Any]:
    """The provenance attributes for a new cache version (credentials stripped)."""
    return {
        f"{PREFIX}source": _source_text(data_uri),
        f"{PREFIX}engine": engine or "detected",
        f"{PREFIX}request_fingerprint": request_fingerprint,
        f"{PREFIX}plan_fingerprint": plan_fingerprint,
        f"{PREFIX}version": package_version(),
        f"{PREFIX}written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
