"""Entrypoint of the cache flow: ``python -m flows.cache`` and ``flows/cache.py:cache_flow``."""

from zarr_parallel.orchestration.cache import cache_flow, main

__all__ = ["cache_flow", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
