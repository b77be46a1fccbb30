"""Entrypoint of the re-cache flow: ``python -m flows.recache``, ``recache_flow``."""

from zarr_parallel.orchestration.recache import main, recache_flow

__all__ = ["main", "recache_flow"]

if __name__ == "__main__":
    raise SystemExit(main())
