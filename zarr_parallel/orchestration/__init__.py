"""Prefect flows, tasks and runners that orchestrate :mod:`zarr_parallel` (no chunk arithmetic).

Importing this package changes nothing in the process: the environment a command's run wants
(:data:`COMMAND_ENVIRONMENT`) is set by the command itself (:func:`set_command_environment`,
called by ``zarr-parallel`` and the clone's ``python -m flows.cache`` before Prefect is imported).
"""

from __future__ import annotations

import os

#: The environment of a command-line run, each only where the user has not set it. No network
#: here and none needed: keep the temporary Prefect server and client from phoning home, and keep
#: dask's info logs quiet unless a run asks for them (read when distributed is imported). A
#: temporary API on a fresh PREFECT_HOME migrates its database first: on a busy machine that takes
#: longer than Prefect's 20 s default, and the run fails before it starts.
COMMAND_ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def set_command_environment() -> None:
    """Set :data:`COMMAND_ENVIRONMENT` in this process where the user has not (a command's entry
    only: a library import never changes the user's environment). Call it before Prefect and
    distributed are imported."""
    for name, value in COMMAND_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
