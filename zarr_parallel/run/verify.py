"""Verify a cache: its manifest is complete, every chunk exists, and its values equal the source.

:func:`verify_cache` (also ``python -m flows.cache verify REQUEST.yaml``) checks the published
version of a request's cache:

1. the manifest: ``plan.json`` and ``complete.json`` present, every planned job recorded under
   the plan's fingerprint, and the fingerprint still the one this request and source give now;
2. every chunk (or shard) file of every array exists, and no temporary file is left;
3. the metadata: variables and coordinates with their dims, shape and dtype, and every attribute
   the source gives (a variable's or the dataset's) with the same value;
4. the values: each region read back from the cache equals the same region built from the source
   through the same target-building code the writers use (:mod:`zarr_parallel.sources.target`), in
   full, or on a seeded sample of chunks for caches larger than ``full_bytes``. In full mode each
   job's region is also checked against the CRC32 its writer recorded.

Problems are reported by variable and region. :func:`cache_differences` compares two caches
byte for byte (the tests' notion of "byte-identical caches").
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.chunk_compare import (
    chunk_regions,
    compare_region,
    coords_region,
    job_blocks,
    sample_regions,
    values_equal,
)
from zarr_parallel.run.steps import Prepared, prepare, run_lock
from zarr_parallel.run.verify_report import Problem, ProblemList, Region, VerifyReport
from zarr_parallel.sources.target import Target, cached_target
from zarr_parallel.store.chunks import array_grid, array_names, missing_chunk_files
from zarr_parallel.store.disk_names import (
    LOCK_GUARD,
    MANIFEST_DIR,
    TEMPORARY_SUFFIXES,
    quiet_manifest,
)
from zarr_parallel.store.manifest import (
    is_complete,
    iter_job_records,
    plan_differences,
    plan_record,
    same_content,
)
from zarr_parallel.store.paths import resolve_paths

logger = logging.getLogger(__name__)

#: Caches up to this many bytes (uncompressed) are compared in full by default.
FULL_BYTES = 2 * 10**9
#: Chunks compared per variable in sample mode.
SAMPLE_CHUNKS = 16

Mode = Literal["auto", "full", "sample"]


@dataclass(frozen=True)
class _Sampling:
    """How values are compared: ``mode``, and the sample's size and seed."""

    mode: Mode
    chunks: int
    seed: int
    full_bytes: int


def verify_cache(
    req: CacheRequest,
    mode: Mode = "auto",
    sample_chunks: int = SAMPLE_CHUNKS,
    seed: int = 0,
    version: str | Path | None = None,
    full_bytes: int = FULL_BYTES,
    staging: bool = False,
) -> VerifyReport:
    """Check a request's cache against its manifest and its source.

    Parameters
    ----------
    req
        The request whose cache is checked (the published version of its final path).
    mode
        ``full`` compares every chunk with the source, ``sample`` a seeded random sample of
        ``sample_chunks`` chunks per variable, ``auto`` full up to ``full_bytes`` and a sample
        beyond.
    sample_chunks, seed
        Size and seed of the sample (the same seed picks the same chunks).
    version
        Check this version folder instead of the published one (e.g. a staging version).
    full_bytes
        Uncompressed size up to which ``auto`` compares in full.
    staging
        ``version`` is a staging version checked before publishing: it is not complete yet and
        its fingerprint is the run's own (``verify_before_publish``).

    Returns
    -------
    VerifyReport
        ``ok``, the problems by variable and region, and ``text()`` for people.

    Raises
    ------
    CacheLocked
        Checking the published version while a run holds the cache's lock.
    """
    paths = resolve_paths(req)
    if version is None and paths.current() is not None:
        # A run publishing a new version (and cleaning old ones) while this reads the current
        # one would make the verdict meaningless: hold the cache's lock, as a run does. A live
        # run's lock raises CacheLocked, naming it.
        with run_lock(req, writes=False):
            return _verify(req, mode, sample_chunks, seed, None, full_bytes, staging)
    return _verify(req, mode, sample_chunks, seed, version, full_bytes, staging)


def _verify(
    req: CacheRequest,
    mode: Mode,
    sample_chunks: int,
    seed: int,
    version: str | Path | None,
    full_bytes: int,
    staging: bool,
) -> VerifyReport:
    t0 = time.perf_counter()
    paths = resolve_paths(req)
    chosen = Path(version) if version is not None else paths.current()
    report = VerifyReport(paths.final, chosen, mode, seed=seed)
    out = ProblemList(report)
    if chosen is None or not chosen.is_dir():
        out.add(Problem("manifest", f"no published cache at {paths.final}; run the request first"))
    else:
        sampling = _Sampling(mode, sample_chunks, seed, full_bytes)
        _check_version(req, chosen, report, out, sampling, staging)
    report.seconds = time.perf_counter() - t0
    return report


def _plan_now(req: CacheRequest) -> Prepared:
    """What this request and source give now, exactly as a run would plan it."""
    probe = req.model_copy(update={"overwrite": True, "resume": "auto"})
    try:
        return prepare(probe, check_location=False)
    except RecommendationsPending:
        proceed = probe.model_copy(update={"recommend_changes": "proceed"})
        return prepare(proceed, check_location=False)


def _check_version(
    req: CacheRequest,
    chosen: Path,
    report: VerifyReport,
    out: ProblemList,
    sampling: _Sampling,
    staging: bool,
) -> None:
    """Every check of one version folder, in order: manifest, files, metadata, values."""
    stored = plan_record(chosen)
    prepared = _plan_now(req)
    target = cached_target(prepared.request_json)
    current = prepared.plan_json()
    _check_manifest(chosen, stored, current, report, out, staging)

    data_vars = [str(v) for v in target.template().data_vars]
    _check_files(chosen, report, out)
    cache = _open_version(chosen, staging, out)
    if cache is None:
        return
    comparable = _check_metadata(cache, target, out)
    mode = sampling.mode
    if mode == "auto":
        total_bytes = sum(
            math.prod(target.dataset[v].shape) * target.dataset[v].dtype.itemsize for v in data_vars
        )
        mode = "full" if total_bytes <= sampling.full_bytes else "sample"
    report.mode = mode
    jobs = read_jobs(stored)
    # In full mode each job's region is compared with the CRC32 its writer recorded, when the
    # jobs are those of this content.
    by_job = mode == "full" and bool(jobs) and same_content(stored, current)
    records = {int(r["id"]): r for r in iter_job_records(chosen)}
    with dask.config.set(scheduler="synchronous"):
        for name in data_vars:
            if name not in comparable:
                continue
            dims, shape, grid, _ = array_grid(str(chosen), name)
            report.chunks_total += math.prod(
                math.ceil(s / g) for s, g in zip(shape, grid, strict=True)
            )
            if by_job:
                blocks = job_blocks(jobs.values(), name, records)
            elif mode == "full":
                blocks = ((r, None) for r in chunk_regions(dims, shape, grid))
            else:
                picked = sample_regions(dims, shape, grid, sampling.chunks, sampling.seed, name)
                blocks = ((r, None) for r in picked)
            for region, checksum in blocks:
                if by_job:
                    report.checksums_compared += checksum is not None
                    report.checksums_missing += checksum is None
                report.chunks_compared += compare_region(
                    cache, target, name, region, checksum, (dims, grid), out
                )


def _open_version(chosen: Path, staging: bool, out: ProblemList) -> xr.Dataset | None:
    """The version opened with xarray, or None (and a problem) when its metadata is unreadable."""
    try:
        # A staging version is consolidated only when published.
        consolidated = False if staging else None
        with quiet_manifest():
            cache: xr.Dataset = xr.open_zarr(
                chosen, consolidated=consolidated, chunks=None, decode_timedelta=True
            )
            return cache
    except Exception as e:  # a store whose metadata cannot be read cannot be checked further
        out.add(Problem("metadata", f"cannot be opened as Zarr ({type(e).__name__}: {e})"))
        return None


def _check_manifest(
    version: Path,
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    report: VerifyReport,
    out: ProblemList,
    staging: bool = False,
) -> None:
    if stored is None:
        out.add(Problem("manifest", f"{MANIFEST_DIR}/plan.json is missing or unreadable"))
        return
    if not staging and not is_complete(version):
        out.add(
            Problem("manifest", f"{MANIFEST_DIR}/complete.json is missing: never checked complete")
        )
    fp = str(stored.get("fingerprint"))
    planned = read_jobs(stored)
    recorded = {int(r["id"]) for r in iter_job_records(version) if str(r.get("fingerprint")) == fp}
    report.jobs, report.jobs_recorded = len(planned), len(recorded & set(planned))
    for job_id in sorted(set(planned) - recorded):
        job = planned[job_id]
        out.add(
            Problem(
                "manifest",
                f"job {job_id} is not recorded as finished",
                ", ".join(job.variables),
                job.region,
            )
        )
    if not same_content(stored, current):
        changes = plan_differences(stored, current)
        out.add(
            Problem(
                "stale",
                "the cache was made from a different request or source: "
                + "; ".join(changes[:6])
                + ". Run the request again to refresh it",
            )
        )


def _check_files(version: Path, report: VerifyReport, out: ProblemList) -> None:
    for name in array_names(version):
        dims, shape, grid, md = array_grid(str(version), name)
        total = math.prod(math.ceil(s / g) for s, g in zip(shape, grid, strict=True))
        missing = missing_chunk_files(version, name)
        report.chunk_files += total
        report.chunk_files_present += total - len(missing)
        for path in missing:
            key = path.relative_to(version / name)
            region = _region_of_key(dims, shape, grid, md, str(key))
            out.add(Problem("missing", f"chunk file {name}/{key} is missing", name, region))
    leftovers = [p for p in version.rglob("*") if p.name.endswith(TEMPORARY_SUFFIXES)]
    if leftovers:
        out.add(
            Problem(
                "extra",
                f"{len(leftovers)} temporary files left by killed writes, e.g. "
                f"{leftovers[0].relative_to(version)}",
            )
        )


def _region_of_key(
    dims: Sequence[str], shape: Sequence[int], grid: Sequence[int], md: Any, key: str
) -> Region | None:
    for coords in np.ndindex(*(math.ceil(s / g) for s, g in zip(shape, grid, strict=True))):
        if md.encode_chunk_key(tuple(int(c) for c in coords)) == key:
            return coords_region(dims, shape, grid, coords)
    return None


def _check_metadata(cache: xr.Dataset, target: Target, out: ProblemList) -> set[str]:
    """Names of data variables whose dims, shape and dtype match; problems for the others."""
    template = target.template()
    ok: set[str] = set()
    for name, want in template.data_vars.items():
        name = str(name)
        if name not in cache.data_vars:
            out.add(Problem("metadata", "is not in the cache", name))
            continue
        got = cache[name]
        if got.dims != want.dims or got.shape != want.shape:
            out.add(
                Problem(
                    "metadata",
                    f"has dims {dict(got.sizes)} in the cache but {dict(want.sizes)} from the "
                    "source",
                    name,
                )
            )
            continue
        if got.dtype != want.dtype:
            out.add(
                Problem(
                    "metadata",
                    f"has dtype {got.dtype} in the cache, {want.dtype} from the source",
                    name,
                )
            )
            continue
        _check_attrs(got.attrs, want.attrs, out, name)
        ok.add(name)
    _check_attrs(cache.attrs, template.attrs, out, None)
    for name, want in template.coords.items():
        name = str(name)
        if name not in cache.coords:
            out.add(Problem("metadata", f"coordinate {name} is not in the cache"))
            continue
        try:
            same = bool(np.array_equal(cache[name].values, want.values))
        except Exception as e:
            out.add(Problem("unreadable", f"coordinate {name}: {type(e).__name__}: {e}"))
            continue
        if not same:
            out.add(Problem("values", f"coordinate {name} differs from the source"))
    return ok


def _check_attrs(
    got: Mapping[Any, Any], want: Mapping[Any, Any], out: ProblemList, name: str | None
) -> None:
    """Every attribute the source gives is in the cache with the same value (the cache may add
    its own, such as provenance)."""
    where = "" if name else "dataset "
    for key, value in want.items():
        if key not in got:
            out.add(Problem("metadata", f"{where}attribute {key!r} is not in the cache", name))
        elif not _same_attr(got[key], value):
            out.add(
                Problem(
                    "metadata",
                    f"{where}attribute {key!r} is {got[key]!r} in the cache, {value!r} from the "
                    "source",
                    name,
                )
            )


def _same_attr(a: Any, b: Any) -> bool:
    """Attribute values equal after a trip through Zarr's JSON (tuples become lists, numpy
    scalars plain numbers, NaN stays NaN).

    >>> _same_attr([1, 2], (1, 2)), _same_attr(np.float32(0.5), 0.5), _same_attr("K", "C")
    (True, True, False)
    """
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(_same_attr(a[k], b[k]) for k in a)
        )
    try:
        return values_equal(np.asarray(a), np.asarray(b))
    except (TypeError, ValueError):
        return bool(a == b)


# ---------------------------------------------------------------------------------------------
# Byte-level comparison of two caches

#: Root-level documents ignored when comparing caches: the root group's metadata and attributes
#: (which may carry provenance such as a write time) and consolidated metadata.
ROOT_METADATA = ("zarr.json", ".zattrs", ".zgroup", ".zmetadata")


def cache_files(cache: str | Path) -> dict[str, bytes]:
    """Every file of a cache (a final path or a version folder) that byte-identity covers.

    Array metadata and chunk files, keyed by path relative to the version; the manifest
    (``.zarr-parallel/``) and the root group's metadata are left out.
    """
    root = Path(cache).resolve()
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == MANIFEST_DIR or (len(rel.parts) == 1 and rel.name in ROOT_METADATA):
            continue
        if path.is_file():
            out[rel.as_posix()] = path.read_bytes()
    return out


def cache_differences(a: str | Path, b: str | Path) -> list[str]:
    """How two caches differ byte for byte (empty when they are byte-identical).

    "Byte-identical" means the same array metadata (each array's ``zarr.json`` or
    ``.zarray``/``.zattrs``) and the same chunk files; sidecars and root metadata are ignored
    (see :data:`ROOT_METADATA`). Extra files, such as temporary files, are differences.
    """
    fa, fb = cache_files(a), cache_files(b)
    diffs = [f"only in {a}: {k}" for k in sorted(set(fa) - set(fb))]
    diffs += [f"only in {b}: {k}" for k in sorted(set(fb) - set(fa))]
    diffs += [f"differs: {k}" for k in sorted(set(fa) & set(fb)) if fa[k] != fb[k]]
    return diffs


def location_snapshot(final: str | Path) -> dict[str, str]:
    """The state of everything at a cache location, to compare before and after a run.

    Maps the final path's link target and the SHA-256 of every file under the final path's
    versions folder and beside it, by relative path; equal snapshots mean nothing there changed.
    Lock files are left out: taking, releasing or breaking a lock changes no cache.
    """

    final = Path(final)
    out: dict[str, str] = {}
    if final.is_symlink():
        out["<link>"] = os.readlink(final)
    parent = final.parent
    prefix = final.name
    if not parent.is_dir():
        return out
    for path in sorted(parent.rglob("*")):
        rel = path.relative_to(parent)
        if not rel.parts[0].startswith(prefix) or path.is_symlink():
            continue
        if rel.parts[0].startswith(f"{prefix}.lock") or rel.name == LOCK_GUARD:
            continue
        if path.is_file():
            out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel.as_posix() + "/"] = "dir"
    return out
