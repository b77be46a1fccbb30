"""The cache on disk: paths and ownership, versions, manifest records, zarr I/O, publish and
prune, the lock, readers."""
