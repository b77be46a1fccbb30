"""Deploy zarr-parallel's Prefect deployments: ``zarr-parallel deploy [--policy PATH] [options]``.

Run with zarr-parallel installed and ``PREFECT_API_URL`` pointing at a Prefect server. It creates
the process work pool named in the deployments' ``prefect.yaml`` (or brings an existing one's job
template in line, saying so), then runs ``prefect deploy --all`` on that file from the project
folder, with ``ZARR_PARALLEL_PROJECT_DIR`` set to the project folder (the pull step's working
directory: flow runs start there, and relative paths in requests are relative to it) unless it
is set already. Extra arguments go to ``prefect deploy`` (e.g. ``--name cache`` instead of all).

``zarr-parallel deploy`` deploys the definitions shipped with the package
(``zarr_parallel/orchestration/prefect.yaml``, module entrypoints such as
``zarr_parallel.orchestration.cache:cache_flow``) with the current folder as the project folder;
``python -m deployments`` in a clone deploys the repository's ``deployments/prefect.yaml``
(entrypoints ``flows/*.py``) with the clone as the project folder.

The pool's job template is what keeps a flow run from choosing its own process: runs may not
set ``command``, ``env`` or ``working_dir`` (the template's variables refuse unknown keys, and
the API checks every run's job variables against them), and the template itself sets
``ZARR_PARALLEL_POLICY`` to the operator's policy file (``--policy PATH``, default
``/etc/zarr-parallel/policy.toml``; see :mod:`zarr_parallel.run.policy`).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from zarr_parallel.orchestration import COMMAND_ENVIRONMENT
from zarr_parallel.run.policy import DEFAULT_POLICY_PATH, POLICY_ENV

#: The deployments shipped with the package (module entrypoints; package data of the wheel).
PREFECT_FILE = Path(__file__).resolve().with_name("prefect.yaml")
#: Job variables a run could use to run code of its choosing on the worker.
LOCKED_VARIABLES = ("command", "env", "working_dir")


def pool_name(prefect_file: Path = PREFECT_FILE) -> str:
    """The work pool the deployments use (from ``definitions.work_pools.process``)."""
    config: dict[str, Any] = yaml.safe_load(prefect_file.read_text())
    return str(config["definitions"]["work_pools"]["process"]["name"])


def job_template(policy: str = DEFAULT_POLICY_PATH) -> dict[str, Any]:
    """The process pool's base job template with the variables a run could abuse removed.

    Prefect's process template lets every run set ``command`` and ``env`` (and the worker
    merges a run's ``env`` over the template's own), and ``working_dir`` (the flow process
    imports from it first). Without them in the variables, and with unknown variables refused
    (``additionalProperties: false``), the API turns such a run away; the fixed ``env`` of the
    job configuration names the policy file and holds
    :data:`~zarr_parallel.orchestration.COMMAND_ENVIRONMENT`.
    """
    from prefect.workers.process import ProcessWorker

    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    for name in LOCKED_VARIABLES:
        template["variables"]["properties"].pop(name, None)
        template["job_configuration"].pop(name, None)
    template["variables"]["additionalProperties"] = False
    # A flow run gets the environment a command's run sets for itself (no analytics, quiet
    # dask): importing the flows no longer sets it.
    template["job_configuration"]["env"] = {
        **COMMAND_ENVIRONMENT,
        POLICY_ENV: policy,
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    return template


def ensure_work_pool(name: str, policy: str = DEFAULT_POLICY_PATH) -> str:
    """Create the process work pool ``name``, or update its job template to :func:`job_template`.

    Returns what was done: ``"created"``, ``"updated"`` or ``"unchanged"``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    template = job_template(policy)
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            if pool.base_job_template == template:
                return "unchanged"
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            return "updated"
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    description="zarr-parallel flow runs as local processes",
                    base_job_template=template,
                )
            )
        except ObjectAlreadyExists:
            return "unchanged"
    return "created"


def deploy(
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    policy: str = DEFAULT_POLICY_PATH,
    prefect_file: Path = PREFECT_FILE,
    project: Path | None = None,
) -> int:
    """Create or update the pool and run ``prefect deploy``; returns its exit code.

    Args:
        extra: Arguments for ``prefect deploy`` (default ``--all``).
        env: Environment of ``prefect deploy`` (default this process's).
        policy: The operator's policy file, named in the pool's job template.
        prefect_file: The deployments' definitions.
        project: The project folder (default the current folder); ``prefect deploy`` runs there.
    """
    env = dict(os.environ if env is None else env)
    folder = (project or Path.cwd()).resolve()
    env.setdefault("ZARR_PARALLEL_PROJECT_DIR", str(folder))
    name = pool_name(prefect_file)
    done = ensure_work_pool(name, policy)
    if done != "unchanged":
        locked = ", ".join(LOCKED_VARIABLES)
        print(f"{done} the process work pool {name!r}: runs cannot set {locked}; policy {policy}")
    args = list(extra) or ["--all"]
    command = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(prefect_file),
        *args,
    ]
    return subprocess.call(command, cwd=folder, env=env)


def main(
    argv: Sequence[str] | None = None,
    prefect_file: Path = PREFECT_FILE,
    project: Path | None = None,
) -> int:
    """``zarr-parallel deploy [--policy PATH] [prefect deploy options]``; returns the exit code.

    ``python -m deployments`` (a clone) calls it with the repository's ``prefect_file`` and
    ``project``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    policy = DEFAULT_POLICY_PATH
    if "--policy" in args:
        i = args.index("--policy")
        if i + 1 >= len(args):
            print("error: --policy needs a path", file=sys.stderr)
            return 2
        policy = os.path.abspath(args[i + 1])
        del args[i : i + 2]
    return deploy(args, policy=policy, prefect_file=prefect_file, project=project)
