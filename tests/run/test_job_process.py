"""Unit tests of the job process (:mod:`zarr_parallel.run.job_process`): real child processes,
real deadlines and memory limits.

Jobs come from a version prepared and initialised through :mod:`zarr_parallel.run.steps` (the
``initialised`` fixture of tests/run/conftest.py). Faults are the test-only transform plug-ins of
tests/plugins (``fault_plugins``), which act inside the job, in the child process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from deploy_helpers import started_lines
from zarr_parallel.errors import LockLost
from zarr_parallel.planning.jobs import Job
from zarr_parallel.run import job_process
from zarr_parallel.run.job_process import (
    WORKER_OVERHEAD,
    JobMemoryExceeded,
    JobProcess,
    JobProcessDied,
    JobTimedOut,
    job_process_limit,
    run_job_isolated,
)
from zarr_parallel.run.steps import Prepared
from zarr_parallel.store.lock import held_token
from zarr_parallel.store.manifest import recorded_jobs

# A hang must fail the test, not the CI run.
pytestmark = pytest.mark.timeout(600)

Initialise = Callable[..., Prepared]


@pytest.fixture
def child() -> Iterator[JobProcess]:
    """A job process of this test alone, killed at the end."""
    proc = JobProcess()
    try:
        yield proc
    finally:
        proc.kill()


def _job(prepared: Prepared, first_step: int) -> Job:
    """The first job (by id) whose time range starts at or after ``first_step``."""
    return next(j for j in prepared.plan.jobs if j.bounds["time"][0] >= first_step)


def _order(prepared: Prepared, job: Job) -> dict[str, Any]:
    """What the worker sends its job process: :func:`~zarr_parallel.run.job.run_job`'s
    keyword arguments."""
    return {
        "request_json": prepared.request_json,
        "version": str(prepared.version),
        "job_id": job.id,
        "generate_stats": False,
    }


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _recorded(prepared: Prepared) -> set[int]:
    return recorded_jobs(prepared.version, prepared.plan.fingerprint)


def test_jobs_run_in_one_long_lived_child_process(
    initialised: Initialise, child: JobProcess
) -> None:
    prepared = initialised()
    first, second = _job(prepared, 0), _job(prepared, 24)
    record = child.run(_order(prepared, first), timeout=300)
    pid = record["job_process"]["pid"]
    assert pid == child.pid and pid != os.getpid()
    assert psutil.Process(pid).ppid() == os.getpid()
    # The record names the worker (this process), not its job process.
    assert record["pid"] == os.getpid() and record["id"] == first.id
    assert record["job_process"]["max_rss"] > 0
    again = child.run(_order(prepared, second), timeout=300)
    assert again["job_process"]["pid"] == pid, "the process is kept from job to job"
    assert child.jobs_run == 2
    assert _recorded(prepared) == {first.id, second.id}
    child.close()
    assert not child.alive() and _gone(pid)


def test_a_job_past_its_deadline_is_killed_with_its_process(
    initialised: Initialise, child: JobProcess, fault_plugins: Path, tmp_path: Path
) -> None:
    marker, started = tmp_path / "hold.marker", tmp_path / "hold.started"
    hold = {"type": "test_hold", "marker": str(marker), "started": str(started), "index": 0}
    prepared = initialised(preprocessors=[hold])
    held, free = _job(prepared, 0), _job(prepared, 24)
    marker.write_text("hold")
    t0 = time.monotonic()
    with pytest.raises(JobTimedOut, match=r"did not finish within worker_timeout=0:00:03; its"):
        child.run(_order(prepared, held), timeout=3, describe=f"job {held.id}")
    assert 3 <= time.monotonic() - t0 < 60
    [blocked] = started_lines(started)
    assert _gone(blocked["pid"]), "the hung job's process was left running"
    assert not child.alive() and _recorded(prepared) == set()
    # The next job gets a new process.
    record = child.run(_order(prepared, free), timeout=300)
    assert record["job_process"]["pid"] != blocked["pid"]
    assert _recorded(prepared) == {free.id}


def test_a_job_over_its_memory_limit_is_killed(
    initialised: Initialise, child: JobProcess, fault_plugins: Path
) -> None:
    # 1 GB more than the job needs, held 30 s, against a 750 MB limit: stopped long before.
    balloon = {"type": "test_balloon", "nbytes": 1_000_000_000, "index": 0, "seconds": 30}
    prepared = initialised(preprocessors=[balloon])
    job = _job(prepared, 0)
    child.start()
    pid = child.pid
    assert pid is not None
    t0 = time.monotonic()
    limit = r"used [\d.]+ [MG]B, more than its limit of 750\.00 MB; its process was killed"
    with pytest.raises(JobMemoryExceeded, match=limit):
        child.run(_order(prepared, job), timeout=300, memory_limit=750_000_000)
    assert time.monotonic() - t0 < 30
    assert not child.alive() and _gone(pid)
    assert _recorded(prepared) == set()


def test_a_job_error_comes_back_as_itself_and_the_process_stays(
    initialised: Initialise, child: JobProcess, fault_plugins: Path
) -> None:
    fail = {"type": "test_fail", "message": "disk on fire", "index": 0}
    prepared = initialised(preprocessors=[fail])
    failing, fine = _job(prepared, 0), _job(prepared, 24)
    with pytest.raises(OSError, match="disk on fire") as info:
        child.run(_order(prepared, failing), timeout=300)
    assert any("in the job process" in note for note in info.value.__notes__)
    pid = child.pid
    assert child.alive() and pid is not None
    record = child.run(_order(prepared, fine), timeout=300)
    assert record["job_process"]["pid"] == pid
    assert _recorded(prepared) == {fine.id}


def test_a_job_process_killed_from_outside_is_reported(
    initialised: Initialise, child: JobProcess, fault_plugins: Path, tmp_path: Path
) -> None:
    marker, started = tmp_path / "hold.marker", tmp_path / "hold.started"
    hold = {"type": "test_hold", "marker": str(marker), "started": str(started), "index": 0}
    prepared = initialised(preprocessors=[hold])
    marker.write_text("hold")

    def kill_when_blocked() -> None:
        deadline = time.monotonic() + 120
        while not started_lines(started) and time.monotonic() < deadline:
            time.sleep(0.05)
        for line in started_lines(started):
            os.kill(line["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_blocked)
    killer.start()
    try:
        with pytest.raises(JobProcessDied, match=r"the job process died after .*killed by SIGKILL"):
            child.run(_order(prepared, _job(prepared, 0)), timeout=300)
    finally:
        marker.unlink()
        killer.join()
    assert not child.alive() and _recorded(prepared) == set()


def test_isolated_jobs_share_this_processs_job_process(initialised: Initialise) -> None:
    prepared = initialised()
    first, second = _job(prepared, 0), _job(prepared, 24)
    args = (prepared.request_json, str(prepared.version))
    try:
        a = run_job_isolated(*args, first.id, False, timeout=300)
        b = run_job_isolated(*args, second.id, False, timeout=300)
    finally:
        job_process.shutdown()
    pid = a["job_process"]["pid"]
    assert b["job_process"]["pid"] == pid != os.getpid()
    assert _gone(pid), "shutdown stops the idle job process"
    assert _recorded(prepared) == {first.id, second.id}


def test_the_runs_lock_token_reaches_the_job_process(initialised: Initialise) -> None:
    """A job process records under the lock token its run sent (as dask and SLURM workers
    send it): a job sent with the token of a run whose lock was broken raises ``LockLost`` in
    the job process and records nothing, although the version's own fence record matches the
    lock; a job sent with the holder's token records."""
    prepared = initialised()
    first, second = _job(prepared, 0), _job(prepared, 24)
    args = (prepared.request_json, str(prepared.version))
    token = held_token(prepared.paths.lock)
    assert token is not None
    try:
        with pytest.raises(LockLost, match="no longer holds the lock"):
            run_job_isolated(*args, first.id, False, timeout=300, fence="a-run-that-lost-it")
        run_job_isolated(*args, second.id, False, timeout=300, fence=token)
    finally:
        job_process.shutdown()
    assert _recorded(prepared) == {second.id}


@pytest.mark.parametrize(
    ("mode", "limit", "expected"),
    [
        ("series", 2 * 10**9, 2 * 10**9),
        ("slurm", 2 * 10**9, None),
        ("dask_distributed", 2 * 10**9, 2 * 10**9 - WORKER_OVERHEAD),
        ("dask_distributed", 300 * 10**6, 150 * 10**6),
    ],
)
def test_job_process_limit(mode: str, limit: int, expected: int | None) -> None:
    assert job_process_limit(mode, limit) == expected


def _open_sources(pid: int, files: list[Path]) -> set[str]:
    names = {str(f.resolve()) for f in files}
    return {f.path for f in psutil.Process(pid).open_files() if f.path in names}


def _wait_for(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_job_process_opens_the_runs_source_before_its_first_job(
    initialised: Initialise, era5_files: list[Path]
) -> None:
    """Given a run's source, a new job process opens it (its files held open) with no job sent;
    the job then runs from it as usual."""
    prepared = initialised()
    proc = JobProcess(source=prepared.request.source_json())
    try:
        proc.start()
        assert proc.pid is not None
        pid = proc.pid
        assert _wait_for(
            lambda: _open_sources(pid, era5_files) == {str(f.resolve()) for f in era5_files}
        ), "the source was not opened ahead of the jobs"
        assert proc.jobs_run == 0
        record = proc.run(_order(prepared, _job(prepared, 0)), timeout=300)
        assert record["job_process"]["pid"] == pid
        assert _recorded(prepared) == {record["id"]}
    finally:
        proc.kill()
    # Without a source, nothing is opened before a job.
    bare = JobProcess()
    try:
        bare.start()
        assert bare.pid is not None
        time.sleep(1.0)
        assert _open_sources(bare.pid, era5_files) == set()
    finally:
        bare.kill()


def test_a_source_that_cannot_be_opened_ahead_is_left_to_the_jobs(
    initialised: Initialise, tmp_path: Path
) -> None:
    """A source that fails to open ahead (here: a missing file) leaves the job process serving:
    the failure is the jobs' to report, and a job of a source that opens runs."""
    prepared = initialised()
    missing = prepared.request.model_copy(update={"data_uri": [str(tmp_path / "gone.nc")]})
    proc = JobProcess(source=missing.source_json())
    try:
        proc.start()
        record = proc.run(_order(prepared, _job(prepared, 0)), timeout=300)
        assert record["job_process"]["pid"] == proc.pid
        assert proc.alive()
    finally:
        proc.kill()


def test_a_warm_queued_before_the_start_reaches_the_process_before_its_first_job(
    initialised: Initialise,
) -> None:
    """A warm queued while the process is not yet started is sent once it is, before any job:
    the first job is lent the slab buffers it readied. After a job, nothing more is queued."""
    prepared = initialised(memory_limit="1GB")
    payload = {"request_json": prepared.request_json, "version": str(prepared.version)}
    proc = JobProcess(source=prepared.request.source_json())
    try:
        assert proc.queue("warm", payload)
        proc.flush()  # not started: nothing to send yet, still queued
        record = proc.run(_order(prepared, _job(prepared, 0)), timeout=300)
        assert record["lent_memory"] > 0
        assert not proc.queue("warm", payload)
    finally:
        proc.kill()
    # Unwarmed, the first job is lent nothing.
    bare = JobProcess()
    try:
        record = bare.run(_order(prepared, _job(prepared, 0)), timeout=300)
        assert record["lent_memory"] == 0
    finally:
        bare.kill()
