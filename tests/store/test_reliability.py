"""Store-level reliability: durable records, atomic publish, versions, stale staging, names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from core_support import series_fields
from zarr_parallel import faults
from zarr_parallel.api import run_request
from zarr_parallel.errors import RequestError, RunFailed
from zarr_parallel.names import path_problem
from zarr_parallel.request.model import build_request
from zarr_parallel.run.verify import cache_differences, location_snapshot, verify_cache
from zarr_parallel.store.chunks import chunk_files, sync_job
from zarr_parallel.store.manifest import (
    is_complete,
    iter_job_records,
    plan_differences,
    plan_record,
)
from zarr_parallel.store.paths import CachePaths, resolve_paths
from zarr_parallel.store.publish import publish

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}


def _fields(files: list[Path], store: Path, **extra: Any) -> dict[str, Any]:
    return series_fields(files, store, **{"chunks": CHUNKS, **extra})


def _all_chunk_files(version: Path, name: str) -> set[Path]:
    meta = ("zarr.json", ".zarray", ".zattrs")
    return {p for p in (version / name).rglob("*") if p.is_file() and p.name not in meta}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="zarr3"),
        pytest.param({"zarr_format": 2}, id="zarr2"),
        pytest.param({"shards": {"time": 24, "latitude": 80, "longitude": 144}}, id="sharded"),
    ],
)
def test_job_records_name_exactly_the_files_their_job_wrote(
    era5_files: list[Path], tmp_path: Path, extra: dict[str, Any]
) -> None:
    """The files a record's fsync covers are the job's chunk (or shard) files, no more, no less."""
    store = tmp_path / "c.zarr"
    run_request(build_request(**_fields(era5_files, store, **extra)))
    version = store.resolve()
    records = list(iter_job_records(version))
    for name in ("t2m", "d2m"):
        covered: list[Path] = []
        for rec in records:
            region = {d: (a, b) for d, a, b in rec["region"]}
            files = chunk_files(version, name, region)
            assert all(f.is_file() for f in files)
            covered += files
        assert len(covered) == len(set(covered)), "two jobs share a chunk file"
        assert set(covered) == _all_chunk_files(version, name)
    rec = records[0]
    assert sync_job(version, rec) == len(rec["variables"]) * len(
        chunk_files(version, "t2m", {d: (a, b) for d, a, b in rec["region"]})
    )


def test_manifest_states_and_up_to_date_rerun(era5_files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    fields = _fields(era5_files, store)
    first = run_request(build_request(**fields))
    version = store.resolve()
    plan = plan_record(version)
    assert plan is not None and is_complete(version)
    assert {r["id"] for r in iter_job_records(version)} == {j[0] for j in plan["job_list"]}
    assert all(r["fingerprint"] == plan["fingerprint"] for r in iter_job_records(version))
    assert all(set(r["checksums"]) == set(r["variables"]) for r in iter_job_records(version))
    before = location_snapshot(store)
    again = run_request(build_request(**fields))
    assert again.status == "up to date" and again.summary["jobs_run"] == 0
    assert location_snapshot(store) == before
    assert first.summary["fingerprint"] == again.summary["fingerprint"]


def test_overwrite_publishes_a_new_version_and_keeps_the_previous(
    era5_files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "c.zarr"
    versions = []
    for t in (12, 24, 60):
        chunks = {**CHUNKS, "time": t}
        run_request(build_request(**_fields(era5_files, store, chunks=chunks, min_version_age=0)))
        versions.append(store.resolve())
    assert len(set(versions)) == 3
    # keep_versions=2: the current one and the one before; the oldest is pruned.
    assert CachePaths(store).all_versions() == versions[1:]
    assert not os.path.isabs(os.readlink(store)), "a relative link keeps working if moved"


def test_publish_is_atomic_for_readers(era5_files: list[Path], tmp_path: Path) -> None:
    """A reader resolving the final path during repeated publishes always finds a version."""
    store = tmp_path / "c.zarr"
    run_request(build_request(**_fields(era5_files, store)))
    paths = CachePaths(store)
    a = store.resolve()
    b = paths.versions / "99-copy"
    os.symlink(a, b)  # a second "version" to switch to
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(store))
                (store / "zarr.json").stat()
            except BaseException as e:
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            publish(paths, b if i % 2 else a, keep_versions=10)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:1]
    assert len(seen) == 2


def test_legacy_cache_at_the_final_path(era5_files: list[Path], tmp_path: Path) -> None:
    """A plain Zarr store at the final path (e.g. from zarr-parallel 0.5) is moved aside, never
    written into, and never pruned (tests/store/test_ownership.py covers what is refused)."""
    store = tmp_path / "c.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(RequestError, match=r"overwrite=False: .* was not made by this version"):
        run_request(build_request(**_fields(era5_files, store, overwrite=False)))
    assert store.is_dir() and not store.is_symlink()
    run_request(build_request(**_fields(era5_files, store)))
    legacy = [v for v in (tmp_path / "c.zarr.versions").iterdir() if "legacy" in v.name]
    assert len(legacy) == 1 and sorted(os.listdir(legacy[0])) == ["zarr.json"]
    assert verify_cache(build_request(**_fields(era5_files, store))).ok


def _unpublished_copy(files: list[Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A reference cache, and a second one turned back into an interrupted staging version
    (link and complete.json removed): (reference, cache path, its version folder)."""
    reference = tmp_path / "ref.zarr"
    run_request(build_request(**_fields(files, reference)))
    store = tmp_path / "c.zarr"
    run_request(build_request(**_fields(files, store)))
    version = store.resolve()
    os.unlink(store)
    (version / ".zarr-parallel" / "complete.json").unlink()
    return reference, store, version


def test_resume_removes_leftover_temporary_files(era5_files: list[Path], tmp_path: Path) -> None:
    """A killed chunk write leaves ``<key>.<uuid>.partial``: never published, never mixed."""
    # An interrupted staging version with debris.
    reference, store, version = _unpublished_copy(era5_files, tmp_path)
    jobs = sorted((version / ".zarr-parallel" / "jobs").glob("*.json"))
    jobs[-1].unlink()
    (version / "t2m" / "c" / "0" / "0" / "0.3f2a.partial").write_bytes(b"torn")
    (version / ".zarr-parallel" / "jobs" / ".000009.json.1.2.tmp").write_text("{")
    result = run_request(build_request(**_fields(era5_files, store, resume=True)))
    assert result.summary["resumed"] and result.summary["jobs_run"] == 1
    assert cache_differences(store, reference) == []
    assert not [p for p in version.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def test_chunk_lost_after_its_record_is_rewritten_not_published(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """The completeness check looks at files, not only records: a hole is never published."""
    reference, store, version = _unpublished_copy(era5_files, tmp_path)
    (version / "d2m" / "c" / "2" / "1" / "0").unlink()  # time 24:36, latitude 40:73
    with pytest.raises(RunFailed, match=r"d2m/c/2/1/0\); the store was changed") as info:
        run_request(build_request(**_fields(era5_files, store, resume=True)))
    (lost,) = info.value.failed
    assert not store.exists()
    assert lost["id"] not in {r["id"] for r in iter_job_records(version)}
    result = run_request(build_request(**_fields(era5_files, store, resume=True)))
    assert result.summary["jobs_run"] == 1
    assert cache_differences(store, reference) == []


def test_fingerprint_differences_are_said_in_words() -> None:
    old = {
        "fingerprint": "a",
        "request": {"chunks": {"time": 12}, "num_jobs": 4, "resume": "auto"},
        "layout": {"digest": "x", "files": ["/d/a.nc", "/d/b.nc"]},
    }
    assert plan_differences(old, {**old, "request": {**old["request"], "resume": True}}) == []
    changed = {
        "fingerprint": "b",
        "request": {"chunks": {"time": 24}, "num_jobs": 4, "resume": "auto"},
        "layout": {"digest": "y", "files": ["/d/a.nc", "/d/b.nc", "/d/c.nc"]},
    }
    assert plan_differences(old, changed) == [
        'chunks: {"time": 12} → {"time": 24}',
        "source files added ['c.nc'], removed []",
    ]
    touched = {**old, "fingerprint": "c", "layout": {**old["layout"], "digest": "z"}}
    assert plan_differences(old, touched) == [
        "the source files changed (size or modification time)"
    ]
    assert plan_differences(None, old) == [
        "the other version has no plan (its initialisation was interrupted)"
    ]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("t2m", None),
        ("2m_temperature", None),
        ("t2m.v1", None),
        ("..", "relative path"),
        (".", "relative path"),
        ("../x", "path separator"),
        ("/abs", "path separator"),
        ("a\\b", "path separator"),
        ("", "is empty"),
        (".zarr-parallel", "starts with '.'"),
        (".zattrs", "starts with '.'"),
        ("__x", "reserved by Zarr"),
        ("zarr.json", "metadata document"),
        ("nul\x00", "NUL"),
        (3, "not a string"),
    ],
)
def test_names_that_become_paths(name: object, problem: str | None) -> None:
    found = path_problem(name)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_cache_dir_names_stay_inside_it(era5_files: list[Path], tmp_path: Path) -> None:
    fields = _fields(era5_files, tmp_path, cache_store=None, cache_dir=str(tmp_path))
    final = resolve_paths(build_request(**fields, cache_label="_v1")).final
    assert final == tmp_path / "era5_like_v1.zarr"
    for label in ("../x", "/x", "a/b", ".."):
        with pytest.raises(RequestError, match=r"cache_label="):
            build_request(**fields, cache_label=label)


def test_fault_hook_is_inert_unless_set_and_counts_its_points() -> None:
    # Load the module by path: it imports nothing of the package, so the subprocesses start fast.
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('faults', {str(faults.__file__)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "for i in range(3):\n"
        "    m.fault_point('job-recorded'); m.fault_point('init'); print(i, flush=True)\n"
    )

    def run(spec: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "ZARR_PARALLEL_FAULT"}
        if spec:
            env["ZARR_PARALLEL_FAULT"] = spec
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )

    quiet = run(None)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["0", "1", "2"]
    killed = run("kill@job-recorded#2")
    assert killed.returncode == -9 and killed.stdout.split() == ["0"]
    elsewhere = run("kill@before-publish")
    assert elsewhere.returncode == 0


def test_a_stop_point_reached_in_a_thread_stops_that_thread_there(tmp_path: Path) -> None:
    """A write task runs in a thread of the flow process (series mode). Its stop was sent to the
    process, taken by the main thread whenever that was scheduled: on busy cores the task's
    thread wrote on (a job record, in CI) after the point. Now nothing after the point runs
    before SIGCONT. The child shares one core with two busy loops, as on a loaded CI machine."""
    code = (
        "import importlib.util, os, sys, threading\n"
        "os.sched_setaffinity(0, {0})\n"
        f"spec = importlib.util.spec_from_file_location('faults', {str(faults.__file__)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "def task():\n"
        "    m.fault_point('job-written')\n"
        "    with open(sys.argv[1], 'w') as f:\n"
        "        for i in range(100_000):\n"
        "            f.write(f'{i}\\n'); f.flush()\n"
        "t = threading.Thread(target=task); t.start(); t.join()\n"
    )
    busy = "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass\n"
    env = {**os.environ, "ZARR_PARALLEL_FAULT": "stop@job-written"}
    loops = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(2)]
    try:
        for attempt in range(4):
            out = tmp_path / f"after-{attempt}.txt"
            child = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env)
            try:
                deadline = time.time() + 60
                while psutil.Process(child.pid).status() != psutil.STATUS_STOPPED:
                    assert child.poll() is None and time.time() < deadline
                    time.sleep(0.01)
                time.sleep(0.3)  # the old stop let the thread run on for this long and more
                assert not out.exists() or out.read_text() == "", f"ran on (attempt {attempt})"
                child.send_signal(signal.SIGCONT)
                assert child.wait(timeout=60) == 0
                assert len(out.read_text().split()) == 100_000
            finally:
                child.kill()
    finally:
        for loop in loops:
            loop.kill()


def test_recache_copy_files_are_temporaries(tmp_path: Path) -> None:
    """Re-cache copies a chunk file (where hard links are refused) through ``.<key>.<pid>.copy``:
    a killed copy leaves it behind, and a resume must remove it, never publish it."""
    from zarr_parallel.store.publish import clean_temporary

    version = tmp_path / "1-abc"
    chunk_dir = version / "t2m" / "c" / "0" / "0"
    chunk_dir.mkdir(parents=True)
    (chunk_dir / "0").write_bytes(b"chunk")
    (chunk_dir / ".1.4242.copy").write_bytes(b"half a chunk")
    assert clean_temporary(version) == 1
    assert sorted(p.name for p in chunk_dir.iterdir()) == ["0"]


def test_consolidated_metadata_is_durable_before_complete(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """complete.json promises a readable version after a machine crash: the consolidated
    metadata must be fsynced before it (observed by recording every fsync's file)."""
    from zarr_parallel.store.disk_names import manifest_dir
    from zarr_parallel.store.zarr_io import finalise

    store = tmp_path / "c.zarr"
    run_request(build_request(**_fields(era5_files, store)))
    version = store.resolve()
    (manifest_dir(version) / "complete.json").unlink()
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    finalise(version, {"fingerprint": "x", "jobs": 4})
    monkeypatch.undo()
    root = str(version / "zarr.json")
    complete = next(i for i, p in enumerate(synced) if ".complete.json." in p)
    assert root in synced[:complete], synced
    assert '"consolidated_metadata"' in (version / "zarr.json").read_text()
