"""The workers' prewarm plugin: what a joining worker has ready before its first task."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from zarr_parallel.orchestration.runners import worker_environment, worker_sizing
from zarr_parallel.request.model import build_request


@pytest.fixture
def silent_api() -> Iterator[tuple[str, list[float]]]:
    """A URL where nothing answers, and the times of every connection made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    connections: list[float] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(time.time())
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/api", connections
    finally:
        stop.set()
        thread.join()
        server.close()


@contextmanager
def prewarmed_worker(
    era5_files: list[Path], api_url: str | None, with_source: bool
) -> Iterator[Any]:
    """A client of a one-worker local cluster whose worker joined with the prewarm plugin
    (given the run's source when ``with_source``), as a run's cluster starts."""
    from distributed import Client

    from zarr_parallel.orchestration.cluster import register_prewarm
    from zarr_parallel.orchestration.local_cluster import local_cluster

    req = build_request(
        data_uri=[str(f) for f in era5_files],
        cache_store="/tmp/x.zarr",
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=1,
    )
    sizing = worker_sizing(req, max_job_estimate=10**8, jobs=1)
    with local_cluster(sizing, worker_environment(req, api_url, 1), 0) as cluster:
        register_prewarm(cluster.scheduler_address, req.source_json() if with_source else None)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            yield client


def test_a_local_workers_job_process_opens_the_runs_source_as_it_joins(
    era5_files: list[Path],
) -> None:
    """The prewarm plugin hands the run's source to each joining worker's job process, which
    opens it (holds its files) before any task is sent."""

    def held(dask_worker: Any) -> list[str]:
        children = psutil.Process().children()
        return sorted({f.path for c in children for f in c.open_files() if f.path.endswith(".nc")})

    with prewarmed_worker(era5_files, None, with_source=True) as client:
        expected = sorted(str(f.resolve()) for f in era5_files)
        deadline = time.monotonic() + 120
        while (seen := next(iter(client.run(held).values()))) != expected:
            assert time.monotonic() < deadline, f"source files held: {seen}"
            time.sleep(0.2)


def test_a_joining_worker_has_the_write_flow_and_a_warm_task_engine_without_calling_the_api(
    era5_files: list[Path], silent_api: tuple[str, list[float]]
) -> None:
    """Unpickling a first task imports the write flow's module, and a first task run rebuilds
    Prefect's context models and loads its collections: the plugin does both as the worker
    joins, and sends nothing to the API (no task run is created)."""

    def ready(dask_worker: Any) -> dict[str, bool]:
        # Defined here: dask ships it by value (the test module is not importable by workers).
        from prefect._internal.plugins import collections
        from prefect.context import FlowRunContext

        return {
            "write flow": "zarr_parallel.orchestration.write_flow" in sys.modules,
            "context models": FlowRunContext.__pydantic_complete__,
            "collections": collections._collections is not None,
        }

    url, connections = silent_api
    with prewarmed_worker(era5_files, url, with_source=False) as client:
        found = next(iter(client.run(ready).values()))
    assert found == {"write flow": True, "context models": True, "collections": True}
    assert connections == []


def test_without_an_api_url_the_task_engine_is_not_warmed_and_no_server_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker of the user's own cluster may have no API URL: Prefect's client would then
    start a temporary API server in it; the warm-up is skipped instead."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from zarr_parallel.orchestration import prewarm

    hydrated: list[object] = []
    monkeypatch.setattr("prefect.context.hydrated_context", lambda *a: hydrated.append(a))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with temporary_settings(updates={PREFECT_API_URL: None}):
        prewarm._warm_task_engine()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert hydrated == []
    assert after <= before
