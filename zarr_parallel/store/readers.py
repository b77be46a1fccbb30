"""Reading a cache safely while runs publish and prune: :func:`open_cache`.

The final path ``P`` is a link that a publish switches to a new version. A dataset opened
through ``P`` with plain ``xr.open_zarr(P)`` keeps the metadata and coordinates it read at open,
but each later chunk read goes through ``P`` again, so after a publish it reads the *new*
version's chunks under the *old* metadata (and after pruning, fill values). :func:`open_cache`
instead resolves the link once and opens that version folder, so every read comes from the one
version that was current at open; while the dataset is open:

- a *lease* file in ``P.versions/.readers/`` asks runs not to prune that version (best effort:
  a reader without write access to the versions folder reads without one);
- runs never prune a version replaced less than ``min_version_age`` ago (default one hour),
  whether or not a lease could be written;
- a chunk file that is missing raises :class:`~zarr_parallel.errors.VersionUnavailable`
  instead of reading as the fill value: zarr-parallel writes every chunk of a version (also
  chunks holding only the fill value), so a missing one always means the version was pruned
  or damaged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import psutil
import xarray as xr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore

from zarr_parallel.errors import VersionUnavailable
from zarr_parallel.store.disk_names import READERS_DIR
from zarr_parallel.store.lock import host_name, process_alive
from zarr_parallel.store.manifest import is_complete

logger = logging.getLogger(__name__)

#: A lease from another host (whose process cannot be checked from here) counts this long.
LEASE_MAX_AGE = 24 * 3600.0

#: Keys that may be missing in a complete version: Zarr metadata zarr or xarray probe for.
_OPTIONAL_KEYS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


class StrictStore(LocalStore):
    """A read-only local store that raises for a missing chunk instead of returning nothing.

    Zarr reads a missing chunk as the array's fill value (NaN for floats). A version written by
    zarr-parallel has every chunk file, so a missing one means the version was removed while
    open: that must fail loudly, never read as data.
    """

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """The value at ``key``; raises :class:`VersionUnavailable` for a missing chunk."""
        value = await super().get(key, prototype, byte_range)
        if value is None and key.rsplit("/", 1)[-1] not in _OPTIONAL_KEYS:
            self._gone(key)
        return value

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Any
    ) -> list[Buffer | None]:
        """Byte ranges of several keys; raises for a missing chunk as :meth:`get` does."""
        ranges = list(key_ranges)
        values = await super().get_partial_values(prototype, ranges)
        for (key, _), value in zip(ranges, values, strict=True):
            if value is None and key.rsplit("/", 1)[-1] not in _OPTIONAL_KEYS:
                self._gone(key)
        return values

    def _gone(self, key: str) -> None:
        root = Path(str(self.root))
        state = "was removed" if not root.exists() else f"has no chunk file {key}"
        raise VersionUnavailable(
            f"the cache version {root} {state} while it was open (pruned by a later run, or "
            "damaged); no fill values were returned. Open the cache again with open_cache to "
            "read the current version"
        )


def open_cache(path: str | os.PathLike[str], **xarray_kwargs: Any) -> xr.Dataset:
    """Open the version of a cache that is current now, and keep reading only that version.

    Parameters
    ----------
    path
        The cache path (``cache_store``, the link runs publish), or a version folder.
    **xarray_kwargs
        Passed to :func:`xarray.open_zarr` (e.g. ``chunks``, ``decode_times``).

    Returns
    -------
    xarray.Dataset
        Lazy, reading from the version folder the link named at the moment of the call. The
        version is leased while the dataset (or anything read from it) is alive; ``.close()``
        ends the lease.

    Raises
    ------
    VersionUnavailable
        When the path is not a published cache, the version is missing or incomplete, or (on a
        later read) its chunks were removed.
    """
    final = Path(os.path.abspath(os.fspath(path)))
    # Resolve the link once: every read below goes to this folder, whatever is published later.
    version = Path(os.path.realpath(final))
    if not version.is_dir() or not is_complete(version):
        what = "does not exist" if not version.exists() else "is not a complete cache version"
        raise VersionUnavailable(
            f"{final} → {version} {what}. Check the path; a version pruned or still being "
            "written cannot be read"
        )
    lease = _take_lease(version)
    store = StrictStore(version, read_only=True)
    try:
        ds: xr.Dataset = xr.open_zarr(store, **xarray_kwargs)
    except BaseException:
        _drop_lease(lease)
        raise
    if lease is not None:
        # The store lives as long as anything that can still read chunks (the dataset, or a
        # variable or selection taken from it): the lease ends with it, or at close().
        finalizer = weakref.finalize(store, _drop_lease, lease)
        previous = ds._close

        def close() -> None:
            finalizer()
            if previous is not None:
                previous()

        ds.set_close(close)
    return ds


def _take_lease(version: Path) -> Path | None:
    """Write this reader's lease on ``version``; None when the folder is not writable."""
    folder = version.parent / READERS_DIR
    host = host_name()
    lease = folder / f"{version.name}--{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    content = {
        "version": version.name,
        "host": host,
        "pid": os.getpid(),
        "pid_start": psutil.Process().create_time(),
        "time": time.time(),
    }
    try:
        folder.mkdir(exist_ok=True)
        tmp = lease.with_name(f".{lease.name}.tmp")
        tmp.write_text(json.dumps(content))
        os.replace(tmp, lease)
    except OSError as e:
        logger.info(
            "reading %s without a lease (%s): it stays readable for min_version_age after a "
            "later publish replaces it",
            version,
            e.strerror or e,
        )
        return None
    return lease


def _drop_lease(lease: Path | None) -> None:
    if lease is not None:
        with contextlib.suppress(OSError):
            lease.unlink()


def live_lease(lease: Path) -> str | None:
    """The version a lease file holds, or None when its reader is gone (the file is removed).

    A lease from this host holds while its process runs (the same process: its start time is
    checked, so a reused pid does not count); from another host it holds for
    :data:`LEASE_MAX_AGE` seconds.
    """
    try:
        data = json.loads(lease.read_text())
        version = str(data["version"])
        host, pid, started = str(data["host"]), int(data["pid"]), float(data["pid_start"])
        taken = float(data["time"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Unreadable: honoured by its age alone, as another host's lease is.
        try:
            age = time.time() - lease.stat().st_mtime
        except OSError:
            return None
        return lease.name.split("--")[0] if age < LEASE_MAX_AGE else None
    local = host == host_name()
    alive = process_alive(pid, started) if local else time.time() - taken < LEASE_MAX_AGE
    if not alive:
        logger.info("removing the lease %s of a reader that is gone", lease.name)
        _drop_lease(lease)
        return None
    return version
