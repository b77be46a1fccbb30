"""The SLURM deploy mode on the local single-node SLURM: faults made by SLURM itself.

``scripts/slurm-local.sh start`` provides the cluster (scripts/test.sh runs it); under
``CI=true`` these tests fail rather than skip when it is missing.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from deploy_helpers import (
    assert_same_cache,
    job_records,
    run_cache,
    run_held,
    squeue_ids,
    started_lines,
)
from zarr_parallel.errors import RunFailed

# A hang must fail the test, not the CI run.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def test_scancel_of_a_worker_job_mid_job_is_retried_to_an_identical_cache(
    era5_files: list[Path], reference: Path, tmp_path: Path, fault_plugins: Path, slurm: str
) -> None:
    cancelled: dict[str, Any] = {}

    def cancel_job(info: dict[str, Any]) -> None:
        cancelled.update(info)
        subprocess.run(["scancel", str(info["slurm_job_id"])], check=True)
        time.sleep(0.5)

    result, _ = run_held(
        era5_files,
        tmp_path / "scancel.zarr",
        cancel_job,
        deploy_mode="SLURM",
        simultaneous_worker_limit=2,
    )
    assert cancelled.get("slurm_job_id"), "the held job never ran in a SLURM job"
    assert_same_cache(result.path, reference)
    held = next(
        j
        for j in result.summary["job_results"]
        if any(d == "time" and a <= 30 < b for d, a, b in j["region"])
    )
    assert held["attempts"] == 2
    assert held["slurm_job_id"] != cancelled["slurm_job_id"]
    ids = {r["slurm_job_id"] for r in job_records(result)}
    assert None not in ids and not ids & squeue_ids()


def test_job_over_its_memory_is_killed_by_slurm_and_reported(
    era5_files: list[Path], tmp_path: Path, fault_plugins: Path, slurm: str
) -> None:
    # The job holding time step 30 takes 1.5 GB more than its estimate; its SLURM job asks for
    # the estimate + 10 % + the interpreters (~560 MB here), so SLURM kills it.
    balloon = {
        "type": "test_balloon",
        "nbytes": 1_500_000_000,
        "index": 30,
        "seconds": 30,
        "also": {"latitude": 0},  # one job, where the plan splits latitude too
    }
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match=r"killed by SLURM for exceeding its memory limit") as e:
        run_cache(
            era5_files,
            tmp_path / "balloon.zarr",
            deploy_mode="SLURM",
            simultaneous_worker_limit=2,
            memory_limit="2GB",
            preprocessors=[balloon],
        )
    [failure] = e.value.failed
    assert failure["region"].startswith("d2m,t2m[time 24:36")
    # Not retried: it would only be killed again.
    assert failure["attempts"] == 1
    assert time.monotonic() - t0 < 300


def test_worker_jobs_that_never_start_end_the_run(
    era5_files: list[Path], tmp_path: Path, slurm: str
) -> None:
    # Every worker job fails in its prologue: replacements are tried, then the run gives up.
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match=r"no SLURM worker job is running or queued"):
        run_cache(
            era5_files,
            tmp_path / "never.zarr",
            deploy_mode="SLURM",
            simultaneous_worker_limit=1,
            retries=1,
            slurm={"prologue": ["echo 'site setup failed' >&2", "exit 3"]},
        )
    assert time.monotonic() - t0 < 300


def test_worker_retiring_at_its_lifetime_mid_job_is_replaced_to_an_identical_cache(
    era5_files: list[Path], reference: Path, tmp_path: Path, fault_plugins: Path, slurm: str
) -> None:
    """A run longer than ``slurm.walltime`` allows one worker job: the worker retires before
    its walltime (``--lifetime``) while it runs a job, a replacement SLURM job takes over, and
    the cache is complete and identical (dask-jobqueue alone does not resubmit, its #691).

    The held job passes ``worker_timeout`` (60 s) and is retried; the worker's lifetime
    (walltime 180 s − 120 s, at least half the walltime: 90 s, ± 10 s) ends it during one of
    those attempts. The job is let go only once that worker is gone. Meanwhile no two attempts
    of the job may run at once: the retiring worker stops its job and retries nothing, since
    the scheduler has given the job to the replacement.
    """
    import psutil

    retired: dict[str, Any] = {}
    overlaps: list[list[dict[str, Any]]] = []

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def wait_for_retirement(info: dict[str, Any]) -> None:
        retired.update(info)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and alive(info["ppid"]):
            running = [a for a in started_lines(started) if alive(a["pid"])]
            if len({a["ppid"] for a in running}) > 1:
                overlaps.append(running)
            time.sleep(0.2)
        if not alive(info["ppid"]):
            retired["ended"] = time.time()

    started = tmp_path / "hold.started"
    t0 = time.monotonic()
    result, _ = run_held(
        era5_files,
        tmp_path / "lifetime.zarr",
        wait_for_retirement,
        deploy_mode="SLURM",
        simultaneous_worker_limit=1,
        worker_timeout=60,
        slurm={"walltime": "0:03:00"},
    )
    assert retired.get("slurm_job_id"), "the held job never ran in a SLURM job"
    assert "ended" in retired, "the worker holding the job never retired"
    assert not overlaps, f"two attempts of the held job ran at once: {overlaps[0]}"
    assert_same_cache(result.path, reference)
    held = next(
        j
        for j in result.summary["job_results"]
        if any(d == "time" and a <= 30 < b for d, a, b in j["region"])
    )
    # Finished by another SLURM job than the one that retired; none is left behind.
    assert held["slurm_job_id"] != retired["slurm_job_id"]
    ids = {r["slurm_job_id"] for r in job_records(result)}
    assert None not in ids and not ids & squeue_ids()
    assert time.monotonic() - t0 < 600
