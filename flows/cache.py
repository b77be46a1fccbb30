"""Entrypoint of the cache flow in a clone: ``python -m flows.cache`` (the alias of
``zarr-parallel run|plan|verify``) and ``flows/cache.py:cache_flow``."""

from zarr_parallel.orchestration import set_command_environment

if __name__ == "__main__":
    # The command's process: its environment is set before Prefect is imported, and Prefect
    # is imported only when a flow runs (an up-to-date cache is answered without it).
    from zarr_parallel.run.phases import process_start

    set_command_environment()
    import sys

    from zarr_parallel.orchestration.temporary_api import TemporaryApi

    # Before the command's imports (a second of the stack): the server's start overlaps them.
    TemporaryApi.start_early(sys.argv[1:])
    from zarr_parallel.orchestration.command import main
    from zarr_parallel.orchestration.process_exit import exit_now

    exit_now(main(started=process_start()))  # without the interpreter's finalisation (0.5 s)

from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.orchestration.command import main

__all__ = ["cache_flow", "main"]
