"""Deployments against a real Prefect server, a real process work pool and a real worker.

One ``prefect server start`` on loopback (SQLite under the module's temporary folder, its own
``PREFECT_HOME``), the deployments of ``deployments/prefect.yaml`` deployed with
``python -m deployments`` (``prefect deploy --all``), and one ``prefect worker start`` process.
The flow runs are created through the API and executed by the worker in their own processes;
they are submitted together (a module fixture) so their start-up overlaps. The session's own
temporary Prefect API (tests/conftest.py) is left alone: every client and subprocess here is
given this server's URL explicitly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import xarray as xr
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import ArtifactSort
from prefect.exceptions import PrefectHTTPStatusError

from server_support import PROJECT, deploy, prefect_server, prefect_worker, tail, write_policy
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.model import build_request
from zarr_parallel.run.phases import PHASES
from zarr_parallel.run.policy import POLICY_ENV
from zarr_parallel.store.paths import CachePaths

pytestmark = pytest.mark.prefect_server

RUN_SECONDS = 600
#: Longer than the server's event persister flush interval (5 s), so stored events are complete.
EVENT_BATCH_SECONDS = 7
#: The worker's AWS_SECRET_ACCESS_KEY: a value that must never leave it.
WORKER_CANARY = "canary-worker-secret-6f1c2b9d"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real ``prefect server start`` on 127.0.0.1 with SQLite under a temporary folder."""
    # No schedule should fire during these tests (the re-cache deployment's cron is checked as
    # stored; its runs are started through the API). tests/doors/test_schedules.py runs the
    # scheduler.
    settings = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    with prefect_server(tmp_path_factory.mktemp("prefect-server"), settings) as found:
        yield found


def _client(server: dict[str, Any]) -> SyncPrefectClient:
    return SyncPrefectClient(server["url"])


@pytest.fixture(scope="module")
def deployed(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python -m deployments --policy P``: the process pool and every deployment of
    prefect.yaml, with an operator policy that lets runs use the tests' temporary folders and
    the loopback host (the default would allow only the project folder)."""
    policy = write_policy(server["home"] / "policy.toml", tmp_path_factory.getbasetemp())
    out = deploy(server, RUN_SECONDS, policy)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with _client(server) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        pool = client.read_work_pool("zarr-parallel")
    return {"deployments": deployments, "pool": pool, "output": out.stdout, "policy": policy}


@pytest.fixture(scope="module")
def worker(server: dict[str, Any], deployed: dict[str, Any]) -> Iterator[Path]:
    """A real ``prefect worker start`` polling the process pool."""
    # A secret in the worker's environment, which no request may send anywhere.
    with prefect_worker(server, env={"AWS_SECRET_ACCESS_KEY": WORKER_CANARY}) as log:
        yield log


def _create_run(server: dict[str, Any], deployment: str, parameters: dict[str, Any]) -> UUID:
    with _client(server) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters).id


def _wait(
    server: dict[str, Any], run_id: UUID, worker_log: Path, *, paused: bool = False
) -> FlowRun:
    deadline = time.monotonic() + RUN_SECONDS
    with _client(server) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            if state is not None and (state.is_final() or (paused and state.is_paused())):
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {run_id} still {state} after {RUN_SECONDS} s:\n" + tail(worker_log)
                )
            time.sleep(1)


def _artifact(server: dict[str, Any], key: str) -> Any:
    with _client(server) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.UPDATED_DESC,
            limit=1,
        )
    assert found, f"no artifact {key!r} on the server"
    return found[0]


def _logs(server: dict[str, Any], run_id: UUID, until: str | None = None) -> list[Any]:
    """The run's logs; with ``until``, wait (generously) for a message starting with it.

    A run's final state reaches the API before its process has shipped its last log lines
    (they go in batches), so a finished run's logs can lag behind it.
    """
    deadline = time.monotonic() + 120
    with _client(server) as client:
        while True:
            logs = list(
                client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
                )
            )
            if until is None or any(log.message.startswith(until) for log in logs):
                return logs
            if time.monotonic() > deadline:
                return logs
            time.sleep(1)


# ---------------------------------------------------------------------------------------------
# All runs of the module, submitted together


@pytest.fixture(scope="module")
def runs(
    server: dict[str, Any],
    deployed: dict[str, Any],
    worker: Path,
    era5_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deployment-runs")
    files = list(era5_factory(n_files=5, steps_per_file=[24, 24, 12, 24, 24], chunks=(6, 40, 72)))
    src = root / "src"
    src.mkdir()
    for f in files[:3]:
        shutil.copy2(f, src / f.name)
    common = {"data_uri": str(src / "*.nc"), "deploy_mode": "series", "memory_limit": "300MB"}
    # A selection that cuts source chunks (time 3..56 of chunks of 6): recommendations.
    cut = [{"type": "isel", "time": [3, 57]}]
    # The re-cache deployment's cache: made here (three files), then the source grows by two.
    grow = root / "grow"
    grow.mkdir()
    for f in files[:3]:
        shutil.copy2(f, grow / f.name)
    grown_cache = root / "grown.zarr"
    grown_request = {
        **common,
        "data_uri": str(grow / "*.nc"),
        "cache_store": str(grown_cache),
        "chunks": {"time": 24},
    }
    cache_flow(build_request(**grown_request))  # under the session's API, in this process
    for f in files[3:]:
        shutil.copy2(f, grow / f.name)
    with _client(server) as client:
        before = len(client.read_flow_runs())
    params = {
        # Two ad hoc runs on one cache at once: the per-target slot makes them take turns.
        "adhoc_a": {
            **common,
            "cache_store": str(root / "adhoc.zarr"),
            "chunks": {"time": 24},
            "preprocessors": cut,
            "recommend_changes": "apply",
        },
        "adhoc_b": {
            **common,
            "cache_store": str(root / "adhoc.zarr"),
            "chunks": {"time": 24},
            "preprocessors": cut,
            "recommend_changes": "apply",
        },
        "pause_apply": {**common, "cache_store": str(root / "paused.zarr"), "preprocessors": cut},
        "pause_cancel": {**common, "cache_store": str(root / "cancel.zarr"), "preprocessors": cut},
        "pause_proceed": {
            **common,
            "cache_store": str(root / "proceed.zarr"),
            "preprocessors": cut,
        },
        "pause_timeout": {
            **common,
            "cache_store": str(root / "timeout.zarr"),
            "preprocessors": cut,
            "pause_timeout": 3,
        },
    }
    ids = {
        name: _create_run(server, "zarr-parallel-cache/cache", {"request": p})
        for name, p in params.items()
    }
    # The re-cache run writes on a local dask cluster (the default deploy mode) that the flow
    # run starts in the worker's flow process: how the run is executed is not part of what the
    # cache holds, so it still appends to the cache made in series above.
    parallel = {"deploy_mode": "dask_distributed", "simultaneous_worker_limit": 2}
    ids["recache"] = _create_run(
        server,
        "zarr-parallel-recache/recache-nightly",
        {"request": {**grown_request, **parallel, "memory_limit": "1GB"}},
    )
    return {
        "root": root,
        "src": src,
        "ids": ids,
        "params": params,
        "before": before,
        "grown_cache": grown_cache,
        "grow": grow,
        "worker_log": worker,
    }


# ---------------------------------------------------------------------------------------------
# Tests


def test_deployments_as_prefect_yaml_says(deployed: dict[str, Any]) -> None:
    deps = deployed["deployments"]
    assert set(deps) == {"cache", "recache-nightly"}
    assert deployed["pool"].type == "process"
    for dep in deps.values():
        assert dep.work_pool_name == "zarr-parallel"
        assert dep.enforce_parameter_schema is True
        assert dep.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}
        ]
        assert "zarr-parallel" in dep.tags
    cache, recache = deps["cache"], deps["recache-nightly"]
    assert cache.entrypoint == "flows/cache.py:cache_flow"
    assert recache.entrypoint == "flows/recache.py:recache_flow"
    # The UI form is the request model: nested, described, with defaults and limits.
    schema = cache.parameter_openapi_schema
    assert schema["required"] == ["request"]
    model = schema["definitions"]["CacheRequest"]
    assert model["required"] == ["data_uri"] and model["additionalProperties"] is False
    props = model["properties"]
    assert all(p.get("description") for p in props.values()), "every field is described"
    assert props["num_jobs"]["anyOf"][0]["minimum"] == 1
    # 0.5 read levels above 2 as 2: the form takes them, the run clamps them with a warning.
    assert props["log_level"]["minimum"] == 0 and "maximum" not in props["log_level"]
    assert "auto" in props["deploy_mode"]["enum"]
    assert props["recommend_changes"]["enum"] == ["halt", "apply", "proceed"]
    assert props["recommend_changes"]["default"] == "halt"
    assert "SLURM" in props["deploy_mode"]["enum"]
    assert props["pause_timeout"]["default"] == "1:00:00"
    # The scheduled re-cache: cron, its own parameters, one run at a time.
    assert [s.schedule.cron for s in recache.schedules] == ["30 5 * * *"]
    assert set(recache.parameter_openapi_schema["properties"]) == {
        "request",
        "allow_append",
        "check_only",
    }
    assert recache.parameters["request"]["recommend_changes"] == "apply"
    assert recache.concurrency_options is not None
    assert recache.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert recache.global_concurrency_limit is not None
    assert recache.global_concurrency_limit.limit == 1


def test_bad_parameters_are_rejected_before_a_run(
    server: dict[str, Any], deployed: dict[str, Any], tmp_path: Path
) -> None:
    ok = {"data_uri": str(tmp_path / "*.nc"), "cache_dir": str(tmp_path)}
    bad = [
        ({**ok, "num_jobs": 0}, "request.num_jobs"),
        ({**ok, "recommend_changes": "maybe"}, "request.recommend_changes"),
        ({**ok, "deploy_mode": "cloud"}, "request.deploy_mode"),
        ({**ok, "chunks": {"time": "a lot"}}, "request.chunks"),
        ({**ok, "colour": "blue"}, "'colour' was unexpected"),
        ({"cache_dir": str(tmp_path)}, "'data_uri' is a required property"),
    ]
    with _client(server) as client:
        dep = client.read_deployment_by_name("zarr-parallel-cache/cache")
        before = len(client.read_flow_runs(flow_run_filter=FlowRunFilter()))
        for request, expected in bad:
            with pytest.raises(PrefectHTTPStatusError, match="409") as info:
                client.create_flow_run_from_deployment(dep.id, parameters={"request": request})
            assert expected in info.value.response.text
        assert len(client.read_flow_runs()) == before  # no run was created


def test_adhoc_runs_through_the_worker_take_turns(
    server: dict[str, Any], runs: dict[str, Any]
) -> None:
    ids = runs["ids"]
    states = {n: _wait(server, ids[n], runs["worker_log"]).state for n in ("adhoc_a", "adhoc_b")}
    for name, state in states.items():
        assert state is not None and state.is_completed(), f"{name}: {state}"
    cache = Path(runs["params"]["adhoc_a"]["cache_store"])
    # The recommendation was applied: the selection widened to whole source chunks [0, 60).
    out = xr.open_zarr(cache)
    src = xr.open_mfdataset(sorted(runs["src"].glob("*.nc")), engine="h5netcdf")
    xr.testing.assert_equal(out.t2m, src.t2m.isel(time=slice(0, 60)))
    assert out.t2m.dtype == src.t2m.dtype and out.t2m.attrs == src.t2m.attrs
    # Artifacts read back through the API.
    plan = _artifact(server, artifact_key("zp-plan", cache))
    assert "read amplification" in str(plan.data)
    recs = _artifact(server, artifact_key("zp-recommendations", cache))
    assert "Applied: widen preprocessors[0].time to [0, 60]" in str(recs.data)
    results = _artifact(server, artifact_key("zp-results", cache))
    assert "Completed" in str(results.data)
    progress = _artifact(server, artifact_key("zp-progress", cache))
    assert float(progress.data) == 100.0
    # One run wrote the cache, the other found it up to date; they held the slot in turn.
    turns = []
    for name in ("adhoc_a", "adhoc_b"):
        logs = _logs(server, ids[name], until="releasing zarr-")
        held = [log.timestamp for log in logs if log.message.startswith("holding zarr-parallel-")]
        freed = [log.timestamp for log in logs if log.message.startswith("releasing zarr-")]
        assert held and freed, f"{name} never held the cache's slot: {[g.message for g in logs]}"
        turns.append((held[0], freed[-1]))
    first, second = sorted(turns)
    assert second[0] >= first[1], "the second run took the slot before the first released it"
    assert len(CachePaths(cache).all_versions()) == 1


def test_only_the_cache_run_sends_heartbeats(server: dict[str, Any], runs: dict[str, Any]) -> None:
    # A deployment run tells the API it lives (Prefect's flow-run heartbeat, for crash detection);
    # its write subflow, in the same process, does not repeat it, because every heartbeating run
    # ends up to 1 s late (zarr_parallel.orchestration.control.without_flow_heartbeat). One of the
    # two ad hoc runs on one cache wrote it (the other found it up to date).
    parents = [runs["ids"][name] for name in ("adhoc_a", "adhoc_b")]
    children = []
    for run_id in parents:
        state = _wait(server, run_id, runs["worker_log"]).state
        assert state is not None and state.is_completed(), state
        with _client(server) as client:
            children += client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
                )
            )
    assert children, "neither cache run started a write subflow"
    ids = [f"prefect.flow-run.{r}" for r in [*parents, *(c.id for c in children)]]

    def beating() -> set[str]:
        body = json.dumps(
            {
                "filter": {
                    "event": {"name": ["prefect.flow-run.heartbeat"]},
                    "resource": {"id": ids},
                },
                "limit": 50,  # the API's largest page
            }
        ).encode()
        request = urllib.request.Request(
            f"{server['url']}/events/filter", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return {e["resource"]["prefect.resource.id"] for e in json.load(r)["events"]}

    # The server stores events in batches (every few seconds): wait for the parents' heartbeats,
    # then past another batch, before saying the subflows sent none.
    expected = {f"prefect.flow-run.{p}" for p in parents}
    deadline = time.monotonic() + 60
    while not expected <= beating() and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(EVENT_BATCH_SECONDS)
    seen = beating()
    assert expected <= seen
    assert not {f"prefect.flow-run.{c.id}" for c in children} & seen


def test_pause_on_recommendations_and_resume_with_apply(
    server: dict[str, Any], runs: dict[str, Any]
) -> None:
    run_id = runs["ids"]["pause_apply"]
    run = _wait(server, run_id, runs["worker_log"], paused=True)
    assert run.state is not None and run.state.is_paused(), run.state
    cache = Path(runs["params"]["pause_apply"]["cache_store"])
    assert not cache.exists(), "nothing is written while paused"
    recs = _artifact(server, artifact_key("zp-recommendations", cache))
    assert "widen preprocessors[0].time to [0, 60]" in str(recs.data)
    with _client(server) as client:
        keyset = run.state.state_details.run_input_keyset
        assert keyset is not None
        schema = client.read_flow_run_input(run_id, keyset["schema"])
        assert '"enum":["apply","proceed","cancel"]' in schema.replace(" ", "")
        # The typed input is checked by the API: only listed recommendations can be applied.
        refused = client.resume_flow_run(
            run_id, run_input={"decision": "apply", "recommendation": 9}
        )
        assert refused.status.value == "REJECT"
        accepted = client.resume_flow_run(
            run_id, run_input={"decision": "apply", "recommendation": 1}
        )
        assert accepted.status.value == "ACCEPT"
    run = _wait(server, run_id, runs["worker_log"])
    assert run.state is not None and run.state.is_completed(), run.state
    out = xr.open_zarr(cache)
    src = xr.open_mfdataset(sorted(runs["src"].glob("*.nc")), engine="h5netcdf")
    xr.testing.assert_equal(out.d2m, src.d2m.isel(time=slice(0, 60)))
    applied = _artifact(server, artifact_key("zp-recommendations", cache))
    assert "Applied recommendation 1" in str(applied.data) or "Applied:" in str(applied.data)


def test_pause_resume_with_proceed_runs_as_asked(
    server: dict[str, Any], runs: dict[str, Any]
) -> None:
    run_id = runs["ids"]["pause_proceed"]
    run = _wait(server, run_id, runs["worker_log"], paused=True)
    assert run.state is not None and run.state.is_paused(), run.state
    with _client(server) as client:
        assert client.resume_flow_run(run_id, run_input={"decision": "proceed"}).status.value == (
            "ACCEPT"
        )
    run = _wait(server, run_id, runs["worker_log"])
    assert run.state is not None and run.state.is_completed(), run.state
    out = xr.open_zarr(runs["params"]["pause_proceed"]["cache_store"])
    src = xr.open_mfdataset(sorted(runs["src"].glob("*.nc")), engine="h5netcdf")
    xr.testing.assert_equal(out.t2m, src.t2m.isel(time=slice(3, 57)))  # the selection as asked


def test_pause_cancel_and_timeout_end_clearly(server: dict[str, Any], runs: dict[str, Any]) -> None:
    cancel_id = runs["ids"]["pause_cancel"]
    run = _wait(server, cancel_id, runs["worker_log"], paused=True)
    with _client(server) as client:
        client.resume_flow_run(cancel_id, run_input={"decision": "cancel"})
    run = _wait(server, cancel_id, runs["worker_log"])
    assert run.state is not None and run.state.is_cancelled(), run.state
    assert "nothing was written" in str(run.state.message)
    timed_out = _wait(server, runs["ids"]["pause_timeout"], runs["worker_log"])
    assert timed_out.state is not None and timed_out.state.is_failed()
    assert "without a decision; nothing was written" in str(timed_out.state.message)
    for name in ("pause_cancel", "pause_timeout"):
        store = Path(runs["params"][name]["cache_store"])
        assert not store.exists() and not CachePaths(store).versions.exists()


def test_scheduled_recache_deployment_appends(server: dict[str, Any], runs: dict[str, Any]) -> None:
    run = _wait(server, runs["ids"]["recache"], runs["worker_log"])
    assert run.state is not None and run.state.is_completed(), run.state
    cache = runs["grown_cache"]
    decision = _artifact(server, artifact_key("zp-recache", cache))
    assert "Re-cache: append" in str(decision.data)
    assert "2 new source file(s)" in str(decision.data)
    # The append's jobs ran through the cache flow's write subflow on the run's dask workers.
    logs = _logs(server, runs["ids"]["recache"], until="dask_distributed: ")
    assert any(g.message.startswith("dask_distributed: ") for g in logs), [g.message for g in logs]
    written = _artifact(server, artifact_key("zp-results", cache))
    assert "Completed" in str(written.data)
    out = xr.open_zarr(cache)
    src = xr.open_mfdataset(sorted(runs["grow"].glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(out.time.values, src.time.values)
    np.testing.assert_array_equal(out.t2m.values, src.t2m.values)


def test_all_runs_came_from_the_deployments(server: dict[str, Any], runs: dict[str, Any]) -> None:
    with _client(server) as client:
        found = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(runs["ids"].values())))
        )
    assert len(found) == len(runs["ids"])
    assert all(r.deployment_id is not None for r in found)


# ---------------------------------------------------------------------------------------------
# The form is untrusted: the pool's template and the operator's policy


def test_pool_lets_no_run_set_env_command_or_working_dir(
    server: dict[str, Any], deployed: dict[str, Any], tmp_path: Path
) -> None:
    template = deployed["pool"].base_job_template
    variables = template["variables"]
    assert not {"env", "command", "working_dir"} & set(variables["properties"])
    assert variables["additionalProperties"] is False
    assert template["job_configuration"]["env"][POLICY_ENV] == str(deployed["policy"])
    ok = {"data_uri": str(tmp_path / "*.nc"), "cache_dir": str(tmp_path)}
    hostile = [
        {"env": {"PYTHONPATH": str(tmp_path)}},
        {"env": {POLICY_ENV: str(tmp_path / "open.toml")}},
        {f"env.{POLICY_ENV}": str(tmp_path / "open.toml")},
        {"command": "sh -c 'id > /tmp/owned'"},
        {"working_dir": str(tmp_path)},
    ]
    with _client(server) as client:
        dep = client.read_deployment_by_name("zarr-parallel-cache/cache")
        before = len(client.read_flow_runs())
        for job_variables in hostile:
            with pytest.raises(PrefectHTTPStatusError, match="422"):
                client.create_flow_run_from_deployment(
                    dep.id, parameters={"request": ok}, job_variables=job_variables
                )
        assert len(client.read_flow_runs()) == before  # no run was created


@pytest.fixture(scope="module")
def refused(
    server: dict[str, Any],
    deployed: dict[str, Any],
    worker: Path,
    era5_files: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """Deployment runs the operator's policy refuses, all submitted at once; a loopback HTTP
    server (an allowed host) serving a netCDF file records every request it gets."""
    from sources_support import serve_http

    root = tmp_path_factory.mktemp("policy-runs")
    www = root / "www"
    www.mkdir()
    shutil.copy(era5_files[0], www / era5_files[0].name)
    outside = Path(tempfile.mkdtemp(prefix="zp-outside-policy-"))  # not under the policy's root
    try:
        with serve_http(www) as svc:
            ok = {
                "data_uri": str(era5_files[0]),
                "cache_store": str(root / "ok.zarr"),
                "deploy_mode": "series",
                "memory_limit": "300MB",
            }
            params = {
                # The exfiltration: the worker's secret in a header, to a URL.
                "exfiltrate": {
                    **ok,
                    "data_uri": f"{svc.url}/{era5_files[0].name}",
                    "storage_options": {"headers": {"X-Debug": "${AWS_SECRET_ACCESS_KEY}"}},
                },
                "outside_source": {**ok, "data_uri": str(PROJECT / "README.md")},
                "outside_cache": {**ok, "cache_store": str(outside / "stolen.zarr")},
                "prologue": {**ok, "deploy_mode": "SLURM", "slurm": {"prologue": ["id"]}},
                "scheduler": {**ok, "scheduler_address": "tcp://127.0.0.1:9"},
                "allowed": ok,
            }
            ids = {
                name: _create_run(server, "zarr-parallel-cache/cache", {"request": p})
                for name, p in params.items()
            }
            runs = {name: _wait(server, run_id, worker) for name, run_id in ids.items()}
            yield {"runs": runs, "params": params, "server": svc, "outside": outside}
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("exfiltrate", "storage_options.headers.X-Debug='${AWS_SECRET_ACCESS_KEY}'"),
        ("outside_source", "data_uri="),
        ("outside_cache", "cache_store="),
        ("prologue", "slurm.prologue="),
        ("scheduler", "scheduler_address="),
    ],
)
def test_policy_refuses_a_deployment_run_before_planning(
    refused: dict[str, Any], name: str, expected: str
) -> None:
    state = refused["runs"][name].state
    assert state is not None and state.is_failed(), state
    message = str(state.message)
    assert expected in message and "policy file" in message, message
    assert WORKER_CANARY not in message


def test_policy_refusals_write_nothing_and_contact_no_one(
    refused: dict[str, Any], worker: Path
) -> None:
    # The run the policy allows completed on the same worker, which the refusals left running.
    allowed = refused["runs"]["allowed"].state
    assert allowed is not None and allowed.is_completed(), allowed
    assert not any(refused["outside"].iterdir()), "a refused run wrote outside the policy's roots"
    # The exfiltration was refused before any request left the worker.
    assert refused["server"].stats.requests == [], refused["server"].stats.requests
    assert WORKER_CANARY not in tail(worker, 100000)


# ---------------------------------------------------------------------------------------------
# The command line without any server


def test_cli_runs_without_a_server_and_halts_with_exit_3(
    era5_files: list[Path], tmp_path: Path
) -> None:
    request = tmp_path / "request.yaml"
    request.write_text(
        f"data_uri: [{', '.join(str(p) for p in era5_files)}]\n"
        f"cache_dir: {tmp_path}\ndeploy_mode: series\nmemory_limit: 300MB\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cache", "run", str(request)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zarr-parallel: done" in done.stdout
    # An ad hoc run never pauses: it halts with the recommendations and exit code 3 (here under
    # the session's API, which is quicker to reach than a new temporary one).
    halted = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cache",
            "run",
            str(request),
            "--set",
            "preprocessors=[{type: isel, time: [3, 57]}]",
            "--set",
            "cache_label=_cut",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert halted.returncode == 3, halted.stderr[-3000:]
    assert "Recommendations, best first" in halted.stderr


# ---------------------------------------------------------------------------------------------
# The phases of a deployment run


def _summary_figures(text: str) -> tuple[float, dict[str, float]]:
    """The wall time and the phases of a ``zp-summary-<cache>`` artifact's table."""
    wall = re.search(r"\| wall time \| ([\d.]+) s \|", text)
    assert wall, text
    phases = {}
    for name in PHASES:
        found = re.search(rf"\| {re.escape(name)} \| ([\d.]+) s \|", text)
        assert found, f"no {name} row in {text}"
        phases[name] = float(found[1])
    return float(wall[1]), phases


def test_deployment_runs_report_their_phases(
    server: dict[str, Any],
    deployed: dict[str, Any],
    worker: Path,
    era5_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("phases-runs")
    src = root / "src"
    src.mkdir()
    for f in era5_factory(n_files=2, steps_per_file=12, chunks=(6, 40, 72)):
        shutil.copy2(f, src / f.name)
    cache = root / "phases.zarr"
    request = {
        "data_uri": str(src / "*.nc"),
        "cache_store": str(cache),
        "deploy_mode": "series",
        "memory_limit": "300MB",
    }
    run_id = _create_run(server, "zarr-parallel-cache/cache", {"request": request})
    run = _wait(server, run_id, worker)
    assert run.state is not None and run.state.is_completed(), run.state
    text = str(_artifact(server, artifact_key("zp-summary", cache)).data)
    wall, phases = _summary_figures(text)
    assert abs(sum(phases.values()) - wall) <= 0.1 * len(phases) + 0.05, text
    assert phases["planning"] > 0 and phases["data"] > 0 and phases["initialise"] > 0, text
    assert "Start-up counts from the worker taking the run" in text
    # Start-up counts from the flow run's Pending state (the worker took it and started its
    # process), as Prefect records it, not from the flow function's start; the wall time ends
    # before the run's final state is reported.
    with _client(server) as client:
        states = client.read_flow_run_states(run_id)
    taken = max(s.timestamp for s in states if s.type == StateType.PENDING)
    assert run.start_time is not None and run.state.timestamp is not None
    assert phases["start-up"] >= (run.start_time - taken).total_seconds() - 0.2, (text, states)
    assert wall <= (run.state.timestamp - taken).total_seconds() + 0.2, (text, states)
    logs = _logs(server, run_id, until="wall time ")
    lines = [g.message for g in logs if g.message.startswith("wall time ")]
    assert lines and "since a worker took the run (start-up" in lines[0], lines

    # The re-cache deployment's run of the same cache (up to date) reports its phases too.
    recache_id = _create_run(server, "zarr-parallel-recache/recache-nightly", {"request": request})
    recache = _wait(server, recache_id, worker)
    assert recache.state is not None and recache.state.is_completed(), recache.state
    text = str(_artifact(server, artifact_key("zp-summary", cache)).data)
    assert "| re-cache | up_to_date: " in text, text
    wall, phases = _summary_figures(text)
    assert phases["planning"] > 0 and phases["data"] == 0, text
    assert abs(sum(phases.values()) - wall) <= 0.1 * len(phases) + 0.05, text


# ---------------------------------------------------------------------------------------------
# The deployment door's example (last: its run must not count among the module's runs above)


def test_deployment_example_runs_through_the_worker(
    server: dict[str, Any], runs: dict[str, Any], era5_factory: Any
) -> None:
    root = runs["root"] / "example"
    src = root / "src"
    src.mkdir(parents=True)
    for f in era5_factory(n_files=2, steps_per_file=24, chunks=(24, 40, 72)):
        shutil.copy2(f, src / f.name)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_API_URL": server["url"], "PREFECT_HOME": str(root / "prefect-home")}
    example = PROJECT / "examples" / "deployment.py"
    done = subprocess.run(
        [
            sys.executable,
            example,
            "--data-uri",
            src / "*.nc",
            "--cache-dir",
            root,
            "--timeout",
            "500",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert done.returncode == 0, (
        done.stdout[-2000:] + done.stderr[-3000:] + tail(runs["worker_log"])
    )
    assert "Completed" in done.stdout
    cache = xr.open_zarr(root / "era5_like_deployment.zarr").load()
    source = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf").load()
    for name in ("t2m", "d2m"):
        assert cache[name].dtype == source[name].dtype
        np.testing.assert_array_equal(cache[name].values, source[name].values)
