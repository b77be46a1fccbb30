"""Flow entrypoints of a clone: ``deployments/prefect.yaml`` and ``python -m flows.cache`` name
them (``zarr-parallel`` is the installed command).

The flows themselves live in :mod:`zarr_parallel.orchestration`; this folder is not part of the
wheel.
"""
