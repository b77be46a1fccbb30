"""Kill a whole run (SIGKILL of the flow process) at several points, then resume it.

The killed runs are real ``python -m flows.cache run REQUEST.yaml`` processes. Deterministic
points come from the ``ZARR_PARALLEL_FAULT`` hook (the process SIGKILLs itself there, see
:mod:`zarr_parallel.faults`); one run is killed from outside at whatever point it has reached.
Each resumed cache must be byte-identical to an uninterrupted run, and only the jobs not recorded
before the kill may be written again: counted from the job records (each names the pid that wrote
it) and from the chunk files' modification times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml

from core_support import cli_run, frozen_run
from zarr_parallel.api import run_request
from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import make_plan
from zarr_parallel.run.verify import cache_differences, location_snapshot, verify_cache
from zarr_parallel.store.chunks import chunk_files
from zarr_parallel.store.manifest import is_complete, iter_job_records, plan_record
from zarr_parallel.store.paths import CachePaths

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}
OTHER_CHUNKS = {"time": 24, "latitude": 40, "longitude": 72}


def _fields(files: list[Path], store: Path, chunks: dict[str, int] = CHUNKS) -> dict[str, Any]:
    return {
        "data_uri": [str(p) for p in files],
        "chunks": chunks,
        "cache_store": str(store),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 10,
        "retries": 0,
    }


@pytest.fixture(scope="module")
def reference(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the request the killed runs make."""
    store = tmp_path_factory.mktemp("reference") / "era5.zarr"
    result = run_request(build_request(**_fields(era5_files, store)))
    assert result.summary["jobs"] == 10
    return store


@pytest.fixture(scope="module")
def other_reference(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with other target chunks."""
    store = tmp_path_factory.mktemp("reference") / "other.zarr"
    run_request(build_request(**_fields(era5_files, store, OTHER_CHUNKS)))
    return store


def _request_file(fields: dict[str, Any], folder: Path) -> Path:
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def _killed_run(request: Path, fault: str) -> None:
    proc = cli_run(request, f"kill@{fault}")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {fault}: {err[-2000:]}"


def _chunk_mtimes(version: Path) -> dict[int, dict[Path, int]]:
    """Per recorded plan job, the modification time of each chunk file it covers."""
    plan = plan_record(version)
    assert plan is not None
    out: dict[int, dict[Path, int]] = {}
    for job_id, variables, region, *_ in plan["job_list"]:
        bounds = {d: (a, b) for d, a, b in region}
        files = [f for name in variables for f in chunk_files(version, name, bounds)]
        out[job_id] = {f: f.stat().st_mtime_ns for f in files if f.exists()}
    return out


def _check_resumed(
    store: Path, reference: Path, recorded_before: set[int], before: dict[int, dict[Path, int]]
) -> None:
    """Byte-identical to the reference; only unrecorded jobs were written again."""
    version = store.resolve()
    assert cache_differences(store, reference) == []
    records = {r["id"]: r for r in iter_job_records(version)}
    assert set(records) == set(range(10))
    rewritten = {i for i, r in records.items() if r["pid"] == os.getpid()}
    assert rewritten == set(range(10)) - recorded_before
    for job_id in recorded_before:
        for path, mtime in before[job_id].items():
            assert path.stat().st_mtime_ns == mtime, f"job {job_id} rewrote {path}"
    # Nothing of the killed run is left beside the cache: one version, no lock, no temp link.
    paths = CachePaths(store)
    assert paths.all_versions() == [version]
    assert not paths.lock.exists()
    assert not list(store.parent.glob(f".{store.name}.*"))


@pytest.mark.parametrize(
    ("fault", "resume", "recorded"),
    [
        pytest.param("init", "auto", 0, id="during-init"),
        pytest.param("job-written#2", True, 1, id="mid-writes-chunks-unrecorded"),
        pytest.param("job-recorded#4", "auto", 4, id="mid-writes-after-a-record"),
        pytest.param("before-finalise", True, 10, id="between-writes-and-publish"),
        pytest.param("before-publish", "auto", 10, id="complete-not-yet-published"),
    ],
)
def test_kill_then_resume(
    era5_files: list[Path],
    reference: Path,
    tmp_path: Path,
    fault: str,
    resume: bool | str,
    recorded: int,
) -> None:
    fields = _fields(era5_files, tmp_path / "out" / "era5.zarr")
    store = Path(fields["cache_store"])
    _killed_run(_request_file(fields, tmp_path), fault)
    paths = CachePaths(store)
    assert not store.exists(), "a killed run must not publish"
    assert paths.lock.exists(), "the killed run's lock is left behind (and broken on resume)"
    (staging,) = paths.all_versions()
    recorded_before = {r["id"] for r in iter_job_records(staging)}
    assert len(recorded_before) == recorded
    if fault == "init":
        assert plan_record(staging) is None
        with pytest.raises(RequestError, match=r"resume=True: no interrupted run"):
            run_request(build_request(**fields, resume=True))
        before: dict[int, dict[Path, int]] = {}
    else:
        assert is_complete(staging) == (fault == "before-publish")
        before = _chunk_mtimes(staging)
    time.sleep(0.01)  # a rewrite would get a later mtime_ns
    result = run_request(build_request(**fields, resume=resume))
    assert result.summary["resumed"] == (fault != "init")
    assert result.summary["jobs_run"] == 10 - recorded
    assert result.summary["jobs_skipped"] == (recorded if fault != "init" else 0)
    _check_resumed(store, reference, recorded_before, before)
    if fault != "init":
        assert store.resolve() == staging, "the interrupted version itself is completed"
    assert verify_cache(build_request(**fields)).ok


def _kill_after_first_record(fields: dict[str, Any], tmp: Path) -> bool:
    """Run the CLI and SIGKILL it from outside once its first job is recorded.

    Returns False when the whole run finished before the kill landed (nothing to resume).
    """
    store = Path(fields["cache_store"])
    tmp.mkdir(parents=True, exist_ok=True)
    proc = cli_run(_request_file(fields, tmp))
    jobs = CachePaths(store).versions
    try:
        deadline = time.time() + 300
        while not list(jobs.glob("*/.zarr-parallel/jobs/*.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    return not store.exists()


def test_kill_from_outside_mid_writes(
    era5_files: list[Path], reference: Path, tmp_path: Path
) -> None:
    """No hook: SIGKILL from outside as soon as the first job is recorded."""
    # The kill races the run; a run that wins it is tried again in a fresh folder, so the
    # test always resumes a killed run (it never skips).
    for attempt in range(3):
        fields = _fields(era5_files, tmp_path / f"out{attempt}" / "era5.zarr")
        if _kill_after_first_record(fields, tmp_path / f"request{attempt}"):
            break
    else:
        pytest.fail("three runs finished before a SIGKILL from outside landed")
    store = Path(fields["cache_store"])
    (staging,) = CachePaths(store).all_versions()
    recorded_before = {r["id"] for r in iter_job_records(staging)}
    assert 1 <= len(recorded_before) < 10
    before = _chunk_mtimes(staging)
    time.sleep(0.01)
    result = run_request(build_request(**fields))  # resume="auto", the default
    assert result.summary["resumed"]
    _check_resumed(store, reference, recorded_before, before)


def _rehome(copy: Path) -> None:
    """Make a copied cache's manifests name the copy's path as theirs."""
    paths = CachePaths(copy)
    for version in paths.versions.iterdir():
        for name in ("owner.json", "plan.json"):
            record = version / ".zarr-parallel" / name
            if record.exists():
                data = json.loads(record.read_text())
                data["cache_path"] = paths.canonical
                record.write_text(json.dumps(data))


def test_published_cache_survives_a_killed_run_and_other_requests_never_mix(
    era5_files: list[Path], reference: Path, other_reference: Path, tmp_path: Path
) -> None:
    store = tmp_path / "out" / "era5.zarr"
    old = _fields(era5_files, store)
    new = _fields(era5_files, store, OTHER_CHUNKS)
    run_request(build_request(**old))
    published = store.resolve()
    source = xr.open_mfdataset(era5_files, engine="h5netcdf")
    # A new request frozen mid-writes: the published cache stays complete and readable.
    with frozen_run(_request_file(new, tmp_path), "job-recorded#1") as proc:
        assert store.resolve() == published
        with xr.open_zarr(store) as cache:
            np.testing.assert_array_equal(cache.t2m.values, source.t2m.values)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert store.resolve() == published
    assert cache_differences(store, reference) == []
    assert verify_cache(build_request(**old)).ok
    staging = next(v for v in CachePaths(store).all_versions() if v != published)
    recorded_before = {r["id"] for r in iter_job_records(staging)}
    assert len(recorded_before) == 1

    # Keep a copy of this state: one branch resumes, the other starts another request. A copied
    # cache names its old path in its manifests and is refused (tests/store/test_ownership.py): the
    # copy is re-homed, as if the same state had been reached at the copy's path.
    shutil.copytree(tmp_path / "out", tmp_path / "copy", symlinks=True)
    _rehome(tmp_path / "copy" / "era5.zarr")

    # Resuming the killed run with a different request is refused, saying what differs.
    third = _fields(era5_files, store, {"time": 60, "latitude": 40, "longitude": 72})
    snapshot = location_snapshot(store)
    with pytest.raises(RequestError, match=r"resume=True: the interrupted run .*chunks: "):
        run_request(build_request(**third, resume=True))
    assert location_snapshot(store) == snapshot

    # The same request resumes: only unrecorded jobs are written, and it is then published.
    result = run_request(build_request(**new, resume=True))
    assert result.summary["jobs_run"] == result.summary["jobs"] - 1
    assert store.resolve() == staging
    assert cache_differences(store, other_reference) == []
    assert published.is_dir(), "the previous version is kept (keep_versions=2)"

    # In the copy, another request with resume='auto' starts afresh and cleans the stale
    # staging version instead of mixing with it.
    copy = tmp_path / "copy" / "era5.zarr"
    third = {**third, "cache_store": str(copy)}
    stale = CachePaths(copy).versions / staging.name
    assert stale.is_dir()
    result = run_request(build_request(**third))
    assert not result.summary["resumed"] and not stale.exists()
    assert result.summary["jobs_run"] == result.summary["jobs"]
    assert verify_cache(build_request(**third)).ok


def test_resume_and_up_to_date_across_run_settings(
    era5_files: list[Path], reference: Path, tmp_path: Path
) -> None:
    """Run settings split the same content into other jobs: a killed run, run again with
    another ``num_jobs``, continues with its own plan; the finished cache is up to date in
    another deploy mode."""
    fields = _fields(era5_files, tmp_path / "out" / "era5.zarr")
    store = Path(fields["cache_store"])
    _killed_run(_request_file(fields, tmp_path), "job-recorded#3")
    (staging,) = CachePaths(store).all_versions()
    recorded_before = {r["id"] for r in iter_job_records(staging)}
    assert len(recorded_before) == 3
    before = _chunk_mtimes(staging)
    other = build_request(**{**fields, "num_jobs": 4})
    stored = plan_record(staging)
    assert stored is not None and make_plan(other)[1].fingerprint != stored["fingerprint"]

    result = run_request(other)
    assert result.summary["resumed"] and result.summary["jobs"] == 10
    _check_resumed(store, reference, recorded_before, before)

    again = run_request(
        build_request(
            **{**fields, "deploy_mode": "dask_distributed", "memory_limit": "1GB"},
            simultaneous_worker_limit=2,
        )
    )
    assert again.status == "up to date" and again.summary["jobs_run"] == 0
    assert CachePaths(store).all_versions() == [store.resolve()]
