"""Entrypoint of the re-cache flow in a clone: ``python -m flows.recache`` (the alias of
``zarr-parallel recache``) and ``flows/recache.py:recache_flow``."""

from zarr_parallel.orchestration import set_command_environment

if __name__ == "__main__":
    # The command's process: its environment is set before Prefect is imported.
    set_command_environment()

from zarr_parallel.orchestration.recache import main, recache_flow

__all__ = ["main", "recache_flow"]

if __name__ == "__main__":
    raise SystemExit(main())
