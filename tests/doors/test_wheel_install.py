"""A wheel install deploys and runs on its own: no clone, no ``flows/`` or ``deployments/`` folder.

The wheel built from this checkout is installed into a folder of its own (a pure-Python wheel is
installed by unpacking it) that comes first on ``PYTHONPATH``. From an empty project folder,
``zarr-parallel deploy`` creates the work pool and the deployments of the packaged
``prefect.yaml`` on a real ``prefect server``, and a real worker runs the cache deployment from
the installed package: the cache equals the source.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from prefect.client.orchestration import SyncPrefectClient

from server_support import base_env, prefect_server, prefect_worker, tail, write_policy

pytestmark = pytest.mark.prefect_server

RUN_SECONDS = 600


@pytest.fixture(scope="module")
def site(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed (unpacked) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(built_wheel) as zf:
        zf.extractall(target)
    return target


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    settings = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    with prefect_server(tmp_path_factory.mktemp("wheel-server"), settings) as found:
        yield found


def _env(server: dict[str, Any], site: Path, name: str) -> dict[str, str]:
    env = base_env(server["home"] / name)
    env["PREFECT_API_URL"] = server["url"]
    env["PYTHONPATH"] = str(site)
    return env


def test_the_installed_package_is_the_wheels(site: Path, tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "home"), "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import zarr_parallel.orchestration.cache as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site)), out.stdout


def test_deploy_and_run_from_the_wheel(
    site: Path,
    server: dict[str, Any],
    era5_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = tmp_path_factory.mktemp("project")  # an empty folder: no clone's files anywhere
    policy = write_policy(project / "policy.toml", tmp_path_factory.getbasetemp())
    deployed = subprocess.run(
        [sys.executable, "-m", "zarr_parallel.cli", "deploy", "--policy", str(policy)],
        cwd=project,
        env=_env(server, site, "deploy"),
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with SyncPrefectClient(server["url"]) as client:
        entrypoints = {d.name: d.entrypoint for d in client.read_deployments()}
    assert entrypoints["cache"] == "zarr_parallel.orchestration.cache:cache_flow"
    assert entrypoints["recache-nightly"] == "zarr_parallel.orchestration.recache:recache_flow"

    files = list(era5_factory(n_files=2, steps_per_file=12, chunks=(6, 40, 72)))
    cache = tmp_path_factory.mktemp("wheel-run") / "cache.zarr"
    request = {
        "data_uri": [str(f) for f in files],
        "cache_store": str(cache),
        "deploy_mode": "series",
        "memory_limit": "300MB",
    }
    worker_env = {"PYTHONPATH": str(site)}
    with prefect_worker(server, env=worker_env) as log, SyncPrefectClient(server["url"]) as client:
        dep = client.read_deployment_by_name("zarr-parallel-cache/cache")
        run_id = client.create_flow_run_from_deployment(dep.id, parameters={"request": request}).id
        deadline = time.monotonic() + RUN_SECONDS
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                break
            assert time.monotonic() < deadline, f"run still {state}:\n{tail(log)}"
            time.sleep(1)
        assert state.is_completed(), f"{state}:\n{tail(log)}"
    with xr.open_mfdataset(files, engine="h5netcdf") as src, xr.open_zarr(cache) as got:
        for name in src.data_vars:
            assert got[name].dtype == src[name].dtype
            np.testing.assert_array_equal(got[name].values, src[name].values)
