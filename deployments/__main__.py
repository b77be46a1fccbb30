"""Deploy zarr-parallel's Prefect deployments: ``python -m deployments [prefect deploy options]``.

Run from anywhere with the project's environment active and ``PREFECT_API_URL`` pointing at a
Prefect server. It creates the process work pool named in ``deployments/prefect.yaml`` if the
server has none, then runs ``prefect deploy --all`` on that file from the project folder, with
``ZARR_PARALLEL_PROJECT_DIR`` set to the project folder (the pull step's working directory)
unless it is set already. Extra arguments go to ``prefect deploy`` (e.g. ``--name cache``
instead of all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT / "deployments" / "prefect.yaml"


def pool_name(prefect_file: Path = PREFECT_FILE) -> str:
    """The work pool the deployments use (from ``definitions.work_pools.process``)."""
    config: dict[str, Any] = yaml.safe_load(prefect_file.read_text())
    return str(config["definitions"]["work_pools"]["process"]["name"])


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    description="zarr-parallel flow runs as local processes",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:
            return False
    return True


def deploy(extra: Sequence[str] = (), env: dict[str, str] | None = None) -> int:
    """Create the pool if needed and run ``prefect deploy``; returns its exit code."""
    env = dict(os.environ if env is None else env)
    env.setdefault("ZARR_PARALLEL_PROJECT_DIR", str(PROJECT))
    name = pool_name()
    if ensure_work_pool(name):
        print(f"created the process work pool {name!r}")
    args = list(extra) or ["--all"]
    command = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(PREFECT_FILE),
        *args,
    ]
    return subprocess.call(command, cwd=PROJECT, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    return deploy(args)


if __name__ == "__main__":
    sys.exit(main())
