"""Entrypoint of the cache flow in a clone: ``python -m flows.cache`` (the alias of
``zarr-parallel run|plan|verify``) and ``flows/cache.py:cache_flow``."""

from zarr_parallel.orchestration import set_command_environment

if __name__ == "__main__":
    # The command's process: its environment is set before Prefect is imported.
    set_command_environment()

from zarr_parallel.orchestration.cache import cache_flow, main

__all__ = ["cache_flow", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
