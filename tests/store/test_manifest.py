"""Unit tests of store/manifest.py: job records, fences and the completeness check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from zarr_parallel.errors import LockLost, RunFailed
from zarr_parallel.planning.jobs import Job
from zarr_parallel.store.chunks import chunk_files
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir
from zarr_parallel.store.manifest import (
    check_complete,
    check_fence,
    iter_job_records,
    plan_differences,
    plan_record,
    record_job,
    recorded_jobs,
    same_content,
    unrecord_job,
    version_owner,
    write_fence,
)

JOBS = [
    Job(0, ("t2m",), (("time", 0, 2), ("x", 0, 6)), 1, 1, 1),
    Job(1, ("t2m",), (("time", 2, 4), ("x", 0, 6)), 1, 1, 1),
]
PLAN = {"fingerprint": "fp-a", "job_list": [job.to_row() for job in JOBS]}


@pytest.fixture
def version(tmp_path: Path) -> Path:
    """A real Zarr v3 version: one array of 2 x 2 chunks, every chunk written, and its plan."""
    path = tmp_path / "c.zarr.versions" / "1-fp"
    root = zarr.create_group(path)
    arr = root.create_array(
        "t2m", shape=(4, 6), chunks=(2, 3), dtype="f4", dimension_names=("time", "x")
    )
    arr[:] = np.arange(24, dtype="f4").reshape(4, 6)
    manifest_dir(path).mkdir()
    (manifest_dir(path) / "plan.json").write_text(json.dumps(PLAN))
    return path


def _record(job: Job, fingerprint: str = "fp-a") -> dict[str, Any]:
    return {
        "id": job.id,
        "fingerprint": fingerprint,
        "variables": list(job.variables),
        "region": [list(r) for r in job.region],
    }


def test_records_are_kept_per_fingerprint_and_removed_one_by_one(version: Path) -> None:
    for job in JOBS:
        record_job(version, _record(job))
    record_job(version, {**_record(JOBS[0]), "id": 7, "fingerprint": "fp-other"})
    assert sorted(p.name for p in (manifest_dir(version) / "jobs").iterdir()) == [
        "000000.json",
        "000001.json",
        "000007.json",
    ]
    assert recorded_jobs(version, "fp-a") == {0, 1}
    assert recorded_jobs(version, "fp-other") == {7}
    unrecord_job(version, 0)
    unrecord_job(version, 42)  # a job never recorded: nothing to remove, no error
    assert recorded_jobs(version, "fp-a") == {1}
    assert [r["id"] for r in iter_job_records(version)] == [1, 7]


def test_torn_records_are_skipped(version: Path) -> None:
    record_job(version, _record(JOBS[1]))
    (manifest_dir(version) / "jobs" / "000000.json").write_text('{"id": 0, "finger')
    assert recorded_jobs(version, "fp-a") == {1}
    assert [r["id"] for r in iter_job_records(version)] == [1]


def test_no_jobs_folder_means_no_records(tmp_path: Path) -> None:
    assert recorded_jobs(tmp_path, "fp-a") == set()
    assert list(iter_job_records(tmp_path)) == []


def test_a_run_that_lost_its_lock_records_nothing(version: Path, tmp_path: Path) -> None:
    lock = tmp_path / "c.zarr.lock"
    lock.write_text(json.dumps({"token": "mine"}))
    write_fence(version, lock, "mine")
    record_job(version, _record(JOBS[0]))
    lock.write_text(json.dumps({"token": "another run's"}))
    with pytest.raises(LockLost, match="another run took it over"):
        record_job(version, _record(JOBS[1]))
    lock.unlink()
    with pytest.raises(LockLost, match="it is gone"):
        record_job(version, _record(JOBS[1]))
    assert recorded_jobs(version, "fp-a") == {0}


def test_a_job_checks_its_own_runs_token_not_the_versions(version: Path, tmp_path: Path) -> None:
    """A run that took the lock over and resumed this version rewrote its fence: the lock and the
    fence agree, yet a job of the run that lost the lock (its token passed) records nothing."""
    lock = tmp_path / "c.zarr.lock"
    lock.write_text(json.dumps({"token": "theirs"}))
    write_fence(version, lock, "theirs")
    with pytest.raises(LockLost, match="another run took it over"):
        record_job(version, _record(JOBS[0]), fence="mine")
    record_job(version, _record(JOBS[1]), fence="theirs")
    (manifest_dir(version) / "lock.json").unlink()
    with pytest.raises(LockLost, match="lost its lock fence record"):
        record_job(version, _record(JOBS[0]), fence="theirs")
    assert recorded_jobs(version, "fp-a") == {1}


def test_a_version_removed_between_the_check_and_the_record_says_the_lock_was_lost(
    version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence check is not atomic with the record's write: a run frozen between them (as the
    pair sweep froze one) wakes to find its version removed by the run that broke its lock. It
    stops with LockLost, not a raw ENOENT."""
    import shutil

    import zarr_parallel.store.manifest as manifest

    lock = tmp_path / "c.zarr.lock"
    lock.write_text(json.dumps({"token": "mine"}))
    write_fence(version, lock, "mine")
    real = manifest.write_json_atomic

    def taken_over_first(path: Path, data: Any, **kwargs: Any) -> None:
        lock.write_text(json.dumps({"token": "another run's"}))
        shutil.rmtree(version)
        real(path, data, **kwargs)

    monkeypatch.setattr(manifest, "write_json_atomic", taken_over_first)
    with pytest.raises(LockLost, match="was removed while this job ran"):
        record_job(version, _record(JOBS[0]), fence="mine")
    assert not version.exists()  # the record did not bring the removed version back


def test_a_version_removed_under_a_job_stops_it(version: Path) -> None:
    check_fence(version, "x")  # no fence (library use without a lock) but a plan: no check
    (manifest_dir(version) / "plan.json").unlink()
    with pytest.raises(LockLost, match="was removed while this job ran"):
        check_fence(version, "recording job 3")


def test_check_complete_names_jobs_not_recorded(version: Path) -> None:
    record_job(version, _record(JOBS[1]))
    with pytest.raises(RunFailed, match=r"1 of 2 jobs are not recorded .*\[0\]") as err:
        check_complete(version, PLAN)
    assert err.value.failed == [{"id": 0}]


def test_check_complete_unrecords_the_job_whose_chunk_vanished(version: Path) -> None:
    for job in JOBS:
        record_job(version, _record(job))
    check_complete(version, PLAN)  # every job recorded, every chunk there
    (lost,) = chunk_files(version, "t2m", {"time": (2, 4), "x": (3, 6)})
    lost.unlink()
    with pytest.raises(RunFailed, match=r"1 chunk files are missing .*jobs \[1\] were removed"):
        check_complete(version, PLAN)
    assert recorded_jobs(version, "fp-a") == {0}


def test_version_owner_prefers_owner_json_to_the_plan(version: Path) -> None:
    assert version_owner(version) is None  # the plan above records no cache path
    (manifest_dir(version) / "plan.json").write_text(json.dumps({**PLAN, "cache_path": "/p"}))
    assert version_owner(version) == "/p"
    (manifest_dir(version) / OWNER_FILE).write_text(json.dumps({"cache_path": "/q"}))
    assert version_owner(version) == "/q"
    assert plan_record(version) == {**PLAN, "cache_path": "/p"}


@pytest.mark.parametrize(
    ("stored", "new", "same"),
    [
        ({"fingerprint": "a"}, {"fingerprint": "a"}, True),
        ({"content_fingerprint": "c"}, {"fingerprint": "b", "content_fingerprint": "c"}, True),
        ({"fingerprint": "a", "full_fingerprint": "b"}, {"fingerprint": "b"}, True),
        ({"fingerprint": "a"}, {"fingerprint": "b"}, False),
        ({"fingerprint": "a"}, {"fingerprint": ""}, False),
        (None, {"fingerprint": "a"}, False),
    ],
)  # fmt: skip
def test_same_content(stored: dict[str, str] | None, new: dict[str, str], same: bool) -> None:
    assert same_content(stored, new) is same


def test_plan_differences_in_words() -> None:
    old = {
        "fingerprint": "a",
        "request": {"chunks": {"time": 24}, "retries": 1},
        "layout": {"digest": "d1", "files": ["/s/a.nc", "/s/b.nc"]},
    }
    new = {
        "fingerprint": "b",
        "request": {"chunks": {"time": 48}, "retries": 3},
        "layout": {"digest": "d2", "files": ["/s/a.nc", "/s/c.nc"]},
    }
    assert plan_differences(old, new) == [
        'chunks: {"time": 24} → {"time": 48}',  # retries changes how a run goes: not listed
        "source files added ['c.nc'], removed ['b.nc']",
    ]
    same_files = {**new, "request": old["request"], "layout": {**new["layout"], "digest": "x"}}
    assert plan_differences(new, same_files) == [
        'chunks: {"time": 48} → {"time": 24}',
        "the source files changed (size or modification time)",
    ]
    assert plan_differences({**old, "fingerprint": "z"}, old) == [
        "the job regions differ (the plan changed)"
    ]
    assert plan_differences(None, new) == [
        "the other version has no plan (its initialisation was interrupted)"
    ]
