"""An explicit ``dask_distributed`` run starts its local cluster while it plans
(orchestration/early_cluster.py, docs/design.md §2b): real commands, real dask clusters.

- the summary says when the cluster's start was asked for and which phase that fell in: planning,
  before the plan was made (not the initialisation that follows it);
- a run that ends without using it (up to date, a request refused while planning) closes it at
  once: no worker process outlives the command;
- a cluster started ahead that does not fit the plan is closed and the plan's own started;
- ``auto``, ``series``, SLURM and an external scheduler start nothing ahead.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.core_support import assert_cache_equals_files, changed_env
from zarr_parallel.api import ZarrParallelAssembler
from zarr_parallel.orchestration.early_cluster import starts_early
from zarr_parallel.request.model import build_request

# A hang must fail the test, not the CI run.
pytestmark = pytest.mark.timeout(900)

#: The environment variable that marks the processes a test's command started.
MARK = "ZP_TEST_EARLY_CLUSTER"
STARTED = re.compile(r"starting (\d+) local workers while the request is planned")


def _request(tmp_path: Path, files: list[Path], **extra: Any) -> Path:
    request = tmp_path / "request.yaml"
    fields = {
        "data_uri": [str(p) for p in files],
        "cache_store": str(tmp_path / "cache.zarr"),
        "chunks": {"time": 6, "latitude": 73, "longitude": 144},
        "memory_limit": "1GB",
        "deploy_mode": "dask_distributed",
        "simultaneous_worker_limit": 2,
        "log_level": 1,  # the cluster's start and close are info lines
        **extra,
    }
    request.write_text(yaml.safe_dump(fields))
    return request


def _run(request: Path, mark: str) -> subprocess.CompletedProcess[str]:
    """``python -m flows.cache run REQUEST``, its processes marked with ``mark``."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cache", "run", str(request)],
        capture_output=True,
        text=True,
        env=changed_env(**{MARK: mark}),
        timeout=600,
    )


def _left_over(mark: str) -> list[str]:
    """Live processes (not zombies) started by a command marked ``mark``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARK) == mark:
                found.append(" ".join(proc.info["cmdline"] or []))
        except psutil.Error:
            continue
    return found


def _files(era5_factory: Any) -> list[Path]:
    return list(era5_factory(n_files=2, steps_per_file=12, chunks=(6, 73, 144), seed=31))


def test_the_cluster_starts_while_the_command_plans_and_an_up_to_date_run_closes_it(
    tmp_path: Path, era5_factory: Any
) -> None:
    files = _files(era5_factory)
    request = _request(tmp_path, files)
    mark = uuid.uuid4().hex

    new = _run(request, mark)
    assert new.returncode == 0, new.stderr[-3000:]
    assert "zarr-parallel: done" in new.stdout
    assert STARTED.search(new.stderr), new.stderr[-3000:]
    # The flow took the cluster started ahead (it fits the plan): no second one.
    assert "do not fit the plan" not in new.stderr
    assert re.search(r"ran on\s+2 dask_distributed worker\(s\)", new.stdout), new.stdout
    # Its start was asked for during the first planning, before the plan existed (the run's
    # timeline, not a race: without the early start it is asked for during initialise).
    assert re.search(r"cluster start\s+[\d.]+ s into the run, during planning", new.stdout), (
        new.stdout
    )
    assert_cache_equals_files(tmp_path / "cache.zarr", files)
    assert _left_over(mark) == []

    again = _run(request, mark)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "zarr-parallel: up to date" in again.stdout
    assert "flow run            none: the cache was found up to date before it" in again.stdout
    assert STARTED.search(again.stderr), again.stderr[-3000:]
    assert "closing the workers started during planning (no data to write)" in again.stderr
    assert "cluster start" not in again.stdout  # no cluster ran
    assert _left_over(mark) == []


def test_a_request_refused_while_planning_closes_the_cluster_started_ahead(
    tmp_path: Path, era5_factory: Any
) -> None:
    # Valid as a request; refused while planning: the cache path holds something not ours.
    foreign = tmp_path / "cache.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    request = _request(tmp_path, _files(era5_factory))
    mark = uuid.uuid4().hex
    proc = _run(request, mark)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "invalid request:" in proc.stderr
    assert STARTED.search(proc.stderr), proc.stderr[-3000:]
    assert "closing the workers started during planning (the run did not use it)" in proc.stderr
    assert _left_over(mark) == []
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_run_halted_on_recommendations_closes_the_cluster_before_its_flow_halts(
    tmp_path: Path, era5_factory: Any
) -> None:
    # The selection cuts the source's chunks of 6 steps: the plan halts (recommend_changes halt).
    cut = [{"type": "isel", "time": [3, 20]}]
    request = _request(tmp_path, _files(era5_factory), preprocessors=cut)
    mark = uuid.uuid4().hex
    proc = _run(request, mark)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Recommendations, best first" in proc.stderr
    assert STARTED.search(proc.stderr), proc.stderr[-3000:]
    # Closed as soon as the plan said it halts, before the flow run that halts on it.
    closed = proc.stderr.index("closing the workers started during planning (the plan halts)")
    assert closed < proc.stderr.index("Beginning flow run"), proc.stderr[-3000:]
    assert _left_over(mark) == []
    assert not (tmp_path / "cache.zarr").exists()


def test_the_python_api_times_the_cluster_start_against_planning(
    tmp_path: Path, era5_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # inherited by the worker processes this run starts
    files = _files(era5_factory)
    zp = ZarrParallelAssembler([str(p) for p in files], chunks={"time": 6})
    result = zp.cache(
        str(tmp_path / "cache.zarr"),
        memory_limit="1GB",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
    )
    summary = result.summary
    timeline = summary["timeline"]
    first = [name for name, _ in timeline].index("planning")
    planning_began, planning_ended = timeline[first][1], timeline[first + 1][1]
    # Asked for once the first planning began, and before it ended (the plan came after).
    assert planning_began <= summary["cluster_requested_at"] < planning_ended, summary
    assert summary["cluster_requested_during"] == "planning"
    assert summary["workers"] == 2
    assert_cache_equals_files(result.path, files)
    assert _left_over(mark) == []


def test_a_cluster_that_does_not_fit_the_plan_is_replaced(
    tmp_path: Path, era5_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    files = _files(era5_factory)
    # One job (one variable, one chunk): the plan wants one worker, not the two started ahead.
    zp = ZarrParallelAssembler(
        [str(p) for p in files],
        variables=["t2m"],
        chunks={"time": -1, "latitude": -1, "longitude": -1},
        log_level=1,  # the cluster's start and close are info lines
    )
    # The module's own lines, whichever console handler Prefect set up meanwhile.
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("zarr_parallel.orchestration.early_cluster")
    logger.addHandler(handler)
    try:
        result = zp.cache(
            str(tmp_path / "cache.zarr"),
            memory_limit="1GB",
            deploy_mode="dask_distributed",
            simultaneous_worker_limit=2,
        )
    finally:
        logger.removeHandler(handler)
    assert result.summary["jobs"] == 1 and result.summary["workers"] == 1
    said = "\n".join(lines)
    assert STARTED.search(said) and "do not fit the plan (1 workers" in said, said
    # The plan's own cluster started during initialise, after the plan.
    assert result.summary["cluster_requested_during"] == "initialise"
    assert_cache_equals_files(result.path, files, names=("t2m",))
    assert _left_over(mark) == []


@pytest.mark.parametrize(
    ("fields", "early"),
    [
        ({"deploy_mode": "dask_distributed"}, True),
        ({"deploy_mode": "auto"}, False),  # auto chooses by the plan
        ({"deploy_mode": "series"}, False),
        ({"deploy_mode": "SLURM"}, False),  # SLURM opens after the store is initialised
        ({"deploy_mode": "dask_distributed", "scheduler_address": "tcp://127.0.0.1:8786"}, False),
    ],
)
def test_only_an_explicit_local_cluster_starts_ahead(fields: dict[str, Any], early: bool) -> None:
    req = build_request(data_uri=__file__, cache_store="/tmp/x.zarr", **fields)
    assert starts_early(req) is early
