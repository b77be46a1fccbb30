"""Identity entries of remote source files, and which of them a job reads.

A source read over the network changes without a local ``stat`` to tell: a server replaces a file
a kerchunk reference points at, or a chunk of a remote Zarr store is rewritten. Each remote file
is identified by what ``fsspec``'s ``info`` reports about it (one request: an HTTP HEAD gives
size, ETag and Last-Modified; S3 size, ETag and VersionId...). Requests for many files go out
together (:data:`REMOTE_INFO_THREADS`).

For a remote Zarr store each array gets its metadata documents and a bounded sample of chunk
files (:data:`CHUNK_SAMPLE`): the first, the last and a few evenly spaced along the first
dimension, which jobs check before they read. On an object store that lists keys with their
versions (S3, GCS, Azure: :data:`LISTING_PROTOCOLS`) each array also gets one recursive listing
(a request per 1,000 keys) digested into one entry, recorded at planning and checked again
before publishing, so a chunk rewritten in place anywhere stops the run (jobs do not list: that
would be the listing once per job). Over HTTP, which cannot list, or for an array of more than
:data:`LISTING_MAX_CHUNKS` chunks, only the sample is checked.

Chunk keys are read as kerchunk and Zarr write them (``t2m/0.1.2``, ``t2m/0/1/2``,
``t2m/c/0/1/2``), so that a job checks only the files holding the chunks it reads.
"""

from __future__ import annotations

import hashlib
import json
import math
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

#: Protocols whose listing gives every key with its size and version tag (ETag, generation).
LISTING_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
#: Arrays with more chunk files than this are sampled only: their listing would be hundreds of
#: requests at planning and again before publishing.
LISTING_MAX_CHUNKS = 100_000

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


def listing_state(url: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """A remote array folder's entry from one recursive listing: its number of files, their
    bytes and a digest of every key with its size and version tags; None where the store
    cannot list (:data:`LISTING_PROTOCOLS`)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & LISTING_PROTOCOLS:
        return None
    fs.invalidate_cache(path)  # a listing cached by this process would hide a change
    found = fs.find(path, detail=True)
    h = hashlib.sha256()
    total = 0
    for key in sorted(found):
        info = found[key]
        total += int(info.get("size") or 0)
        tags = {k: str(info[k]) for k in REMOTE_KEYS if info.get(k) is not None}
        h.update(json.dumps([key[len(path) :], tags], sort_keys=True).encode())
    return {
        "kind": "remote-listing",
        "files": len(found),
        "bytes": total,
        "listing": h.hexdigest()[:32],
    }


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
    list_state: Callable[[str], dict[str, Any] | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The entries of a remote Zarr store's arrays: metadata documents and sampled chunks, and
    each array's listing (``ARRAY/``) where ``list_state`` can make one.

    ``read_json(url)`` reads a metadata document (None when missing); ``state_of(url)`` is one
    ``info`` request (raising ``PermissionError`` where a store answers 403 for a missing key);
    ``list_state(url)`` lists an array folder (:func:`listing_state`).
    """
    base = store.rstrip("/")
    urls: list[str] = []
    listed: list[str] = []
    for name in arrays:
        meta = read_json(f"{base}/{name}/.zarray") or read_json(f"{base}/{name}/zarr.json")
        urls += [f"{base}/{name}/{doc}" for doc in ARRAY_DOCS]
        urls += [f"{base}/{name}/{key}" for key in sample_chunk_keys(meta or {})]
        if list_state is not None and 0 < chunk_count(meta or {}) <= LISTING_MAX_CHUNKS:
            listed.append(f"{base}/{name}/")
    states = url_states(urls, _allowed(state_of), threads)
    # A document that is not there is no entry (a v2 array has no zarr.json); a sampled chunk
    # that is not there is one (the fill value), since writing it later changes the data.
    entries = {
        url: state
        for url, state in states.items()
        if state is not None and not (state.get("missing") and _is_doc(url))
    }
    if list_state is not None and listed:
        listings = url_states(listed, list_state, threads)
        entries.update({url: state for url, state in listings.items() if state is not None})
    return entries


def _grid(meta: Mapping[str, Any]) -> list[int] | None:
    """Chunks per dimension of an array from its metadata document (v2 or v3); None when the
    document does not say."""
    shape, chunks = meta.get("shape"), meta.get("chunks")
    if chunks is None:
        chunks = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    if shape is None or chunks is None or len(shape) != len(chunks):
        return None
    return [max(1, -(-int(n) // max(1, int(c)))) for n, c in zip(shape, chunks, strict=True)]


def chunk_count(meta: Mapping[str, Any]) -> int:
    """The number of chunk (or shard) files of an array from its metadata document; 0 when the
    document does not say."""
    grid = _grid(meta)
    return 0 if grid is None else math.prod(grid)


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
    grid = _grid(meta)
    if grid is None:
        return []
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
