"""A version's manifest: its plan, its owner, the records of finished jobs, and completeness.

Everything here is a small JSON file in the version's ``.zarr-parallel/`` folder, written
atomically: ``plan.json`` (written last at initialisation), ``owner.json``, ``jobs/<id>.json``
(one per finished job, written once its chunks are durable), ``lock.json`` (the fence of the run
writing the version) and ``complete.json`` (once every job and chunk is there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from zarr_parallel.errors import LockLost, RunFailed
from zarr_parallel.faults import fault_point
from zarr_parallel.planning.jobs import Job, read_jobs
from zarr_parallel.store.chunks import array_names, chunk_files, missing_chunk_files, sync_job
from zarr_parallel.store.disk_names import FENCE_FILE, OWNER_FILE, manifest_dir
from zarr_parallel.store.files import fsync_dir, read_json, write_json_atomic
from zarr_parallel.store.lock import held_token


def plan_record(version: Path) -> dict[str, Any] | None:
    """The plan stored in a version (present once initialisation finished)."""
    return read_json(manifest_dir(version) / "plan.json")


def version_owner(version: Path) -> str | None:
    """The cache path a version records as its own, or None when it records none."""
    for name in (OWNER_FILE, "plan.json"):
        rec = read_json(manifest_dir(version) / name)
        if rec and rec.get("cache_path"):
            return str(rec["cache_path"])
    return None


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
    # Pruning comes after the switch: the run published its version, and removes nothing more.
    done = "removed no old version" if before.startswith("pruning") else "published nothing"
    raise LockLost(
        f"this run no longer holds the lock {lock} ({how}: the run was paused past the stale "
        f"threshold and its lock was broken). It stopped before {before} and {done}; the "
        "cache is as the other run left it. Run again when no other run is active"
    )


def check_fence(version: Path, before: str, token: str | None = None) -> None:
    """Check that the run writing ``version`` still holds the cache's lock.

    ``token`` is the token the job's own run took the lock with, carried to the job with it
    (:func:`zarr_parallel.run.job.run_job`'s ``fence``). Without one, the token this process
    holds the lock with is used, and else the version's fence record: the token of whichever
    run last initialised or resumed the version. That last fallback cannot tell a run whose
    lock was broken from the run that took the version over, so every run passes its token.

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
        if token is not None:
            raise LockLost(
                f"{version} lost its lock fence record while this job ran (the run holding "
                f"the lock started it afresh); stopped before {before}"
            )
        return
    lock = Path(str(fence["lock"]))
    mine = token or held_token(lock)
    check_lock_token(lock, mine or str(fence["token"]), before)


def record_job(version: Path, record: Mapping[str, Any], fence: str | None = None) -> None:
    """Record a finished job, once its chunks are durable, if its run still holds the lock.

    The job's chunk files (named by the record's ``variables`` and ``region``) and their folders
    are fsynced first, so a record always means the data survives a crash of the machine, not
    only of the process. The record itself is written atomically and durably. ``fence`` is the
    lock token of the job's run (see :func:`check_fence`): a run whose lock was broken records
    nothing, even when the run that took the lock over resumed this same version.
    """
    sync_job(version, record)
    fault_point("job-written")
    before = f"recording job {record['id']}"
    check_fence(version, before, fence)
    jobs = manifest_dir(version) / "jobs"
    try:
        # No parents: a record must never bring back a version another run removed.
        jobs.mkdir(exist_ok=True)
        write_json_atomic(jobs / f"{int(record['id']):06d}.json", record, parents=False)
    except OSError:
        # The lock can be broken between the check and the write (the check is not atomic with
        # it): when the run that took it over removed this version, say so, not ENOENT.
        check_fence(version, before, fence)
        raise
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


def check_complete(version: Path, plan_json: Mapping[str, Any]) -> None:
    """Every job recorded and every chunk present, else :class:`RunFailed`."""
    fp = str(plan_json["fingerprint"])
    jobs = read_jobs(plan_json)
    expected = set(jobs)
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
        covering = _jobs_covering(version, jobs.values(), lost)
        for job_id in covering:
            unrecord_job(version, job_id)
        name, files = next(iter(lost.items()))
        raise RunFailed(
            f"{sum(map(len, lost.values()))} chunk files are missing although their jobs were "
            f"recorded (first: {files[0].relative_to(version)}); the store was changed behind "
            f"the run. The records of jobs {covering[:10]} were removed: run again with "
            "resume='auto' to write them again",
            [{"id": j} for j in covering],
        )


def _jobs_covering(version: Path, jobs: Iterable[Job], lost: Mapping[str, list[Path]]) -> list[int]:
    """Ids of the jobs whose region holds one of the ``lost`` chunk files (by array name)."""
    out = []
    for job in jobs:
        for name in job.variables:
            if name in lost and set(chunk_files(version, name, job.bounds)) & set(lost[name]):
                out.append(job.id)
                break
    return sorted(out)


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
