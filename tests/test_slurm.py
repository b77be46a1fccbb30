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
    balloon = {"type": "test_balloon", "nbytes": 1_500_000_000, "index": 30, "seconds": 30}
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
    assert failure["region"].startswith("t2m,d2m[time 24:36")
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
