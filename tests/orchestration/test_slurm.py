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


POLICED_DRIVER = """
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.request.model import build_request

cache_flow(build_request(
    data_uri="data/era5.json", cache_dir="caches", deploy_mode="SLURM", chunks={"time": 12},
    num_jobs=2, memory_limit="1GB", simultaneous_worker_limit=1, retries=0,
))
"""


def _swap_in_place(path: Path, content: str) -> None:
    """Rewrite ``path`` with ``content`` padded to its size, in place, its modification time
    restored: its identity (size, mtime_ns, inode) is unchanged, so only the policy's check
    of the reference stands in the way."""
    import os

    st = path.stat()
    assert len(content) <= st.st_size
    with open(path, "r+") as f:
        f.write(content.ljust(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_ino) == (st.st_size, st.st_ino)


def test_a_policed_runs_slurm_workers_check_the_reference_again(
    era5_files: list[Path], tmp_path: Path, slurm: str
) -> None:
    """A deployment run (default policy: only its working directory) in SLURM mode, frozen once
    its version is initialised; its kerchunk reference is then swapped, identity unchanged, for
    one pointing at files outside the working directory. The SLURM worker's job reads the
    reference again and refuses it against the same policy: the run fails in its write jobs,
    naming the reference's target, and publishes nothing."""
    import json
    import os
    import shutil
    import signal
    import sys
    import uuid

    import psutil

    from sources_support import kerchunk_refs
    from zarr_parallel.run.policy import POLICY_ENV

    workdir = tmp_path / "deployment"
    (workdir / "data").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    inside = []
    for f in era5_files[:2]:
        shutil.copy(f, workdir / "data" / f.name)
        shutil.copy(f, outside / f.name)
        inside.append(workdir / "data" / f.name)
    reference = workdir / "data" / "era5.json"
    reference.write_text(json.dumps(kerchunk_refs(inside, str(workdir / "data"))))
    sneaky = json.dumps(kerchunk_refs([outside / f.name for f in era5_files[:2]], str(outside)))
    env = {
        **os.environ,
        "PREFECT__RUNTIME__DEPLOYMENT__ID": str(uuid.uuid4()),
        POLICY_ENV: str(tmp_path / "no-policy-file.toml"),
        "ZARR_PARALLEL_FAULT": "stop@initialised",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", POLICED_DRIVER],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its initialised version"
            time.sleep(0.1)
        _swap_in_place(reference, sneaky)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode != 0, err[-3000:]
    message = " ".join(err.split())
    assert "write jobs failed" in message, err[-3000:]
    assert "kerchunk reference to" in message and str(outside) in message
    assert not (workdir / "caches" / "era5.zarr").exists()
