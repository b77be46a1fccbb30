"""What each source file was when a run planned it, and the check that it still is.

A source that changes while a run copies it gives a cache that is half old, half new. So the
planner records an *identity* per source entry, stored in the plan (``plan.json``), every job
checks the entries it reads before reading, and the run checks all of them once more before
publishing; any difference raises :class:`~zarr_parallel.errors.SourceChanged`.

Entries, by what they name:

``file``
    A local file (a netCDF file, a kerchunk reference, a file a reference points at, a Zarr
    store's root metadata document): size, ``st_mtime_ns`` and inode. The inode is compared only
    on the host that planned (some network file systems number inodes per client).
``zarr-array``
    One array folder of a local Zarr store: the number of files, their bytes, and a digest of
    the listing (relative names, sizes, ``st_mtime_ns``). A chunk rewritten in place changes it
    even when the store's metadata is untouched.
``url``
    A remote file: what ``fsspec``'s ``info`` gives that identifies a version (size, ETag,
    Content-MD5, Last-Modified, S3 VersionId...), one HEAD request. Also each remote file a
    kerchunk reference points at, and a remote Zarr store's array metadata documents and a
    sample of its chunk files (:mod:`zarr_parallel.sources.remote_identity`).

A new file matching a glob is not a change: entries are the files the run planned. A file that
grows is one (its size differs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from zarr_parallel.errors import SourceChanged
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import is_remote
from zarr_parallel.sources.layout import group_files
from zarr_parallel.sources.references import referenced_urls, refs_only
from zarr_parallel.sources.remote import fsspec_options_for
from zarr_parallel.sources.remote_identity import (
    chunk_index,
    listing_state,
    read_remote_json,
    url_state,
    url_states,
    within,
    zarr_array_entries,
)

logger = logging.getLogger(__name__)

#: Entry fields that say nothing about the content, only where it was seen from.
_HOST_ONLY = ("ino",)

Identity = dict[str, Any]


def file_state(path: str) -> dict[str, Any]:
    """A local file's entry: size, modification time and inode (or ``missing``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"kind": "file", "missing": True}
    return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def zarr_array_state(folder: str) -> dict[str, Any]:
    """A local Zarr array folder's entry: file count, bytes and a digest of its listing."""
    h = hashlib.sha256()
    count = total = 0
    try:
        for name, size, mtime in sorted(_listing(folder, "")):
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
            count += 1
            total += size
    except FileNotFoundError:
        return {"kind": "zarr-array", "missing": True}
    return {"kind": "zarr-array", "files": count, "bytes": total, "listing": h.hexdigest()[:32]}


def _listing(folder: str, prefix: str) -> Iterator[tuple[str, int, int]]:
    """(relative name, size, st_mtime_ns) of every file under ``folder`` (one stat each)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.is_dir():
                    yield from _listing(entry.path, f"{prefix}{entry.name}/")
                else:
                    st = entry.stat()
                    yield f"{prefix}{entry.name}", st.st_size, st.st_mtime_ns
            except FileNotFoundError:  # removed while listed: the digest differs anyway
                continue


def new_identity(entries: Mapping[str, Mapping[str, Any]]) -> Identity:
    """An identity: its entries and the host that recorded them."""
    return {"host": socket.gethostname(), "entries": {k: dict(v) for k, v in entries.items()}}


def digest_view(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The entries without host-only fields: what enters the source's fingerprint."""
    return {
        name: {k: v for k, v in state.items() if k not in _HOST_ONLY}
        for name, state in sorted(dict(identity.get("entries") or {}).items())
    }


StateOf = Callable[[str, Mapping[str, Any]], dict[str, Any]]


def current_state(name: str, planned: Mapping[str, Any], remote: StateOf) -> dict[str, Any]:
    """The entry ``name`` as it is now, measured as ``planned`` was (``remote`` for URLs)."""
    kind = planned.get("kind")
    if kind == "file":
        return file_state(name)
    if kind == "zarr-array":
        return zarr_array_state(name)
    return remote(name, planned)


def describe_change(planned: Mapping[str, Any], now: Mapping[str, Any], same_host: bool) -> str:
    """What differs between two states of one entry, in words ("" when nothing does)."""
    if now.get("missing") and not planned.get("missing"):
        return "it was removed or renamed"
    diffs = []
    for key in sorted(set(planned) | set(now)):
        if key == "kind" or (key in _HOST_ONLY and not same_host):
            continue
        if planned.get(key) != now.get(key):
            label = {"ino": "inode (the file was replaced)", "listing": "chunk files"}.get(key, key)
            diffs.append(f"{label}: {planned.get(key)} → {now.get(key)}")
    return "; ".join(diffs)


def check_identity(
    identity: Mapping[str, Any] | None,
    names: Iterable[str] | None,
    remote: StateOf,
    threads: int = 1,
) -> int:
    """Check that the entries ``names`` (all when None) are as ``identity`` recorded them.

    Remote entries are measured up to ``threads`` at once.

    Returns the number of entries checked.

    Raises
    ------
    SourceChanged
        Naming the first entry that changed and what changed.
    """
    if not identity:
        return 0  # a plan made before identities were recorded
    entries: Mapping[str, Mapping[str, Any]] = identity.get("entries") or {}
    same_host = identity.get("host") == socket.gethostname()
    todo = list(entries if names is None else names)
    # Remote entries are asked for together (one request each, many in flight).
    urls = [n for n in todo if (entries.get(n) or {}).get("kind") == "url"]
    fetched = url_states(urls, lambda url: remote(url, entries[url]), threads)
    count = 0
    for name in todo:
        planned = entries.get(name)
        if planned is None:
            raise SourceChanged(name, "it was not part of the source when the run planned it")
        now = fetched[name] if name in fetched else current_state(name, planned, remote)
        change = describe_change(planned, now, same_host)
        if change:
            raise SourceChanged(name, change)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# The entries of a request's source: recorded at planning, checked by every job and before
# publishing


_ZARR_ROOT_DOCS = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")


def record_identity(
    engine: str,
    files: Sequence[str],
    refs: Mapping[str, Any],
    req: CacheRequest,
    arrays: Sequence[str] = (),
) -> Identity:
    """Each source entry as it is now (see :mod:`zarr_parallel.sources.identity`).

    ``arrays`` names the variables of a Zarr store (a remote store gets an entry per array).
    """
    entries: dict[str, dict[str, Any]] = {}
    if engine == "kerchunk":
        ref = files[0]
        # A remote reference by its version headers (a HEAD per check, not the whole JSON;
        # its content is in the layout digest already).
        entries[ref] = _entry_state(ref, req)
        urls = referenced_urls(refs)
        for url in urls:
            if not is_remote(url):
                path = url.removeprefix("file://")
                entries[path] = file_state(path)
        # Remote files it points at: one info request each, many in flight. Jobs check the
        # files holding the chunks they read (see job_entries).
        remote = [u for u in urls if is_remote(u)]
        entries.update(
            url_states(
                remote, lambda u: url_state(u, fsspec_options_for(u, req)), req.remote_concurrency
            )
        )
    elif engine == "zarr" and not is_remote(files[0]):
        store = files[0]
        for doc in _ZARR_ROOT_DOCS:
            if os.path.exists(os.path.join(store, doc)):
                entries[os.path.join(store, doc)] = file_state(os.path.join(store, doc))
        with os.scandir(store) as found:
            for entry in sorted(found, key=lambda d: d.name):
                if entry.is_dir():
                    entries[entry.path] = zarr_array_state(entry.path)
    elif engine == "zarr":
        # A remote store: its root metadata documents, and per array its documents and a
        # sample of chunk files (listing every chunk would cost a request per chunk prefix).
        for doc in _ZARR_ROOT_DOCS:
            url = f"{files[0].rstrip('/')}/{doc}"
            try:
                state = url_state(url, fsspec_options_for(url, req))
            except PermissionError:  # S3 answers 403 for a missing key without list rights
                continue
            if not state.get("missing"):
                entries[url] = state
        entries.update(
            zarr_array_entries(
                files[0],
                sorted(arrays),
                lambda u: url_state(u, fsspec_options_for(u, req)),
                lambda u: read_remote_json(u, fsspec_options_for(u, req)),
                req.remote_concurrency,
                lambda u: listing_state(u, fsspec_options_for(u, req)),
            )
        )
    else:
        for f in files:
            entries[f] = _entry_state(f, req)
    return new_identity(entries)


def _entry_state(path: str, req: CacheRequest) -> dict[str, Any]:
    """A file's identity entry: its fsspec info if remote, else its ``stat``."""
    if is_remote(path):
        return url_state(path, fsspec_options_for(path, req))
    return file_state(path)


def _remote_checker(req: CacheRequest) -> StateOf:
    """How a check measures remote entries now (one request each)."""

    def state(name: str, planned: Mapping[str, Any]) -> dict[str, Any]:
        if planned.get("kind") == "remote-listing":
            return listing_state(name, fsspec_options_for(name, req)) or {"missing": True}
        return url_state(name, fsspec_options_for(name, req))

    return state


def check_sources(req: CacheRequest, ident: Mapping[str, Any] | None) -> int:
    """Check every entry of the planned identity ``ident``; returns how many were checked.

    Raises
    ------
    SourceChanged
        Naming the entry that changed and what changed.
    """
    return check_identity(ident, None, _remote_checker(req), req.remote_concurrency)


ChunkRanges = Mapping[str, Mapping[str, Sequence[int]]]


def job_entries(
    planned: Mapping[str, Any],
    refs: Mapping[str, Any] | None,
    variables: Sequence[str] | None,
    concat_range: tuple[int, int] | None,
    chunk_ranges: ChunkRanges | None = None,
) -> list[str]:
    """The identity entries a job reads.

    ``planned`` is the layout as planned (``SourceLayout.to_json``), ``refs`` a kerchunk
    source's references, ``variables`` the source variables the job reads (None: all),
    ``concat_range`` its source index range along the joining dimension (None: all of it) and
    ``chunk_ranges`` per source variable and dimension the source chunks ``[lo, hi)`` it reads
    (:meth:`~zarr_parallel.sources.target.Target.source_chunk_ranges`; None: all of them).
    """
    entries = dict((planned.get("identity") or {}).get("entries") or {})
    files = [str(f) for f in planned.get("files") or []]
    if variables is None or not files:
        return list(entries)
    dims = {k: list(v.get("dims") or []) for k, v in (planned.get("variables") or {}).items()}
    if planned.get("engine") == "zarr":
        return _zarr_job_entries(files[0], entries, variables, dims, chunk_ranges)
    if planned.get("engine") == "kerchunk":
        used = _referenced_entries(refs or {}, variables, entries, dims, chunk_ranges)
        return [files[0], *used]
    if planned.get("groups"):
        # Files holding different variables: the job reads its variables' files only.
        found: list[str] = []
        for name in variables:
            mine, lengths = group_files(planned, name)
            found += [f for f in _files_in_range(mine, lengths, concat_range) if f not in found]
        return found
    return _files_in_range(files, planned.get("file_lengths") or [], concat_range)


def _files_in_range(
    files: Sequence[str], lengths: Sequence[int], concat_range: tuple[int, int] | None
) -> list[str]:
    """The files of a multi-file source holding steps ``[lo, hi)`` along the joining dimension."""
    if concat_range is None or len(lengths) != len(files):
        return list(files)
    starts = np.cumsum([0, *[int(n) for n in lengths]])
    lo, hi = concat_range
    return [f for i, f in enumerate(files) if starts[i] < hi and lo < starts[i + 1]]


def _zarr_job_entries(
    store: str,
    entries: Mapping[str, Any],
    variables: Sequence[str],
    dims: Mapping[str, Sequence[str]],
    chunk_ranges: ChunkRanges | None,
) -> list[str]:
    """A Zarr store's entries a job reads: the root documents, and its arrays (a local array
    folder, or a remote array's documents and its sampled chunks in the job's region)."""
    base = store.rstrip("/")
    found = []
    for e in entries:
        if (entries[e] or {}).get("kind") == "remote-listing":
            continue  # checked at planning and before publishing, not by each job
        rel = e[len(base) + 1 :] if e.startswith(base + "/") else e
        name, _, key = rel.partition("/")
        if not key:
            if name in _ZARR_ROOT_DOCS or name in variables:
                found.append(e)
        elif name in variables:
            ranges = None if chunk_ranges is None else chunk_ranges.get(name)
            if within(chunk_index(key), dims.get(name, ()), ranges):
                found.append(e)
    return found


def _referenced_entries(
    refs: Mapping[str, Any],
    variables: Sequence[str],
    entries: Mapping[str, Any],
    dims: Mapping[str, Sequence[str]],
    chunk_ranges: ChunkRanges | None,
) -> list[str]:
    """The files (local paths, URLs) a kerchunk reference points at for the chunks of
    ``variables`` the job reads (all of their chunks without ``chunk_ranges``)."""
    mine = {}
    for key, value in refs_only(refs).items():
        name, _, rest = key.partition("/")
        if name not in variables:
            continue
        ranges = chunk_ranges.get(name) if chunk_ranges is not None else None
        if within(chunk_index(rest), dims.get(name, ()), ranges):
            mine[key] = value
    used = referenced_urls({"refs": mine, "templates": refs.get("templates") or {}})
    wanted = {u if is_remote(u) else u.removeprefix("file://") for u in used}
    return sorted(wanted & set(entries))


def check_job_sources(
    req: CacheRequest,
    planned: Mapping[str, Any],
    refs: Mapping[str, Any] | None,
    variables: Sequence[str] | None,
    concat_range: tuple[int, int] | None,
    chunk_ranges: ChunkRanges | None = None,
) -> int:
    """Check the entries one job reads (see :func:`job_entries`) before it reads them.

    Returns the number of entries checked.

    Raises
    ------
    SourceChanged
        Naming the entry that changed and what changed.
    """
    names = job_entries(planned, refs, variables, concat_range, chunk_ranges)
    return check_identity(
        planned.get("identity"), names, _remote_checker(req), req.remote_concurrency
    )
