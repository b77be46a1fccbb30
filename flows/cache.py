"""Entrypoint of the cache flow in a clone: ``python -m flows.cache`` (the alias of
``zarr-parallel run|plan|verify``) and ``flows/cache.py:cache_flow``."""

from zarr_parallel.orchestration import set_command_environment

if __name__ == "__main__":
    # The command's process: its environment is set before Prefect is imported, and Prefect
    # is imported only when a flow runs (an up-to-date cache is answered without it).
    from zarr_parallel.run.phases import process_start

    set_command_environment()
    from zarr_parallel.orchestration.command import main

    raise SystemExit(main(started=process_start()))

from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.orchestration.command import main

__all__ = ["cache_flow", "main"]
