"""Session-wide fixtures: one ERA5-like dataset factory, one Prefect API per test session, the
fault-injection plug-ins, the local SLURM and the deploy-mode reference cache.

Fixtures that one room's tests alone use live in that room's ``tests/<room>/conftest.py``
(e.g. tests/run/conftest.py); those of one test module stay in the module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

from zarr_parallel.examples import make_era5_like

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[str]:
    """One temporary Prefect API for the whole session, exported to subprocesses.

    Dask workers and CLI subprocesses inherit ``PREFECT_API_URL`` and so never start a
    temporary server of their own (docs/design.md §6).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        url = str(PREFECT_API_URL.value())
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def era5_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Make (and cache per session) ERA5-like netCDF4 datasets: ``era5_factory(**kwargs)``.

    Keyword arguments are those of :func:`zarr_parallel.examples.make_era5_like`; the same
    arguments give the same files.
    """
    made: dict[str, list[Path]] = {}

    def make(**kwargs: Any) -> list[Path]:
        key = repr(sorted(kwargs.items()))
        if key not in made:
            folder = tmp_path_factory.mktemp("era5")
            made[key] = make_era5_like(folder, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def era5_files(era5_factory: Any) -> list[Path]:
    """Three files of 24, 24 and 12 hourly steps, HDF5 chunks (6, 40, 72), 73 × 144 grid."""
    return era5_factory(n_files=3, steps_per_file=[24, 24, 12], chunks=(6, 40, 72))


# -- [parallel] fixtures: fault-injection plug-ins and the local SLURM --

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def reference(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deploy-mode tests' request (``deploy_helpers.run_cache``) cached in series mode,
    without faults: what every mode and every faulty run must equal byte for byte."""
    from deploy_helpers import run_cache

    store = tmp_path_factory.mktemp("reference") / "reference.zarr"
    run_cache(era5_files, store, deploy_mode="series")
    return store


@pytest.fixture(scope="session")
def fault_plugins() -> Path:
    """Make the test-only transform plug-ins (tests/plugins) visible to every process.

    They are found through their entry points, as a user's plug-in would be: on ``sys.path``
    here and on ``PYTHONPATH`` for workers, SLURM jobs and job processes started from now on.
    """
    import sys

    from zarr_parallel.run import job_process as execution
    from zarr_parallel.transforms import registry as transforms

    path = str(PLUGINS)
    if path not in sys.path:
        sys.path.insert(0, path)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if path not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([path, *parts])
    transforms._plugins.cache_clear()
    execution.shutdown()  # job processes started before this would not see the plug-ins
    return PLUGINS


@pytest.fixture(scope="session")
def slurm() -> str:
    """The local single-node SLURM (``scripts/slurm-local.sh start``); fails under CI=true."""
    import shutil
    import subprocess

    script = Path(__file__).parents[1] / "scripts" / "slurm-local.sh"
    ok = shutil.which("sbatch") is not None and (
        subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    )
    if not ok:
        message = f"SLURM is not running here: run `bash {script} start` (as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    # The tests count on an empty node: jobs a killed earlier test run left in this local queue
    # (its dask workers, waiting for a scheduler that is gone) would hold its cores.
    def queued() -> list[str]:
        return subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True
        ).stdout.split()

    if leftover := queued():
        subprocess.run(["scancel", *leftover], check=False)
        deadline = time.monotonic() + 60
        while queued() and time.monotonic() < deadline:
            time.sleep(0.5)
    return "localhost"
