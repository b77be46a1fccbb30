"""Entrypoint of the re-cache flow in a clone: ``python -m flows.recache`` (the alias of
``zarr-parallel recache``) and ``flows/recache.py:recache_flow``."""

from zarr_parallel.orchestration import set_command_environment

if __name__ == "__main__":
    # The command's process: its environment is set before Prefect is imported, and Prefect
    # is imported only when a flow runs (an up-to-date cache is answered without it).
    from zarr_parallel.run.phases import process_start

    set_command_environment()
    from zarr_parallel.orchestration.recache_command import main

    raise SystemExit(main(started=process_start()))

from zarr_parallel.orchestration.recache import recache_flow
from zarr_parallel.orchestration.recache_command import main

__all__ = ["main", "recache_flow"]
