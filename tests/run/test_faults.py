"""Faults made for real on a local dask cluster: a worker killed mid-job, a job that hangs, the
flow process killed while its workers write.

The ``test_hold`` plug-in (tests/plugins) blocks the write job holding one time step while a
marker file exists; the test then kills the worker running it, or the whole run, or lets the
deadline pass.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from core_support import cli_run
from deploy_helpers import (
    assert_same_cache,
    hold_spec,
    job_records,
    run_cache,
    run_held,
    squeue_ids,
    started_lines,
)
from zarr_parallel.errors import RunFailed

# A hang must fail the test, not the CI run.
pytestmark = pytest.mark.timeout(900)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _held_job(result_jobs: list[dict[str, Any]], index: int) -> dict[str, Any]:
    return next(
        j for j in result_jobs if any(d == "time" and a <= index < b for d, a, b in j["region"])
    )


def test_worker_killed_mid_job_is_retried_to_an_identical_cache(
    era5_files: list[Path], reference: Path, tmp_path: Path, fault_plugins: Path
) -> None:
    killed: dict[str, Any] = {}

    def kill_worker(info: dict[str, Any]) -> None:
        # The blocked job process's parent is the dask worker process running the task.
        killed.update(info)
        os.kill(info["ppid"], signal.SIGKILL)
        time.sleep(0.5)

    result, _ = run_held(
        era5_files,
        tmp_path / "killed.zarr",
        kill_worker,
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    assert killed, "the held job never started"
    assert _gone(killed["ppid"]) and _gone(killed["pid"])
    assert_same_cache(result.path, reference)
    held = _held_job(result.summary["job_results"], 30)
    assert held["attempts"] == 2
    assert held["job_process"]["pid"] != killed["pid"]
    assert all(j["attempts"] == 1 for j in result.summary["job_results"] if j is not held)
    assert len(job_records(result)) == result.summary["jobs"]


def test_hung_job_is_killed_at_worker_timeout_retried_then_reported_and_resumable(
    era5_files: list[Path], reference: Path, tmp_path: Path, fault_plugins: Path
) -> None:
    spec, marker, started = hold_spec(tmp_path, index=30)
    store = tmp_path / "hung.zarr"
    fields: dict[str, Any] = {
        "deploy_mode": "dask_distributed",
        "simultaneous_worker_limit": 2,
        "worker_timeout": 10,
        "retries": 1,
        "preprocessors": [spec],
    }
    t0 = time.monotonic()
    with pytest.raises(
        RunFailed,
        match=r"job \d+ d2m,t2m\[time 24:36, .*\] did not finish within worker_timeout=0:00:10",
    ) as e:
        run_cache(era5_files, store, **fields)
    elapsed = time.monotonic() - t0
    # Two attempts, each stopped at its deadline: their processes were killed, not abandoned.
    attempts = started_lines(started)
    assert len(attempts) == 2 and attempts[0]["pid"] != attempts[1]["pid"]
    assert all(_gone(a["pid"]) for a in attempts)
    assert elapsed < 300
    [failure] = e.value.failed
    assert failure["attempts"] == 2 and failure["state"] == "Failed"
    # Every other job finished and stays recorded; the cache was not published.
    version = next(store.with_name("hung.zarr.versions").iterdir())
    recorded = list((version / ".zarr-parallel" / "jobs").glob("*.json"))
    assert len(recorded) >= 1 and not store.exists()
    # Once the hang is gone, the run resumes and writes only the failed job.
    marker.unlink()
    result = run_cache(era5_files, store, **fields)
    assert result.summary["resumed"] is True
    assert result.summary["jobs_run"] == 1
    assert result.summary["jobs_skipped"] == len(recorded)
    assert_same_cache(result.path, reference)


def test_job_process_over_its_memory_is_killed_and_not_retried(
    era5_files: list[Path], tmp_path: Path, fault_plugins: Path
) -> None:
    # Outside SLURM the worker polices its job process: 1 GB more than a job needs, against
    # the 750 MB a job process gets of a 1 GB limit, is stopped and reported, and not retried
    # (it would only grow again).
    balloon = {"type": "test_balloon", "nbytes": 1_000_000_000, "index": 30, "seconds": 30}
    t0 = time.monotonic()
    limit = r"used [\d.]+ [MG]B, more than its limit of 750\.00 MB"
    with pytest.raises(RunFailed, match=limit) as e:
        run_cache(
            era5_files,
            tmp_path / "balloon.zarr",
            deploy_mode="dask_distributed",
            simultaneous_worker_limit=2,
            memory_limit="1GB",
            retries=2,
            preprocessors=[balloon],
        )
    [failure] = e.value.failed
    assert failure["region"].startswith("d2m,t2m[time 24:36")
    assert failure["attempts"] == 1
    assert time.monotonic() - t0 < 120


def test_job_process_killed_mid_job_is_retried(
    era5_files: list[Path], reference: Path, tmp_path: Path, fault_plugins: Path
) -> None:
    # The job process dies under the worker (as by the kernel's OOM killer): the task fails
    # with the reason, Prefect retries it in a new job process, and the cache is complete.
    def kill_job_process(info: dict[str, Any]) -> None:
        os.kill(info["pid"], signal.SIGKILL)

    result, started = run_held(
        era5_files,
        tmp_path / "job-killed.zarr",
        kill_job_process,
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    [info] = started_lines(started)
    assert _gone(info["pid"])
    assert_same_cache(result.path, reference)
    held = _held_job(result.summary["job_results"], 30)
    assert held["attempts"] == 2 and held["job_process"]["pid"] != info["pid"]


@pytest.mark.parametrize(
    "mode", ["dask_distributed", pytest.param("SLURM", marks=pytest.mark.slurm)]
)
def test_killed_flow_process_leaves_no_worker_writing_and_resumes_to_an_identical_cache(
    era5_files: list[Path],
    reference: Path,
    tmp_path: Path,
    fault_plugins: Path,
    request: pytest.FixtureRequest,
    mode: str,
) -> None:
    """SIGKILL of the flow process (the scheduler's host) while a job is mid-write.

    Its workers must not go on writing into the staging version once the run is gone: a
    resumed run would then write the same chunks at the same time. Every process of the run
    (local workers and their job processes, or the SLURM job) has to end by itself, and the
    resumed run must give the uninterrupted cache, writing only the jobs not yet recorded.
    """
    if mode == "SLURM":
        request.getfixturevalue("slurm")
    spec, marker, started = hold_spec(tmp_path, index=30)
    store = tmp_path / "out" / "killed.zarr"
    fields: dict[str, Any] = {
        "data_uri": [str(p) for p in era5_files],
        "cache_store": str(store),
        "chunks": {"time": 12},
        "num_jobs": 4,
        "memory_limit": "1GB",
        "deploy_mode": mode,
        "simultaneous_worker_limit": 2,
        "preprocessors": [spec],
    }
    request_file = tmp_path / "request.yaml"
    request_file.write_text(yaml.safe_dump(fields))
    proc = cli_run(request_file)
    try:
        deadline = time.monotonic() + 300
        while not started_lines(started):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the held job never started"
            time.sleep(0.05)
        [held] = started_lines(started)
        run_processes = psutil.Process(proc.pid).children(recursive=True)
        if mode == "dask_distributed":  # local workers are the flow process's children
            assert held["ppid"] in {p.pid for p in run_processes}
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    pids = {p.pid for p in run_processes} | {held["pid"], held["ppid"]}
    killed_at = time.monotonic()
    while time.monotonic() < killed_at + 120:
        left = {pid for pid in pids if not _gone(pid)}
        queued = {held["slurm_job_id"]} & squeue_ids() if mode == "SLURM" else set()
        if not left and not queued:
            break
        time.sleep(0.5)
    print(f"{mode}: the killed run's processes ended within {time.monotonic() - killed_at:.1f} s")
    assert not left, f"processes of the killed run still run: {sorted(left)}"
    assert not queued, f"the killed run's SLURM job {held['slurm_job_id']} is still queued"
    assert not store.exists(), "a killed run must not publish"
    (staging,) = store.with_name("killed.zarr.versions").iterdir()
    recorded = {int(p.stem) for p in (staging / ".zarr-parallel" / "jobs").glob("*.json")}
    # The held job is let go; the same request resumes the interrupted version.
    marker.unlink()
    result = run_cache(
        era5_files, store, deploy_mode=mode, simultaneous_worker_limit=2, preprocessors=[spec]
    )
    assert result.summary["resumed"] is True
    # Only the jobs not recorded before the kill ran again; the held one is among them.
    assert result.summary["jobs_skipped"] == len(recorded)
    assert result.summary["jobs_run"] == result.summary["jobs"] - len(recorded) >= 1
    assert Path(result.summary["version"]) == staging
    assert_same_cache(result.path, reference)


def test_job_errors_keep_their_type_across_the_process_boundary(tmp_path: Path) -> None:
    from zarr_parallel.run.job_process import JobProcess

    proc = JobProcess()
    try:
        with pytest.raises(FileNotFoundError, match=r"has no plan\.json") as e:
            proc.run(
                {"request_json": "{}", "version": str(tmp_path / "nothing"), "job_id": 0},
                timeout=60,
            )
        assert any("in the job process" in note for note in getattr(e.value, "__notes__", []))
        assert proc.alive()  # an error in a job leaves the process serving
    finally:
        proc.close()
    assert not proc.alive()


def test_job_process_follows_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials set after a first run must reach the next job: a changed environment
    # replaces the job process.
    from zarr_parallel.run.job_process import JobProcess

    proc = JobProcess()
    try:
        proc.start()
        first = proc.pid
        proc.start()
        assert proc.pid == first
        monkeypatch.setenv("ZP_TEST_ARCHIVE_TOKEN", "changed")
        proc.start()
        assert proc.pid != first and first is not None and _gone(first)
    finally:
        proc.close()


def test_failed_job_message_keeps_no_secret(
    era5_files: list[Path], tmp_path: Path, fault_plugins: Path
) -> None:
    """A job failing with a signed URL in its error (as a remote read can) reaches the run's
    error and the task's state in the Prefect API with the signature masked."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    signed = "https://archive.example/era5.nc?X-Amz-Signature=topsecret123"
    fail = {"type": "test_fail", "message": f"GET {signed} returned 403", "index": 30}
    with pytest.raises(RunFailed, match=r"X-Amz-Signature=\*\*\* returned 403") as e:
        run_cache(era5_files, tmp_path / "f.zarr", deploy_mode="series", preprocessors=[fail])
    assert "topsecret123" not in str(e.value)

    async def task_messages() -> list[str]:
        async with get_client() as client:
            flows = await client.read_flow_runs(limit=5, sort="START_TIME_DESC")
            ids = [f.id for f in flows]
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
        return [str(r.state.message) for r in runs if r.state is not None]

    messages = asyncio.run(task_messages())
    assert any("X-Amz-Signature=***" in m for m in messages), messages
    assert not any("topsecret123" in m for m in messages)
