"""Prefect flows, tasks and runners that orchestrate :mod:`zarr_parallel` (no chunk arithmetic)."""

import os

# No network here and none needed: keep the temporary server from phoning home, and keep dask's
# info logs quiet unless a run asks for them (DESIGN §6). Set before prefect/distributed import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
# A temporary API on a fresh PREFECT_HOME migrates its database first: on a busy machine that
# takes longer than Prefect's 20 s default, and the run fails before it starts.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
