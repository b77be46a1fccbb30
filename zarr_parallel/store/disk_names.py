"""The names of a cache's files and folders on disk, in one place.

Layout (docs/design.md §2a): the final path ``P`` is a symlink to the current version
``P.versions/<n>-<fingerprint12>/``. Each version is a Zarr store holding its manifest in
``.zarr-parallel/`` (``plan.json`` once initialised, ``jobs/<id>.json`` per finished job,
``complete.json`` once checked). Publishing replaces the link atomically; the previous version
stays readable until then and is kept (``keep_versions``). Beside the versions, the versions
folder holds the records of runs and readers (the names below); the lock file is ``P.lock``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

MANIFEST_DIR = ".zarr-parallel"
#: In a version's manifest: the cache path the version was made for, written right after the
#: version's Zarr metadata (zarr refuses to create a store in a folder that holds anything).
OWNER_FILE = "owner.json"
#: In a version's manifest: the lock file and token of the run writing the version.
FENCE_FILE = "lock.json"
#: In the versions folder: the file whose flock serialises breakers of a stale lock.
LOCK_GUARD = ".lock-break"
#: ``P.versions/.pending/<version>.json``: the cache path a version is being made for, written
#: before zarr creates the version's folder and removed once the version records its owner. A
#: run killed among zarr's metadata writes leaves a folder with no manifest; this record lets the
#: next run prove it made it (and remove it as a stale staging version).
PENDING_DIR = ".pending"
#: Prefix a version is renamed to before it is removed (see
#: :func:`~zarr_parallel.store.publish.prune_versions`).
PRUNING_PREFIX = ".pruning-"
#: ``P.versions/.retired/<version>.json``: when each replaced version stopped being published.
RETIRED_DIR = ".retired"
#: Readers' leases: ``P.versions/.readers/<version>--<host>-<pid>-<random>.json``.
READERS_DIR = ".readers"
#: Suffixes of temporary files: Zarr's chunk writes (``.partial``), this package's (``.tmp``) and
#: re-cache's copies of chunk files where hard links are refused (``.copy``).
TEMPORARY_SUFFIXES = (".partial", ".tmp", ".copy")


def manifest_dir(version: Path) -> Path:
    """The manifest folder of a version."""
    return version / MANIFEST_DIR


@contextlib.contextmanager
def quiet_manifest() -> Iterator[None]:
    """Hide the zarr warnings every run would print at a version's group, and no others.

    The manifest folder inside each version (``.zarr-parallel``) is ours, not a Zarr node, so
    zarr warns whenever it lists the group; zarr warns that consolidated metadata is not
    part of the v3 specification (we consolidate on purpose, once, at the end; xarray and zarr
    read it); and, for ``compression: zlib`` in Zarr v3, that ``numcodecs.zlib`` is not in the
    specification each time such an array is opened (docs/request.md says it once, where the
    codec is chosen).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=f"Object at {re.escape(MANIFEST_DIR)} is not recognized",
            category=UserWarning,
        )
        warnings.filterwarnings(
            "ignore", message="Consolidated metadata is currently not part", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning
        )
        yield
