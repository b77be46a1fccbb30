"""Identity entries of remote source files, and which of them a job reads.

A source read over the network changes without a local ``stat`` to tell: a server replaces a file
a kerchunk reference points at, or a chunk of a remote Zarr store is rewritten. Each remote file
is identified by what ``fsspec``'s ``info`` reports about it (one request: an HTTP HEAD gives
size, ETag and Last-Modified; S3 size, ETag and VersionId...). Requests for many files go out
together (:data:`REMOTE_INFO_THREADS`).

For a remote Zarr store, listing every chunk would cost a request per prefix page; instead each
array gets its metadata documents and a bounded sample of chunk files (:data:`CHUNK_SAMPLE`):
the first, the last and a few evenly spaced along the first dimension. A chunk rewritten in place
elsewhere, with the metadata untouched, is not seen (a local store's full listing is).

Chunk keys are read as kerchunk and Zarr write them (``t2m/0.1.2``, ``t2m/0/1/2``,
``t2m/c/0/1/2``), so that a job checks only the files holding the chunks it reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

#: Keys of ``fsspec`` ``info`` that identify a remote file's version.
REMOTE_KEYS = (
    "size",
    "ETag",
    "etag",
    "Content-MD5",
    "Digest",
    "Last-Modified",
    "LastModified",
    "VersionId",
    "version_id",
    "generation",
    "mtime",
)

#: Most ``info`` requests in flight at once. A kerchunk reference may point at hundreds of files;
#: one at a time, at ~50 ms a request over a WAN, planning would wait seconds for them.
REMOTE_INFO_THREADS = 16
#: Chunk files sampled per array of a remote Zarr store (first, last and evenly spaced ones).
CHUNK_SAMPLE = 4

#: Array metadata documents of Zarr v2 and v3.
ARRAY_DOCS = (".zarray", ".zattrs", "zarr.json")

_SEPARATORS = re.compile(r"[./]")

StateOf = Callable[[str], dict[str, Any]]
T = TypeVar("T")


def url_state(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A remote file's entry from ``fsspec`` ``info`` (one request)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return {"kind": "url", "missing": True}
    return {"kind": "url", **{k: str(info[k]) for k in REMOTE_KEYS if info.get(k) is not None}}


def url_states(
    urls: Iterable[str], state_of: Callable[[str], T], threads: int = REMOTE_INFO_THREADS
) -> dict[str, T]:
    """``state_of(url)`` for every URL, up to ``threads`` (and :data:`REMOTE_INFO_THREADS`) at
    once: the request's ``remote_concurrency`` bounds these requests as it bounds reads.

    The first error raised (in the order of ``urls``) is raised here.
    """
    todo = list(dict.fromkeys(urls))
    workers = max(1, min(threads, REMOTE_INFO_THREADS, len(todo)))
    if workers == 1:
        return {u: state_of(u) for u in todo}
    with ThreadPoolExecutor(workers, "zp-identity") as pool:
        return dict(zip(todo, pool.map(state_of, todo), strict=True))


def zarr_array_entries(
    store: str,
    arrays: Sequence[str],
    state_of: StateOf,
    read_json: Callable[[str], Any],
    threads: int = REMOTE_INFO_THREADS,
) -> dict[str, dict[str, Any]]:
    """The entries of a remote Zarr store's arrays: metadata documents and sampled chunks.

    ``read_json(url)`` reads a metadata document (None when missing); ``state_of(url)`` is one
    ``info`` request (raising ``PermissionError`` where a store answers 403 for a missing key).
    """
    base = store.rstrip("/")
    urls: list[str] = []
    for name in arrays:
        meta = read_json(f"{base}/{name}/.zarray") or read_json(f"{base}/{name}/zarr.json")
        urls += [f"{base}/{name}/{doc}" for doc in ARRAY_DOCS]
        urls += [f"{base}/{name}/{key}" for key in sample_chunk_keys(meta or {})]
    states = url_states(urls, _allowed(state_of), threads)
    # A document that is not there is no entry (a v2 array has no zarr.json); a sampled chunk
    # that is not there is one (the fill value), since writing it later changes the data.
    return {
        url: state
        for url, state in states.items()
        if state is not None and not (state.get("missing") and _is_doc(url))
    }


def _allowed(state_of: StateOf) -> Callable[[str], dict[str, Any] | None]:
    def state(url: str) -> dict[str, Any] | None:
        try:
            return state_of(url)
        except PermissionError:  # S3 answers 403 for a missing key without list rights
            return None

    return state


def _is_doc(url: str) -> bool:
    return url.rsplit("/", 1)[-1] in ARRAY_DOCS


def sample_chunk_keys(meta: Mapping[str, Any], count: int = CHUNK_SAMPLE) -> list[str]:
    """Keys of up to ``count`` chunk (or shard) files of an array from its metadata document:
    the first, the last and evenly spaced ones along the first dimension."""
    shape, chunks = meta.get("shape"), meta.get("chunks")
    if chunks is None:
        chunks = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    if shape is None or chunks is None or len(shape) != len(chunks):
        return []
    grid = [max(1, -(-int(n) // max(1, int(c)))) for n, c in zip(shape, chunks, strict=True)]
    if not grid:
        return [_chunk_key(meta, ())]
    first = [round(i * (grid[0] - 1) / max(1, count - 1)) for i in range(max(1, count - 1))]
    positions = [(i, *([0] * (len(grid) - 1))) for i in first]
    positions.append(tuple(g - 1 for g in grid))
    return [_chunk_key(meta, p) for p in dict.fromkeys(positions)]


def _chunk_key(meta: Mapping[str, Any], position: Sequence[int]) -> str:
    if "zarr_format" in meta and int(meta["zarr_format"]) == 3:
        encoding = meta.get("chunk_key_encoding") or {}
        sep = str((encoding.get("configuration") or {}).get("separator", "/"))
        if encoding.get("name", "default") == "v2":
            return sep.join(map(str, position)) or "0"
        return sep.join(["c", *map(str, position)])
    sep = str(meta.get("dimension_separator") or ".")
    return sep.join(map(str, position)) or "0"


def chunk_index(key: str) -> tuple[int, ...] | None:
    """The chunk position a key names below its array (``0.1.2``, ``0/1/2``, ``c/0/1/2``,
    ``c.0.1.2``); None for anything else (a metadata document)."""
    parts = _SEPARATORS.split(key)
    if parts and parts[0] == "c":
        parts = parts[1:]
    try:
        return tuple(int(p) for p in parts) if parts else ()
    except ValueError:
        return None


def within(
    index: tuple[int, ...] | None,
    dims: Sequence[str],
    ranges: Mapping[str, Sequence[int]] | None,
) -> bool:
    """True when chunk ``index`` (along ``dims``) lies in the job's chunk ``ranges``
    (``{dim: [lo, hi)}``; a dimension not named, or no ranges at all, means every chunk)."""
    if ranges is None or index is None or len(index) != len(dims):
        return True
    for i, dim in zip(index, dims, strict=True):
        span = ranges.get(dim)
        if span is not None and not int(span[0]) <= i < int(span[1]):
            return False
    return True


def read_remote_json(url: str, options: Mapping[str, Any]) -> Any:
    """A small remote JSON document (a Zarr metadata document), or None when it is missing."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, PermissionError, ValueError):
        return None
