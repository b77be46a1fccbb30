"""Schedules fire: a real ``prefect server start`` whose own scheduler creates the runs.

tests/doors/test_deployments.py keeps its server's scheduler off (no nightly run may start there)
and starts runs through the API, which is why a scheduler that failed on every pass went unnoticed
(Prefect 3.8.8 under SQLAlchemy 2.1: "Can't evaluate bulk DML statement"). Here the server runs
every service with a short scheduler loop; the deployments of ``deployments/prefect.yaml`` are
deployed as a user would; and the server's log must hold no ERROR line.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import IntervalSchedule

from server_support import PROJECT, deploy, prefect_server, prefect_worker, tail, write_policy
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.request.model import build_request

pytestmark = pytest.mark.prefect_server

#: Deadlines for real processes on a loaded 2-core machine, not timings.
SCHEDULER_SECONDS = 180
RUN_SECONDS = 600
PREFECT_FILE = PROJECT / "deployments" / "prefect.yaml"
#: A log line of the server at level ERROR (Prefect's format: ``time | LEVEL | logger - msg``),
#: or a traceback printed by any of its services.
ERROR_LINE = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\||^Traceback ", re.MULTILINE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with every service on, its scheduler looking every 2 s."""
    settings = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "2",
    }
    with prefect_server(tmp_path_factory.mktemp("prefect-scheduler"), settings) as found:
        yield found
        # Every service's passes during the module (scheduler, late runs, cancellation, event
        # persister...) ran without an error.
        assert_no_errors(found["log"])


@pytest.fixture(scope="module")
def deployed(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # The policy lets the scheduled run read and write the tests' temporary folders.
    policy = write_policy(server["home"] / "policy.toml", tmp_path_factory.getbasetemp())
    out = deploy(server, RUN_SECONDS, policy)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with SyncPrefectClient(server["url"]) as client:
        return {d.name: d for d in client.read_deployments()}


def assert_no_errors(log: Path) -> None:
    text = log.read_text(errors="replace")
    errors = ERROR_LINE.findall(text)
    assert not errors, f"the server logged errors:\n{tail(log, 80)}"


def scheduled_deployments() -> dict[str, list[dict[str, Any]]]:
    """Each deployment of prefect.yaml that has schedules, with them, as the file says."""
    config = yaml.safe_load(PREFECT_FILE.read_text())
    return {d["name"]: d["schedules"] for d in config["deployments"] if d.get("schedules")}


def auto_runs(client: SyncPrefectClient, deployment_id: Any) -> list[FlowRun]:
    """The flow runs of a deployment that the server's scheduler created."""
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    return [r for r in runs if r.auto_scheduled]


def test_scheduler_creates_runs_for_every_scheduled_deployment(
    server: dict[str, Any], deployed: dict[str, Any]
) -> None:
    expected = scheduled_deployments()
    assert expected, "prefect.yaml schedules nothing: the nightly re-cache is gone"
    deadline = time.monotonic() + SCHEDULER_SECONDS
    with SyncPrefectClient(server["url"]) as client:
        for name, schedules in expected.items():
            dep = deployed[name]
            assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in schedules]
            while len(runs := auto_runs(client, dep.id)) < 3:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the scheduler made {len(runs)} runs of {name!r} in "
                        f"{SCHEDULER_SECONDS} s:\n{tail(server['log'], 60)}"
                    )
                time.sleep(1)
            # The runs are the cron's (05:30 UTC each day), in the future, still scheduled.
            starts = sorted(r.expected_start_time for r in runs if r.expected_start_time)
            assert len(starts) >= 3
            for start in starts:
                assert (start.hour, start.minute) == (5, 30), starts
                assert start > datetime.now(UTC)
            assert all(r.state is not None and r.state.is_scheduled() for r in runs)
    assert_no_errors(server["log"])


def test_a_due_scheduled_recache_runs_on_a_worker(
    server: dict[str, Any],
    deployed: dict[str, Any],
    era5_factory: Any,
    tmp_path: Path,
) -> None:
    """A schedule a few seconds ahead: the server creates the run, a worker runs the re-cache."""
    files = list(era5_factory(n_files=5, steps_per_file=[24, 24, 12, 24, 24], chunks=(6, 40, 72)))
    src = tmp_path / "src"
    src.mkdir()
    for f in files[:3]:
        shutil.copy2(f, src / f.name)
    request = {
        "data_uri": str(src / "*.nc"),
        "cache_store": str(tmp_path / "nightly.zarr"),
        "chunks": {"time": 24},
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "recommend_changes": "apply",
    }
    cache_flow(build_request(**request))  # the cache as last night left it (session API)
    for f in files[3:]:  # today's files arrive
        shutil.copy2(f, src / f.name)

    dep = deployed["recache-nightly"]
    due = datetime.now(UTC) + timedelta(seconds=8)
    with SyncPrefectClient(server["url"]) as client, prefect_worker(server) as worker_log:
        [schedule] = client.create_deployment_schedules(
            dep.id,
            [(IntervalSchedule(interval=timedelta(days=1), anchor_date=due), True)],
            parameters={"request": request, "allow_append": True, "check_only": False},
        )
        run = wait_for_scheduled_run(client, dep.id, due, worker_log)
        client.delete_deployment_schedule(dep.id, schedule.id)
    assert run.auto_scheduled, "the run was not made by the server's scheduler"
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{tail(worker_log)}"
    out = xr.open_zarr(request["cache_store"])
    source = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(out.time.values, source.time.values)
    for name in ("t2m", "d2m"):
        np.testing.assert_array_equal(out[name].values, source[name].values)
        assert out[name].dtype == source[name].dtype
    assert_no_errors(server["log"])


def wait_for_scheduled_run(
    client: SyncPrefectClient, deployment_id: Any, due: datetime, worker_log: Path
) -> FlowRun:
    """The scheduler's run at ``due``, once a worker has run it to a final state."""
    deadline = time.monotonic() + RUN_SECONDS
    found: FlowRun | None = None
    while True:
        if found is None:
            found = next(
                (
                    r
                    for r in auto_runs(client, deployment_id)
                    if r.expected_start_time is not None
                    and abs((r.expected_start_time - due).total_seconds()) < 1
                ),
                None,
            )
        else:
            [found] = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[found.id]))
            )
            if found.state is not None and found.state.is_final():
                return found
        if time.monotonic() > deadline:
            pytest.fail(
                f"no finished scheduled run after {RUN_SECONDS} s: {found}\n" + tail(worker_log)
            )
        time.sleep(1)
