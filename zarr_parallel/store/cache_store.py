"""Cache paths, versions, store initialisation, manifest records and atomic publish.

Layout (DESIGN §2a): the final path ``P`` is a symlink to the current version
``P.versions/<n>-<fingerprint12>/``. Each version is a Zarr store holding its manifest in
``.zarr-parallel/`` (``plan.json`` once initialised, ``jobs/<id>.json`` per finished job,
``complete.json`` once checked). Publishing replaces the link atomically; the previous version
stays readable until then and is kept (``keep_versions``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from zarr_parallel.errors import LockLost, RequestError, RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.source import source_stem
from zarr_parallel.sources.target import Target
from zarr_parallel.store.provenance import provenance_attrs
from zarr_parallel.transforms.registry import PACKING_ASKED

logger = logging.getLogger(__name__)

MANIFEST_DIR = ".zarr-parallel"
#: In the versions folder: the file whose flock serialises breakers of a stale lock.
LOCK_GUARD = ".lock-break"
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
}
_PACKING_KEYS = {"scale_factor", "add_offset"}


@dataclass(frozen=True)
class CachePaths:
    """Where a cache lives: the final link, its versions and its lock file."""

    final: Path

    @property
    def versions(self) -> Path:
        """Folder holding every version of this cache."""
        return self.final.with_name(self.final.name + ".versions")

    @property
    def lock(self) -> Path:
        """Lock file guarding the cache."""
        return self.final.with_name(self.final.name + ".lock")

    def version(self, number: int, fingerprint: str) -> Path:
        """Path of version ``number`` with this plan fingerprint."""
        return self.versions / f"{number}-{fingerprint[:12]}"

    def current(self) -> Path | None:
        """The published version, if any."""
        if self.final.is_symlink():
            return self.final.resolve()
        return None

    @property
    def canonical(self) -> str:
        """The final path with its folder's symlinks resolved: what manifests record."""
        return os.path.join(os.path.realpath(self.final.parent), self.final.name)

    def _numbered(self) -> list[Path]:
        if not self.versions.is_dir():
            return []
        found = [
            p for p in self.versions.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name.split("-")[0]))

    def all_versions(self) -> list[Path]:
        """Version folders of this cache (owned, see :func:`owns_version`), oldest first.

        Folders in the versions folder that this cache cannot prove it made (copied from another
        cache, adopted 0.5 stores, anything else) are left out: nothing here ever continues,
        cleans or prunes them.
        """
        return [v for v in self._numbered() if owns_version(self, v)]

    def next_version(self, fingerprint: str) -> Path:
        """A new version folder path for this fingerprint (numbered past every folder there)."""
        existing = self._numbered()
        number = int(existing[-1].name.split("-")[0]) + 1 if existing else 1
        return self.version(number, fingerprint)


#: In a version's manifest: the cache path the version was made for, written right after the
#: version's Zarr metadata (zarr refuses to create a store in a folder that holds anything).
OWNER_FILE = "owner.json"


def version_owner(version: Path) -> str | None:
    """The cache path a version records as its own, or None when it records none."""
    for name in (OWNER_FILE, "plan.json"):
        rec = read_json(manifest_dir(version) / name)
        if rec and rec.get("cache_path"):
            return str(rec["cache_path"])
    return None


#: ``P.versions/.pending/<version>.json``: the cache path a version is being made for, written
#: before zarr creates the version's folder and removed once the version records its owner. A
#: run killed among zarr's metadata writes leaves a folder with no manifest; this record lets the
#: next run prove it made it (and remove it as a stale staging version).
PENDING_DIR = ".pending"


def pending_record(paths: CachePaths, version: Path) -> Path:
    """Where the owner of a version still being created is recorded."""
    return paths.versions / PENDING_DIR / f"{version.name}.json"


def owns_version(paths: CachePaths, version: Path) -> bool:
    """True when ``version`` is provably a version of the cache at ``paths.final``.

    Its manifest names this cache path (or, while zarr was creating it, its pending record
    does); versions made before the path was recorded count when they hold a plan with its
    request (only zarr-parallel writes that).
    """
    owner = version_owner(version)
    if owner is None:
        pending = read_json(pending_record(paths, version))
        owner = str(pending["cache_path"]) if pending and pending.get("cache_path") else None
    if owner is not None:
        return owner == paths.canonical
    rec = plan_record(version)
    return rec is not None and "request" in rec


def resolve_paths(req: CacheRequest) -> CachePaths:
    """The final cache path of a request; refuses paths that cannot be written."""
    value: str | None
    if req.cache_store is not None:
        final = Path(req.cache_store).expanduser()
        parameter, value = "cache_store", req.cache_store
    else:
        name = f"{req.cache_name or source_stem(req)}{req.cache_label}.zarr"
        final = Path(str(req.cache_dir)).expanduser() / name
        parameter, value = "cache_dir", req.cache_dir
        # The name (source stem + label) must stay one folder inside cache_dir.
        if os.path.dirname(name) or name in (".", ".."):
            raise RequestError(
                "cache_name",
                req.cache_name or name,
                f"would make the cache {name!r}, which is not a plain folder name in cache_dir",
                "Set cache_name to a plain name such as 'era5'",
            )
    final = Path(os.path.abspath(final))
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RequestError(
            parameter,
            value,
            f"cannot be created: {ancestor} is a file",
            "Choose a folder you can write to",
        )
    # Try it: permission bits say nothing to root, and read-only mounts deny everyone.
    # An unnamed file (O_TMPFILE where the file system has it): a run killed here leaves no
    # probe file beside the user's files.
    try:
        with tempfile.TemporaryFile(prefix=".zarr-parallel-probe-", dir=ancestor):
            pass
    except OSError as e:
        raise RequestError(
            parameter,
            value,
            f"is not writable ({ancestor}: {e.strerror or e})",
            "Choose a folder you can write to, or fix its permissions",
        ) from e
    return CachePaths(final)


def check_cache_location(req: CacheRequest, paths: CachePaths) -> None:
    """Refuse, before anything is written, a cache path a run could not safely write.

    What is at the final path must be absent or provably this cache's (see
    :func:`inspect_final`), and the cache must neither hold nor lie inside a local source.
    Runs call this before taking the lock; ``verify`` (which only reads) does not.

    Raises
    ------
    RequestError
        On ``cache_store`` (or ``cache_dir``), saying what is there and what to do.
    """
    parameter = "cache_store" if req.cache_store is not None else "cache_dir"
    value = req.cache_store if req.cache_store is not None else req.cache_dir
    check_apart_from_sources(req, paths, parameter, value)
    found = inspect_final(paths)
    if found.kind == "foreign":
        raise RequestError(
            parameter,
            value,
            f"{paths.final} {found.text}; a run replaces only what it can prove is a "
            "zarr-parallel cache of this path, so it refuses to start",
            "Choose another path, or move or delete what is there yourself",
        )


@dataclass(frozen=True)
class FinalState:
    """What is at a cache's final path, and whether a run may replace it.

    ``kind`` is ``absent``; ``ours`` (a link to a version of this cache); ``empty`` (an empty
    folder, removed at publish); ``adoptable`` (a Zarr store holding nothing but Zarr metadata
    and chunk files, e.g. from zarr-parallel 0.5: moved aside at publish and never deleted); or
    ``foreign`` (anything else: never touched). ``text`` says what is there, in words.
    """

    kind: str
    text: str = ""


#: File names of Zarr metadata (v3, and v2 with its consolidated ``.zmetadata``).
_ZARR_METADATA = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
_V2_CHUNK = re.compile(r"^\d+(\.\d+)*$")
_V3_CHUNK = re.compile(r"^c([./]\d+)*$")


def inspect_final(paths: CachePaths) -> FinalState:
    """Look at what is at ``paths.final`` (reads only) and say whether a run may replace it."""
    final = paths.final
    if final.is_symlink():
        return _inspect_link(paths)
    if not final.exists():
        return FinalState("absent")
    if not final.is_dir():
        return FinalState("foreign", "points at a file (or another non-folder entry), not a cache")
    if (final / MANIFEST_DIR).exists():
        owner = version_owner(final) or "an unknown path"
        return FinalState(
            "foreign", f"is a copy of a zarr-parallel cache version (made for {owner})"
        )
    stray = _non_zarr_file(final)
    if stray is None:
        return FinalState("empty", "is an empty folder")
    if stray == "":
        return FinalState("adoptable", "is a Zarr store made by another tool")
    return FinalState("foreign", f"is a folder holding files that are not Zarr's ({stray})")


def _inspect_link(paths: CachePaths) -> FinalState:
    final = paths.final
    target = Path(os.path.realpath(final))
    versions = Path(os.path.realpath(paths.versions))
    if target.parent != versions:
        return FinalState("foreign", f"is a link to {os.readlink(final)}, not to a version of it")
    if not target.exists():
        return FinalState("ours")  # a dangling link into our versions folder: only a link
    owner = version_owner(target)
    if owner is not None and owner != paths.canonical:
        return FinalState("foreign", f"is a link to a version of another cache ({owner})")
    if owner is None and not owns_version(paths, target):
        return FinalState("foreign", f"is a link to {target}, which no manifest says is ours")
    return FinalState("ours")


def _non_zarr_file(root: Path) -> str | None:
    """The first file under ``root`` that is neither Zarr metadata nor a chunk file.

    Returns ``""`` when every file is Zarr's, and None when there are no files at all.
    A chunk file must sit inside an array folder (one holding ``zarr.json`` or ``.zarray``)
    under a chunk key: ``c/0/1`` or ``c.0.1`` (v3), ``0.1`` or ``0/1`` (v2).
    """
    arrays: list[str] = []
    seen = False
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        if ".zarray" in files or ("zarr.json" in files and _is_v3_array(Path(folder))):
            arrays.append("" if rel == "." else rel)
        for name in sorted(files):
            seen = True
            if name in _ZARR_METADATA:
                continue
            path = os.path.normpath(os.path.join(rel, name))
            if not _is_chunk_key(path, arrays) or os.path.islink(os.path.join(folder, name)):
                return path
        for d in list(dirs):
            if os.path.islink(os.path.join(folder, d)):
                return os.path.normpath(os.path.join(rel, d))
    return "" if seen else None


def _is_v3_array(folder: Path) -> bool:
    meta = read_json(folder / "zarr.json") or {}
    return meta.get("node_type") == "array"


def _is_chunk_key(path: str, arrays: Sequence[str]) -> bool:
    for array in arrays:
        if array and not path.startswith(array + os.sep):
            continue
        key = path[len(array) + 1 :] if array else path
        if _V3_CHUNK.match(key) or all(_V2_CHUNK.match(p) for p in key.split(os.sep)):
            return True
    return False


def check_apart_from_sources(
    req: CacheRequest, paths: CachePaths, parameter: str, value: Any
) -> None:
    """Refuse a cache path that holds, or lies inside, a local source path.

    Publishing moves what is at the final path aside and pruning deletes versions, so a
    cache folder around its own sources (or inside a source store) could destroy them.
    """
    final = Path(paths.canonical)
    versions = Path(os.path.realpath(paths.versions))
    uris = req.data_uri if isinstance(req.data_uri, list) else [req.data_uri]
    for uri in uris:
        text = str(uri)
        if "://" in text and not text.startswith("file://"):
            continue
        source = Path(os.path.realpath(os.path.expanduser(text.removeprefix("file://"))))
        inside = next((p for p in (final, versions) if source.is_relative_to(p)), None)
        if inside is not None or final.is_relative_to(source):
            where = f"holds the source {source}" if inside else f"lies inside the source {source}"
            raise RequestError(
                parameter,
                value,
                f"the cache {final} {where}; publishing and pruning versions could destroy it",
                "Choose a cache path outside the source files and folders",
            )


@contextlib.contextmanager
def quiet_manifest() -> Iterator[None]:
    """Hide the two zarr warnings every run would print at the calls below, and no others.

    The manifest folder inside each version (``.zarr-parallel``) is ours, not a Zarr node, so
    zarr warns whenever it lists the group; and zarr warns that consolidated metadata is not
    part of the v3 specification (we consolidate on purpose, once, at the end; xarray and zarr
    read it).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=f"Object at {re.escape(MANIFEST_DIR)} is not recognized",
            category=UserWarning,
        )
        warnings.filterwarnings(
            "ignore", message="Consolidated metadata is currently not part", category=UserWarning
        )
        yield


def manifest_dir(version: Path) -> Path:
    """The manifest folder of a version."""
    return version / MANIFEST_DIR


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON document, or None when missing or torn."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON durably: temporary file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new or renamed files) durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_files(files: Iterable[Path], root: Path) -> int:
    """fsync ``files`` and every folder between them and ``root``; returns files synced.

    Missing files are skipped: Zarr leaves a chunk that holds only the fill value unwritten.
    """
    folders: set[Path] = set()
    count = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        count += 1
        parent = path.parent
        # New chunk files may sit in new folders (v3's c/0/1/): make every entry up to root durable.
        while parent not in folders:
            folders.add(parent)
            if parent == root or parent == parent.parent:
                break
            parent = parent.parent
    for folder in folders:
        fsync_dir(folder)
    return count


@lru_cache(maxsize=256)
def array_grid(
    version: str, name: str
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], Any]:
    """Dimension names, shape, file grid (shards or chunks) and metadata of one array."""
    arr = zarr.open_array(version, path=name, mode="r")
    md = arr.metadata
    if md.zarr_format == 3:
        dims = tuple(str(d) for d in (md.dimension_names or ()))
    else:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")
        dims = tuple(str(d) for d in names) if isinstance(names, list) else ()
    return dims, tuple(arr.shape), tuple(arr.shards or arr.chunks), md


def chunk_files(version: Path, name: str, region: Mapping[str, tuple[int, int]]) -> list[Path]:
    """The chunk (or shard) files of array ``name`` that hold ``region`` (dim → start, stop)."""
    dims, shape, grid, md = array_grid(str(version), name)
    ranges = []
    for dim, size, chunk in zip(dims, shape, grid, strict=True):
        start, stop = region.get(dim, (0, size))
        ranges.append(range(start // chunk, -(-stop // chunk)))
    return [version / name / md.encode_chunk_key(c) for c in itertools.product(*ranges)]


def sync_job(version: Path, record: Mapping[str, Any]) -> int:
    """fsync every chunk file a job wrote (from its record's variables and region).

    A record without ``variables`` and ``region`` cannot say which files are its own: then the
    whole system is synced (slower, still correct).
    """
    if "region" not in record or "variables" not in record:
        logger.warning("job record without variables/region: syncing every file system")
        os.sync()
        return 0
    region = {str(d): (int(a), int(b)) for d, a, b in record["region"]}
    return sync_region(version, [str(n) for n in record["variables"]], region)


def sync_region(version: Path, names: Sequence[str], region: Mapping[str, tuple[int, int]]) -> int:
    """fsync the chunk files of arrays ``names`` that hold ``region`` (and their folders)."""
    files = [f for name in names for f in chunk_files(version, name, region)]
    return sync_files(files, version)


def plan_record(version: Path) -> dict[str, Any] | None:
    """The plan stored in a version (present once initialisation finished)."""
    return read_json(manifest_dir(version) / "plan.json")


#: Request fields that change how a run goes but not what it writes or how it is planned.
_RUN_ONLY_FIELDS = {
    "overwrite",
    "resume",
    "log_level",
    "generate_stats",
    "retries",
    "keep_versions",
    "min_version_age",
    "break_lock",
    "recommend_changes",
    "cache_store",
    "cache_dir",
    "cache_name",
    "cache_label",
}


def same_content(stored: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """True when the version whose ``plan.json`` is ``stored`` holds what plan ``new`` writes.

    The same plan, or the same content planned differently: another deploy mode, worker count
    or memory limit splits the same arrays into other jobs, and writes the same bytes. A
    re-cache append also records the full plan it equals (``full_*`` keys).
    """
    if not stored:
        return False
    for key in ("fingerprint", "content_fingerprint"):
        value = new.get(key)
        if value and value in (stored.get(key), stored.get(f"full_{key}")):
            return True
    return False


def plan_differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between two stored plans (``plan.json``), in words, most telling first.

    Request fields that differ (``field: old → new``), then a changed source (files added or
    removed, or sizes and modification times), else the job regions.
    """
    if not old:
        return ["the other version has no plan (its initialisation was interrupted)"]
    out: list[str] = []
    old_req, new_req = dict(old.get("request") or {}), dict(new.get("request") or {})
    for key in sorted(set(old_req) | set(new_req)):
        if key in _RUN_ONLY_FIELDS or old_req.get(key) == new_req.get(key):
            continue
        out.append(f"{key}: {_short(old_req.get(key))} → {_short(new_req.get(key))}")
    old_src, new_src = dict(old.get("layout") or {}), dict(new.get("layout") or {})
    if old_src.get("digest") != new_src.get("digest"):
        old_files, new_files = set(old_src.get("files", [])), set(new_src.get("files", []))
        if old_files != new_files:
            added = sorted(os.path.basename(f) for f in new_files - old_files)
            gone = sorted(os.path.basename(f) for f in old_files - new_files)
            out.append(f"source files added {added[:3]}, removed {gone[:3]}")
        else:
            out.append("the source files changed (size or modification time)")
    if not out and old.get("fingerprint") != new.get("fingerprint"):
        out.append("the job regions differ (the plan changed)")
    return out


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def is_complete(version: Path) -> bool:
    """True when the version passed its completeness check."""
    return (manifest_dir(version) / "complete.json").exists()


def recorded_jobs(version: Path, fingerprint: str) -> set[int]:
    """Ids of jobs recorded as finished under this plan fingerprint."""
    jobs_dir = manifest_dir(version) / "jobs"
    done: set[int] = set()
    if not jobs_dir.is_dir():
        return done
    for p in jobs_dir.glob("*.json"):
        rec = read_json(p)
        if rec and rec.get("fingerprint") == fingerprint:
            done.add(int(rec["id"]))
    return done


#: In a version's manifest: the lock file and token of the run writing the version.
FENCE_FILE = "lock.json"


def write_fence(version: Path, lock: Path, token: str) -> None:
    """Note in ``version`` that the run holding ``lock`` with ``token`` writes it."""
    write_json_atomic(manifest_dir(version) / FENCE_FILE, {"lock": str(lock), "token": token})


def check_lock_token(lock: Path, token: str, before: str) -> None:
    """Raise :class:`LockLost` unless the lock file ``lock`` still holds ``token``.

    A run paused long enough for another run to break its lock (``break_lock``) must not
    record or publish anything when it wakes: the other run may have published since.
    """
    rec = read_json(lock)
    held = rec.get("token") if rec else None
    if held == token:
        return
    how = "another run took it over" if held else "it is gone"
    raise LockLost(
        f"this run no longer holds the lock {lock} ({how}: the run was paused past the stale "
        f"threshold and its lock was broken). It stopped before {before} and published "
        "nothing; the cache is as the other run left it. Run again when no other run is active"
    )


def check_fence(version: Path, before: str) -> None:
    """Check that the run writing ``version`` (its fence record) still holds the cache's lock.

    A version without a fence record was written without a lock (direct library use): no check.
    A version whose manifest vanished was removed by the run that took the lock over.
    """
    fence = read_json(manifest_dir(version) / FENCE_FILE)
    if fence is None:
        if not (manifest_dir(version) / "plan.json").exists():
            raise LockLost(
                f"{version} was removed while this job ran (another run took the cache's lock "
                f"over and cleaned it); stopped before {before}"
            )
        return
    check_lock_token(Path(str(fence["lock"])), str(fence["token"]), before)


def record_job(version: Path, record: Mapping[str, Any]) -> None:
    """Record a finished job, once its chunks are durable.

    The job's chunk files (named by the record's ``variables`` and ``region``) and their folders
    are fsynced first, so a record always means the data survives a crash of the machine, not
    only of the process. The record itself is written atomically and durably.
    """
    sync_job(version, record)
    fault_point("job-written")
    check_fence(version, f"recording job {record['id']}")
    write_json_atomic(manifest_dir(version) / "jobs" / f"{int(record['id']):06d}.json", record)
    fault_point("job-recorded")


def unrecord_job(version: Path, job_id: int) -> None:
    """Remove a job's record (its chunks are missing or wrong): the next run writes it again."""
    (manifest_dir(version) / "jobs" / f"{int(job_id):06d}.json").unlink(missing_ok=True)
    fsync_dir(manifest_dir(version) / "jobs")


def iter_job_records(version: Path) -> Iterator[dict[str, Any]]:
    """Every job record of a version."""
    for p in sorted((manifest_dir(version) / "jobs").glob("*.json")):
        rec = read_json(p)
        if rec:
            yield rec


def _encoding(
    var: xr.DataArray,
    chunks: dict[str, int],
    shards: dict[str, int] | None,
    keep_packing: bool = False,
) -> dict[str, Any]:
    enc = {k: v for k, v in var.encoding.items() if k not in _STORAGE_KEYS}
    asked = bool(enc.pop(PACKING_ASKED, False))
    if _PACKING_KEYS & set(enc) and not keep_packing and not asked:
        # Decoded as xarray decodes (DESIGN §2a): write the floats, not the packed integers.
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
    return enc


def initialise_store(
    target: Target, version: Path, req: CacheRequest, plan_json: dict[str, Any]
) -> None:
    """Write metadata, coordinates and attributes only; no data array is computed.

    ``plan.json`` is written last: a version without it was interrupted during initialisation
    and is started again.
    """
    paths = CachePaths(Path(str(plan_json["cache_path"]))) if "cache_path" in plan_json else None
    if version.exists():
        if paths is not None and not owns_version(paths, version):
            raise RunFailed(
                f"{version} exists and is not a version of {paths.final}; it is left alone. "
                "Move it away and run again"
            )
        shutil.rmtree(version)
    version.parent.mkdir(parents=True, exist_ok=True)
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
        encoding[str(name)] = _encoding(var, chunks, shards, req.keep_packing)
    for name, coord in template.coords.items():
        coord_enc = {k: v for k, v in coord.encoding.items() if k not in _STORAGE_KEYS}
        encoding[str(name)] = coord_enc
        out[name].encoding = {}
    # Coordinates are small and loaded here; data variables are dask placeholders, not written.
    out = out.assign_coords({k: v.load() for k, v in out.coords.items()})
    if paths is not None:
        write_json_atomic(pending_record(paths, version), {"cache_path": paths.canonical})
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
    write_json_atomic(manifest_dir(version) / "plan.json", plan_json)


def write_region(version: Path, name: str, data: xr.DataArray, region: dict[str, slice]) -> None:
    """Write whole chunks of one variable into an initialised store, after an alignment check."""
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
        import base64

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
) -> None:
    """Write decoded values of one variable's region as whole chunks, with zarr directly.

    The same alignment check as :func:`write_region`. zarr encodes the chunks concurrently (its
    async pipeline, codecs in threads). When xarray's CF encoding would change the stored values
    (packing, a non-NaN fill for floats, times), the write goes through :func:`write_region`.
    """
    full = {d: region.get(d, slice(0, n)) for d, n in zip(dims, values.shape, strict=True)}
    arr = zarr.open_array(version, path=name, mode="r+")
    ordered = {d: full[d] for d in dims}
    if not _stores_as_is(arr, values.dtype):
        write_region(version, name, xr.DataArray(values, dims=list(dims)), ordered)
        return
    _check_aligned(arr, name, ordered)
    arr = arr.with_config({"write_empty_chunks": True})
    from zarr_parallel.planning.memory import FAST_WRITE_INFLIGHT

    if arr.shards is None:
        _write_chunkwise(arr, ordered, values, FAST_WRITE_INFLIGHT)
        return
    # The memory model counts FAST_WRITE_INFLIGHT chunks being encoded at once.
    with zarr.config.set({"async.concurrency": FAST_WRITE_INFLIGHT}):
        arr[tuple(ordered.values())] = values


def _write_chunkwise(
    arr: Any, region: Mapping[str, slice], values: np.ndarray, threads: int
) -> None:
    """Hand zarr one whole chunk at a time from a reused buffer, ``threads`` chunks at once.

    Given a region of many chunks, zarr makes a new chunk-sized buffer for each chunk, fills it
    with the fill value and copies the chunk into it before encoding: two passes over the data,
    on fresh pages (job processes return freed memory to the system, see write.py). A value of
    exactly one chunk's shape is encoded as it is, so each thread copies its chunk into its own
    buffer, reused from chunk to chunk. Chunks at the array's edge go through zarr's padding.
    """
    chunks = tuple(int(c) for c in arr.chunks)
    bounds = list(region.values())
    local = threading.local()

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
        arr[box] = buffer

    corners = itertools.product(
        *(range(int(sl.start), int(sl.stop), c) for sl, c in zip(bounds, chunks, strict=True))
    )
    with ThreadPoolExecutor(threads, thread_name_prefix="zp-chunk") as pool:
        for done in [pool.submit(write, corner) for corner in corners]:
            done.result()


def check_complete(version: Path, plan_json: Mapping[str, Any]) -> None:
    """Every job recorded and every chunk present, else :class:`RunFailed`."""
    fp = str(plan_json["fingerprint"])
    expected = {int(j[0]) for j in plan_json["job_list"]}
    missing_jobs = sorted(expected - recorded_jobs(version, fp))
    if missing_jobs:
        raise RunFailed(
            f"{len(missing_jobs)} of {len(expected)} jobs are not recorded as finished "
            f"(first: {missing_jobs[:5]}); re-run with resume to write only those",
            [{"id": j} for j in missing_jobs],
        )
    # Every chunk (or shard) file of every array, not only a count: a job whose files vanished
    # loses its record, so the next run writes it again instead of publishing a hole.
    lost: dict[str, list[Path]] = {}
    for name in array_names(version):
        missing = missing_chunk_files(version, name)
        if missing:
            lost[name] = missing
    if lost:
        jobs = _jobs_covering(version, plan_json, lost)
        for job_id in jobs:
            unrecord_job(version, job_id)
        name, files = next(iter(lost.items()))
        raise RunFailed(
            f"{sum(map(len, lost.values()))} chunk files are missing although their jobs were "
            f"recorded (first: {files[0].relative_to(version)}); the store was changed behind "
            f"the run. The records of jobs {jobs[:10]} were removed: run again with "
            "resume='auto' to write them again",
            [{"id": j} for j in jobs],
        )


def array_names(version: Path) -> list[str]:
    """Names of every array (data variables and coordinates) of a version."""
    with quiet_manifest():
        return sorted(str(n) for n, _ in zarr.open_group(version, mode="r").arrays())


def missing_chunk_files(version: Path, name: str) -> list[Path]:
    """The chunk (or shard) files of array ``name`` that do not exist (one listing, no stats)."""
    dims, shape, _, _ = array_grid(str(version), name)
    expected = chunk_files(version, name, {d: (0, s) for d, s in zip(dims, shape, strict=True)})
    present = {os.path.join(root, f) for root, _, files in os.walk(version / name) for f in files}
    return [p for p in expected if str(p) not in present]


def _jobs_covering(
    version: Path, plan_json: Mapping[str, Any], lost: Mapping[str, list[Path]]
) -> list[int]:
    out = []
    for job_id, variables, region, *_ in plan_json["job_list"]:
        bounds = {str(d): (int(a), int(b)) for d, a, b in region}
        for name in variables:
            if name in lost and set(chunk_files(version, name, bounds)) & set(lost[name]):
                out.append(int(job_id))
                break
    return sorted(out)


def finalise(version: Path, summary: Mapping[str, Any]) -> None:
    """Consolidate metadata once, make it durable, and mark the version complete."""
    with quiet_manifest():
        zarr.consolidate_metadata(version)
    # complete.json promises a readable version after a crash of the machine: the consolidated
    # metadata (v3: the root zarr.json; v2: .zmetadata and .zgroup) must be on disk before it.
    sync_files([version / n for n in ("zarr.json", ".zmetadata", ".zgroup")], version)
    write_json_atomic(manifest_dir(version) / "complete.json", {**summary, "time": time.time()})


def publish(
    paths: CachePaths,
    version: Path,
    keep_versions: int,
    min_age: float = 0.0,
    fence: Callable[[], None] | None = None,
) -> None:
    """Point the final path at ``version`` atomically and prune old versions.

    What is at the final path is looked at again here (it may have changed since pre-flight):
    a link to a version of this cache is replaced; an empty folder is removed; a Zarr store of
    another tool (only Zarr metadata and chunk files) is moved aside to
    ``P.versions/legacy-<time>`` and never deleted by zarr-parallel; anything else fails the run.
    ``fence`` (the run's lock check) is called last before the switch.
    """
    paths.final.parent.mkdir(parents=True, exist_ok=True)
    found = inspect_final(paths)
    if found.kind == "foreign":
        raise RunFailed(
            f"{paths.final} {found.text}; it appeared during the run and is not this cache's, so "
            f"{version} was not published. Move it away and run again"
        )
    if fence is not None:
        fence()
    if found.kind == "empty":
        os.rmdir(paths.final)
    elif found.kind == "adoptable":
        legacy = paths.versions / f"legacy-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        paths.versions.mkdir(parents=True, exist_ok=True)
        os.replace(paths.final, legacy)
        logger.warning(
            "moved the Zarr store that was at %s to %s; zarr-parallel never deletes it",
            paths.final,
            legacy,
        )
    previous = paths.current()
    link = paths.final.with_name(f".{paths.final.name}.{os.getpid()}.link")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(version, paths.final.parent), link)
    fault_point("publish")
    os.replace(link, paths.final)
    fsync_dir(paths.final.parent)
    fault_point("published")
    if previous is not None and previous != version and previous.is_dir():
        # When readers last saw it current: the minimum age before pruning counts from here.
        # Recorded beside the versions, not in them: a complete version is never written again.
        with contextlib.suppress(OSError):
            write_json_atomic(retired_record(paths, previous), {"time": time.time()})
    try:
        prune_versions(paths, keep_versions, min_age)
    except OSError as e:
        # Pruning is tidying up: the new version is published, so the run has succeeded; what
        # was not removed is removed by the next run's prune.
        logger.warning("published %s, but removing old versions failed (%s)", version, e)


#: Suffixes of temporary files: Zarr's chunk writes (``.partial``), this package's (``.tmp``) and
#: re-cache's copies of chunk files where hard links are refused (``.copy``).
TEMPORARY_SUFFIXES = (".partial", ".tmp", ".copy")


def clean_temporary(version: Path) -> int:
    """Remove temporary files a killed run left in a version; returns how many.

    Zarr writes each chunk to ``<key>.<uuid>.partial`` and renames it into place, so a killed
    write leaves the temporary file, never a torn chunk; the job is not recorded and runs again.
    """
    removed = 0
    for path in version.rglob("*"):
        if path.name.endswith(TEMPORARY_SUFFIXES) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def clean_stale_links(paths: CachePaths) -> None:
    """Remove half-made publish links a killed run left beside the cache (caller holds the lock)."""
    for link in paths.final.parent.glob(f".{paths.final.name}.*.link"):
        with contextlib.suppress(FileNotFoundError):
            link.unlink()


#: Prefix a version is renamed to before it is removed (see :func:`prune_versions`).
PRUNING_PREFIX = ".pruning-"
#: ``P.versions/.retired/<version>.json``: when each replaced version stopped being published.
RETIRED_DIR = ".retired"
#: Readers' leases: ``P.versions/.readers/<version>--<host>-<pid>-<random>.json``.
READERS_DIR = ".readers"
#: A lease from another host (whose process cannot be checked from here) counts this long.
LEASE_MAX_AGE = 24 * 3600.0


def retired_record(paths: CachePaths, version: Path) -> Path:
    """Where the time ``version`` was replaced is recorded."""
    return paths.versions / RETIRED_DIR / f"{version.name}.json"


def retired_at(paths: CachePaths, version: Path) -> float:
    """When ``version`` stopped being the published version (an upper bound).

    Versions replaced before this was recorded count from the current link's time: every
    version that is not current was replaced at or before the current one was published.
    """
    rec = read_json(retired_record(paths, version))
    if rec and isinstance(rec.get("time"), int | float):
        return float(rec["time"])
    try:
        return os.lstat(paths.final).st_mtime
    except OSError:
        return time.time()


def leased_versions(paths: CachePaths) -> set[str]:
    """Names of the versions a live reader holds a lease on (:mod:`zarr_parallel.store.readers`)."""
    from zarr_parallel.store.readers import live_lease

    folder = paths.versions / READERS_DIR
    if not folder.is_dir():
        return set()
    held = set()
    for lease in folder.glob("*.json"):
        name = live_lease(lease)
        if name is not None:
            held.add(name)
    return held


def prune_versions(paths: CachePaths, keep_versions: int, min_age: float = 0.0) -> None:
    """Remove complete versions beyond the newest ``keep_versions`` (never the current one).

    Only versions of this cache (:meth:`CachePaths.all_versions`) are ever removed, and of those
    not one that a live reader leased (``open_cache``) or that was replaced less than
    ``min_age`` seconds ago (a reader may have opened it just before the publish).

    Each is first renamed out of the versions' names, then removed: a removal cut short (a
    killed run) must not leave a version that still looks complete or resumable while files
    are missing from it; a later run of the same request would take it up and fail on it.
    What a cut-short removal left is removed by the next prune.
    """
    for leftover in paths.versions.glob(f"{PRUNING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    current = paths.current()
    complete = [v for v in paths.all_versions() if is_complete(v) and v != current]
    keep = max(0, keep_versions - 1)
    leased = leased_versions(paths)
    now = time.time()
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name in leased:
            logger.info("keeping old version %s: a reader holds a lease on it", old)
            continue
        age = now - retired_at(paths, old)
        if age < min_age:
            logger.info(
                "keeping old version %s: replaced %.0f s ago, less than min_version_age (%.0f s)",
                old,
                age,
                min_age,
            )
            continue
        logger.info("removing old version %s", old)
        doomed = old.with_name(PRUNING_PREFIX + old.name)
        try:
            os.replace(old, doomed)
        except OSError as e:  # pruning is tidying up: the new version is published already
            logger.warning("could not remove old version %s (%s); the next run tries again", old, e)
            continue
        fsync_dir(old.parent)
        fault_point("prune")
        shutil.rmtree(doomed, ignore_errors=True)
        retired_record(paths, old).unlink(missing_ok=True)


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 (zlib's), continuing from ``value``; libdeflate's is ~7x faster when present."""
    try:
        import deflate

        return int(deflate.crc32(data, value))
    except ImportError:  # pragma: no cover - deflate is a dependency
        import zlib

        return zlib.crc32(data, value)


def array_checksum(values: np.ndarray) -> str:
    """CRC32 of an array's bytes (what a job wrote), as hex."""
    return f"{crc32(np.ascontiguousarray(values).data):08x}"
