"""Flow entrypoints of a clone: ``deployments/prefect.yaml`` and ``python -m flows.cache`` name
them.

The flows themselves live in :mod:`zarr_parallel.orchestration`.
"""
