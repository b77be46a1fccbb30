"""The deploy modes: one contract (the same cache from every mode) and what each mode derives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from deploy_helpers import assert_same_cache, job_records, run_cache, squeue_ids
from zarr_parallel.api import ZarrParallelAssembler
from zarr_parallel.errors import RequestError
from zarr_parallel.orchestration.runners import worker_environment, worker_sizing
from zarr_parallel.orchestration.slurm import slurm_cluster_kwargs
from zarr_parallel.planning.memory import FAST_READ_THREADS
from zarr_parallel.planning.sizing import size_workers
from zarr_parallel.request.model import DEFAULT_DEPLOY_MODE, build_request

ROOT = Path(__file__).parents[2]
# A hang must fail the test, not the CI run.
pytestmark = pytest.mark.timeout(900)


def test_default_deploy_mode_is_auto() -> None:
    """docs/design.md §2b: ``auto`` is the default; the explicit modes stay."""
    assert DEFAULT_DEPLOY_MODE == "auto"
    req = build_request(data_uri=__file__, cache_store="/tmp/x.zarr")
    assert req.deploy_mode == "auto"
    for mode in ("series", "dask_distributed", "SLURM"):
        assert build_request(data_uri=__file__, cache_store="/tmp/x.zarr", deploy_mode=mode)


def _assert_job_threads(run: Any, share: int, encoders: int) -> None:
    """Every job of ``run`` read with ``share`` cores' threads and encoded with ``encoders``."""
    for j in run.summary["job_results"]:
        assert j["job_process"]["encoders"] == encoders
        assert j["job_process"]["readers"] == min(share, FAST_READ_THREADS)


@pytest.mark.slurm
def test_every_deploy_mode_writes_the_same_cache(
    era5_files: list[Path], reference: Path, tmp_path: Path, slurm: str, prefect_api: str
) -> None:
    dask_run = run_cache(
        era5_files,
        tmp_path / "dask.zarr",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    slurm_run = run_cache(
        era5_files, tmp_path / "slurm.zarr", deploy_mode="SLURM", simultaneous_worker_limit=2
    )
    for run in (dask_run, slurm_run):
        assert_same_cache(run.path, reference)
        assert run.summary["workers"] == 2
    # The same values and dtypes as xarray reads from the source.
    out = xr.open_zarr(slurm_run.path)
    src = xr.open_mfdataset(era5_files, engine="h5netcdf")
    for name in ("t2m", "d2m"):
        np.testing.assert_array_equal(out[name].values, src[name].values)
        assert out[name].dtype == src[name].dtype
    # The dask jobs ran in two worker processes other than this one.
    pids = {r["pid"] for r in job_records(dask_run)}
    assert len(pids) == 2 and os.getpid() not in pids
    # Each job process read and encoded with its worker's share of the cores; a SLURM job's
    # with the cores it asked for.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    _assert_job_threads(dask_run, share, share)
    _assert_job_threads(slurm_run, 1, 1)
    # Every worker's job process readied the plan before its first job (the warm plugin):
    # that job was lent the slab buffers (zarr_parallel.run.warm).
    for run in (dask_run, slurm_run):
        first: dict[int, dict[str, Any]] = {}
        for r in sorted(job_records(run), key=lambda r: r["started"]):
            first.setdefault(r["pid"], r)
        assert all(r["lent_memory"] > 0 for r in first.values()), first
    # The SLURM jobs really ran in SLURM jobs, which are gone now.
    records = job_records(slurm_run)
    slurm_ids = {r["slurm_job_id"] for r in records}
    assert None not in slurm_ids and len(slurm_ids) == 2
    assert not slurm_ids & squeue_ids()
    # Their logs show workers that used the session's API and started no Prefect server.
    logs = Path(slurm_run.summary["version"]) / ".zarr-parallel" / "slurm-logs"
    text = "".join(p.read_text() for p in logs.glob("*.err"))
    assert "Starting temporary server" not in text
    script = (logs / "job-script.sh").read_text()
    assert f"export PREFECT_API_URL={prefect_api}" in script
    # No worker of that cluster outlives the run (SLURM tracks processes by parentage here, so
    # a worker stuck on its way out would stay: the prewarm plugin's teardown ends it).
    (address,) = set(re.findall(r"tcp://[\w.\-]+:\d+", script))
    deadline = time.monotonic() + 120
    while _processes_with(address):
        assert time.monotonic() < deadline, f"workers left running: {_processes_with(address)}"
        time.sleep(1)
    assert "export PREFECT_SERVER_EPHEMERAL_ENABLED=false" in script


def test_results_and_progress_artifacts(
    era5_files: list[Path], reference: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run = run_cache(
        era5_files,
        tmp_path / "artifacts.zarr",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    assert_same_cache(run.path, reference)
    from zarr_parallel.orchestration.tasks import artifact_key

    results_key = artifact_key("zp-results", run.path)
    progress_key = artifact_key("zp-progress", run.path)
    with get_client(sync_client=True) as client:
        [table] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[results_key]))
        )
        [progress] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[progress_key]))
        )
    rows: list[dict[str, Any]] = json.loads(str(table.data))
    assert [r["job"] for r in rows] == list(range(run.summary["jobs"]))
    assert {r["state"] for r in rows} == {"Completed"}
    assert all(r["attempts"] == 1 for r in rows)
    assert all(r["peak memory"] > 0 and r["estimated memory"] > 0 for r in rows)
    assert all(r["bytes written"] > 0 and r["message"] == "" for r in rows)
    assert float(str(progress.data)) == 100.0
    # Every per-job result carries what the table shows.
    for job in run.summary["job_results"]:
        assert job["attempts"] == 1 and job["bytes"] > 0
        assert job["peak_memory"] >= 0 and job["estimated_memory"] > 0
        assert job["worker"]["pid"] != os.getpid()


def test_unguarded_script_runs_on_a_local_cluster_without_worker_servers(
    era5_files: list[Path], reference: Path, tmp_path: Path
) -> None:
    """A plain script (no ``if __name__ == "__main__"``) with no PREFECT_API_URL: the flow
    starts one temporary Prefect server and the workers use it; none starts its own.

    ``log_level=1`` lets Prefect's info lines through in the flow and on the workers alike, so
    a server started anywhere would say so here."""
    script = tmp_path / "user_script.py"
    store = tmp_path / "script.zarr"
    script.write_text(
        textwrap.dedent(
            f"""
            from zarr_parallel import ZarrParallelAssembler
            zp = ZarrParallelAssembler({[str(p) for p in era5_files]!r}, chunks={{"time": 12}})
            result = zp.cache(cache_store={str(store)!r}, num_jobs=4, memory_limit="1GB",
                              simultaneous_worker_limit=2, log_level=1,
                              deploy_mode="dask_distributed")
            print("DONE", result.summary["workers"], result.summary["deploy_mode"])
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DONE 2 dask_distributed" in proc.stdout
    # The Python API's one temporary API (started before Prefect was imported, docs/design.md
    # §2b); neither the flow nor any worker started a server of its own (Prefect would say so).
    assert proc.stderr.count("using the command's temporary Prefect API at") == 1, proc.stderr
    assert proc.stderr.count("Starting temporary server") == 0, proc.stderr[-3000:]
    assert_same_cache(store, reference)


def _request(**fields: Any) -> Any:
    return build_request(data_uri=__file__, cache_store="/tmp/x.zarr", **fields)


def test_slurm_job_script_carries_derived_memory_and_walltime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dask_jobqueue.slurm import SLURMCluster

    monkeypatch.delenv("ZARR_PARALLEL_THREADS", raising=False)

    req = _request(
        deploy_mode="SLURM",
        memory_limit="4GB",
        worker_timeout="20:00",
        simultaneous_worker_limit=3,
        slurm={
            "partition": "compute",
            "account": "climate",
            "qos": "short",
            "directives": ["--constraint=intel"],
            "prologue": ["module load netcdf"],
        },
    )
    # 10 jobs on 3 workers: 4 jobs per worker of at most 20 minutes, plus 5 minutes.
    sizing = worker_sizing(req, max_job_estimate=1_000_000_000, jobs=10)
    assert sizing.workers == 3
    # 1.1 GB + 256 MB reserve + 250 MB worker process = 1.606 GB = 1532 MiB (rounded up).
    assert sizing.memory == 1_606_000_000
    kwargs = slurm_cluster_kwargs(req, sizing, "http://prefect.example:4200/api", tmp_path)
    cluster = SLURMCluster(**kwargs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert "#SBATCH --mem=1532M" in lines
    assert "#SBATCH -t 1:25:00" in lines
    assert "#SBATCH -p compute" in lines
    assert "#SBATCH -A climate" in lines
    assert "#SBATCH --qos=short" in lines
    assert "#SBATCH --constraint=intel" in lines
    assert lines.index("module load netcdf") < lines.index(
        "export PREFECT_API_URL=http://prefect.example:4200/api"
    )
    assert "export PREFECT_SERVER_EPHEMERAL_ENABLED=false" in lines
    assert "export DASK_LOGGING__DISTRIBUTED=warning" in lines
    # The job reads and encodes with the cores it asked for, not the node's.
    assert f"#SBATCH --cpus-per-task={req.slurm.cores}" in lines
    assert f"export ZARR_PARALLEL_THREADS={req.slurm.cores}" in lines
    # Workers retire two minutes before the walltime; one thread, no nanny.
    assert "--lifetime 4980s" in script and "--nthreads 1" in script
    assert "--no-nanny" in script


def test_slurm_memory_is_capped_at_memory_limit_and_walltime_at_slurm_walltime() -> None:
    req = _request(
        deploy_mode="slurm",
        memory_limit="2GB",
        worker_timeout="1:00:00",
        slurm={"walltime": "2:00:00"},
    )
    sizing = worker_sizing(req, max_job_estimate=1_600_000_000, jobs=8)
    assert sizing.memory == 2_000_000_000
    assert sizing.walltime == 7200 and sizing.lifetime == 7080
    with pytest.raises(RequestError, match=r"slurm\.walltime"):
        worker_sizing(
            _request(deploy_mode="slurm", worker_timeout="1:00:00", slurm={"walltime": "30:00"}),
            max_job_estimate=10**6,
            jobs=1,
        )
    with pytest.raises(RequestError, match=r"slurm\.walltime"):
        _request(slurm={"walltime": "soon"})


def test_concurrency_is_the_worker_limit_or_the_jobs() -> None:
    common = dict(max_job_estimate=10**6, memory_limit=10**9, reserve=10**8, timeout=60.0)
    assert size_workers(jobs=3, max_workers=8, worker_overhead=0, **common).workers == 3
    assert size_workers(jobs=30, max_workers=8, worker_overhead=0, **common).workers == 8


def test_worker_environment_names_the_flow_api_and_quiets_dask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ZARR_PARALLEL_THREADS", raising=False)
    env = worker_environment(_request(log_level=1), "http://127.0.0.1:4200/api", cores=3)
    assert env == {
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "DASK_LOGGING__DISTRIBUTED": "info",
        "ZARR_PARALLEL_THREADS": "3",
        "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
        "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "500ms",
        "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "500ms",
    }
    # More workers than cores: each still gets a thread.
    assert worker_environment(_request(), None, cores=0)["ZARR_PARALLEL_THREADS"] == "1"
    # The user's own setting wins.
    monkeypatch.setenv("ZARR_PARALLEL_THREADS", "4")
    assert worker_environment(_request(), None, cores=1)["ZARR_PARALLEL_THREADS"] == "4"


def test_local_workers_and_their_nannies_run_without_the_profiler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker environment's dask settings reach both processes of a local worker: the nanny
    (from its own environment) and the worker it spawns (which takes the nanny's whole
    configuration over its environment, so the environment alone would not do)."""
    from distributed import Client

    from zarr_parallel.orchestration.local_cluster import local_cluster

    # Defined here: cloudpickle sends a test function's locals by value to the workers.
    def settings() -> dict[str, Any]:
        import dask

        return {
            "profile": dask.config.get("distributed.worker.profile.enabled"),
            "tick": dask.config.get("distributed.admin.tick.interval"),
            "monitor": dask.config.get("distributed.worker.memory.monitor-interval"),
            "threads": os.environ.get("ZARR_PARALLEL_THREADS"),
        }

    def profiling(dask_worker: Any) -> bool:
        callbacks = dask_worker.periodic_callbacks.items()
        return any(pc.is_running() for name, pc in callbacks if "profile" in name)

    monkeypatch.delenv("ZARR_PARALLEL_THREADS", raising=False)
    req = _request(deploy_mode="dask_distributed", simultaneous_worker_limit=1)
    sizing = worker_sizing(req, max_job_estimate=10**8, jobs=1)
    env = worker_environment(_request(), None, cores=1)
    with local_cluster(sizing, env, 0) as cluster, Client(cluster) as client:
        client.wait_for_workers(sizing.workers, timeout=120)
        expected = {"profile": False, "tick": "500ms", "monitor": "500ms"}
        for seen in client.run(settings).values():
            assert seen == {**expected, "threads": "1"}
        for seen in client.run(settings, nanny=True).values():
            assert {k: v for k, v in seen.items() if k != "threads"} == expected
        assert not any(client.run(profiling).values())


def test_the_flow_process_scheduler_steals_nothing_and_ticks_calmly() -> None:
    """The local cluster's scheduler runs in the flow process, on the cores the jobs use: no
    work-stealing extension (tasks reach only free workers, so there is nothing to steal) and
    its event-loop watchdog every 0.5 s, not dask's 20 ms."""
    from zarr_parallel.orchestration.cluster import start_local_cluster

    req = _request(deploy_mode="dask_distributed", simultaneous_worker_limit=1)
    started = start_local_cluster(req, worker_sizing(req, max_job_estimate=10**8, jobs=1), None)
    try:
        scheduler = started.cluster.scheduler
        assert "stealing" not in scheduler.extensions
        assert scheduler.periodic_callbacks["tick"].callback_time == 500
        assert scheduler.allowed_failures == 0
    finally:
        started.close()


def test_job_processes_use_their_workers_share_of_the_cores_or_the_users_zarr_setting(
    era5_files: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZARR_PARALLEL_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    alone = run_cache(
        era5_files,
        tmp_path / "alone.zarr",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=1,
    )
    # A user who configured zarr's thread pool keeps it; the readers still take the share.
    monkeypatch.setenv("ZARR_THREADING__MAX_WORKERS", "3")
    user = run_cache(
        era5_files,
        tmp_path / "user.zarr",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    for run, share, encoders in ((alone, cores, cores), (user, max(1, cores // 2), 3)):
        assert_same_cache(run.path, reference)
        _assert_job_threads(run, share, encoders)


def test_api_default_is_the_request_default() -> None:
    import inspect

    default = inspect.signature(ZarrParallelAssembler.cache).parameters["deploy_mode"].default
    assert default == "auto"


def test_memory_limit_must_leave_room_beside_the_worker_process() -> None:
    from zarr_parallel.run.steps import limits_for

    with pytest.raises(RequestError, match=r"memory_limit='500MB': leaves nothing for jobs"):
        limits_for(_request(memory_limit="500MB", deploy_mode="dask_distributed"))
    # In series mode there is no worker process beside the job process.
    assert limits_for(_request(memory_limit="500MB", deploy_mode="series")).memory_budget == (
        500_000_000 - 256_000_000
    )


def _processes_with(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or []):
            found.append(proc.info["pid"])
    return found


def test_existing_scheduler_runs_the_jobs_and_is_left_running(
    era5_files: list[Path], reference: Path, tmp_path: Path
) -> None:
    """``scheduler_address``: the write tasks run on the workers of a scheduler started outside
    the run (``dask scheduler`` and ``dask worker --nthreads 1``, as the docs say), the cache is
    the same bytes, and the run leaves that cluster as it found it."""
    from distributed import Client

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log = (tmp_path / "cluster.log").open("w")
    python_m = [sys.executable, "-m"]
    # The scheduler picks its own port and says which in its scheduler file: a port picked here
    # and freed could be taken by another process before the scheduler binds it (seen in CI).
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                *python_m,
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--scheduler-file",
                str(scheduler_file),
                "--no-dashboard",
            ],
            env=env,
            stdout=log,
            stderr=log,
        ),
    ]
    try:
        deadline = time.monotonic() + 120
        address = ""
        while not address:
            assert procs[0].poll() is None, "the dask scheduler exited (see cluster.log)"
            assert time.monotonic() < deadline, (
                "the dask scheduler wrote no scheduler file in 120 s"
            )
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):  # not written yet, or half written
                time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    *python_m,
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "2",
                    "--memory-limit",
                    "1GB",
                    "--no-dashboard",
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        with Client(address, timeout="120s") as client:
            client.wait_for_workers(2, timeout=180)
            worker_pids = set(client.run(os.getpid).values())
            result = run_cache(
                era5_files,
                tmp_path / "remote.zarr",
                deploy_mode="dask_distributed",
                scheduler_address=address,
            )
            assert_same_cache(result.path, reference)
            assert {r["pid"] for r in job_records(result)} <= worker_pids
            # Still there, with the same workers: the run closed only its own client.
            assert set(client.run(os.getpid).values()) == worker_pids
        assert all(p.poll() is None for p in procs)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
