"""Declarative data transforms (the registry) and the tiled target, applied lazily with xarray."""
