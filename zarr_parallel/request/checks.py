"""The checks of a request's fields beyond their types: one check per field (or pair of fields).

Each check takes the field values it needs (not the model: :mod:`zarr_parallel.request.model`
calls them from ``build_request``) and raises :class:`RequestError` with the value and the fix,
or returns the value resolved (paths against the request file's folder).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.request.open_options import check_open_options, detect_engine
from zarr_parallel.request.protocols import is_remote, protocol_of, require_protocol
from zarr_parallel.request.secrets import check_no_secrets, redact_url
from zarr_parallel.transforms.registry import validate_spec
from zarr_parallel.units import parse_memory

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]*$")
#: A URL scheme (``s3://``, ``gs://``, ``file://``...): not a path a cache may be written to.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def resolve_sources(
    data_uri: str | list[str],
    engine: str | None,
    storage_options: Mapping[str, Any],
    open_options: Mapping[str, Any],
    base: Path | None,
) -> str | list[str]:
    """``data_uri`` with globs expanded and local paths resolved against ``base``."""
    check_no_secrets(data_uri, storage_options, open_options)
    uris = [data_uri] if isinstance(data_uri, str) else list(data_uri)
    if not uris:
        raise RequestError("data_uri", data_uri, "names no source", "Give a path, glob or list")
    resolved: list[str] = []
    for uri in uris:
        if is_remote(uri):
            # An S3 URL needs s3fs, an optional extra: say so now, not when a worker reads.
            require_protocol(protocol_of(uri), redact_url(uri))
            resolved.append(uri)
        else:
            resolved.extend(_local_paths(uri, base))
    # Reading options only: a source is opened read-only whatever the request says.
    check_open_options(detect_engine(resolved, engine), open_options)
    return resolved[0] if len(resolved) == 1 else resolved


def _local_paths(uri: str, base: Path | None) -> list[str]:
    """The local files ``uri`` names (a glob's matches), relative to ``base``."""
    path = uri.removeprefix("file://")
    if base is not None and not os.path.isabs(path):
        path = str(base / path)
    path = os.path.expanduser(path)
    if glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise RequestError(
                "data_uri", uri, "matches no files", "Check the pattern and the folder"
            )
        return matches
    if not os.path.exists(path):
        raise RequestError(
            "data_uri",
            uri,
            "does not exist",
            "Check the path (relative paths are "
            "relative to the request file, or to the working directory in Python)",
        )
    return [path]


def check_memory(
    memory_limit: str | int, memory_reserve: str | int, free_space_reserve: str | int
) -> None:
    """Memory strings parse now, not mid-run, and the reserve leaves room for jobs."""
    limit = parse_memory(memory_limit, "memory_limit")
    reserve = parse_memory(memory_reserve, "memory_reserve")
    if free_space_reserve not in (0, "0"):
        parse_memory(free_space_reserve, "free_space_reserve")
    if reserve >= limit:
        raise RequestError(
            "memory_limit",
            memory_limit,
            f"leaves nothing for jobs after the {memory_reserve} interpreter reserve",
            "Raise memory_limit or lower memory_reserve",
        )


def check_chunks(chunks: Mapping[str, int] | str) -> None:
    """Chunk sizes are positive, or -1 for a whole dimension."""
    if not isinstance(chunks, Mapping):
        return
    for dim, size in chunks.items():
        if size != -1 and size <= 0:
            raise RequestError(
                f"chunks['{dim}']",
                size,
                "must be a positive integer or -1 (whole dimension)",
                "Use a size such as 24 (one day of hourly steps)",
            )


def check_shards(shards: Mapping[str, int] | None, zarr_format: int) -> None:
    """Shards need Zarr v3, and positive sizes (or -1)."""
    if shards is None:
        return
    if zarr_format != 3:
        raise RequestError("shards", shards, "need zarr_format=3", "Set zarr_format: 3")
    for dim, size in shards.items():
        if size <= 0 and size != -1:
            raise RequestError(
                f"shards['{dim}']", size, "must be positive", "Use a multiple of the chunk"
            )


def check_variables(
    variables: Mapping[str, list[dict[str, Any]]] | None,
) -> dict[str, list[dict[str, Any]]] | None:
    """The variables to cache, each with its transforms validated (every name known now)."""
    if variables is None:
        return None
    if not variables:
        raise RequestError("variables", {}, "names no variable", "Name at least one, or omit it")
    return {
        name: [validate_spec(s, f"variables['{name}'][{i}]") for i, s in enumerate(specs)]
        for name, specs in variables.items()
    }


def check_cache_location(cache_store: str | None, cache_dir: str | None) -> None:
    """Exactly one of ``cache_store`` and ``cache_dir`` is given."""
    if (cache_store is None) == (cache_dir is None):
        raise RequestError(
            "cache_store",
            cache_store,
            "exactly one of cache_store and cache_dir must be given"
            + (f" (cache_dir={cache_dir!r} was also given)" if cache_dir else ""),
            "Give cache_store='/path/name.zarr' (the final path) or cache_dir='/path' "
            "(then the cache is <cache_dir>/<cache_name><cache_label>.zarr)",
        )


#: A rule on a path-like field: (refuses the value, problem, fix given the value).
_Rule = tuple[Callable[[str], bool], str, Callable[[str], str]]

#: The rules of ``cache_label`` and ``cache_name`` (they become part of a path).
_NAME_RULES: tuple[_Rule, ...] = (
    (
        lambda v: not _NAME_RE.match(v) or v in (".", ".."),
        "may hold only letters, digits, '_', '-' and '.' (it becomes a path)",
        lambda v: "Use e.g. '_v1'",
    ),
)
#: The rules of ``cache_store`` and ``cache_dir``.
_PATH_RULES: tuple[_Rule, ...] = (
    (
        lambda v: bool(_URL_RE.match(v)),
        "is a URL; caches are written to local or shared file systems only (object "
        "store targets do not exist yet)",
        lambda v: (
            "Give a file system path such as '/data/caches/era5.zarr'"
            + (" (without 'file://')" if v.lower().startswith("file:") else "")
        ),
    ),
)
#: Which rules hold for which field.
_FIELD_RULES = {
    "cache_label": _NAME_RULES,
    "cache_name": _NAME_RULES,
    "cache_store": _PATH_RULES,
    "cache_dir": _PATH_RULES,
}


def check_path_field(field: str, value: str | None, base: Path | None = None) -> str | None:
    """Check one of ``cache_label``, ``cache_name``, ``cache_store`` or ``cache_dir``.

    Returns the value, a relative ``cache_store`` or ``cache_dir`` resolved against ``base``.
    """
    if value is None:
        return None
    for refuses, problem, fix in _FIELD_RULES[field]:
        if refuses(value):
            raise RequestError(field, value, problem, fix(value))
    if _FIELD_RULES[field] is _PATH_RULES and base is not None and not os.path.isabs(value):
        return str(base / value)
    return value
