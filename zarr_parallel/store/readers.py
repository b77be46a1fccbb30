"""Reading a cache safely while runs publish and prune: :func:`open_cache`.

The final path ``P`` is a link that a publish switches to a new version. A dataset opened
through ``P`` with plain ``xr.open_zarr(P)`` keeps the metadata and coordinates it read at open,
but each later chunk read goes through ``P`` again, so after a publish it reads the *new*
version's chunks under the *old* metadata (and after pruning, fill values). :func:`open_cache`
instead resolves the link once and opens that version folder, so every read comes from the one
version that was current at open; while the dataset is open:

- a *lease* file in ``P.versions/.readers/`` asks runs not to prune that version (best effort:
  a reader without write access to the versions folder reads without one). A thread of the
  reader's process refreshes the lease's modification time every :data:`LEASE_HEARTBEAT_SECONDS`;
  a lease of this host counts while its process runs (paused or not), and one of another host
  while that heartbeat is fresh (:data:`LEASE_STALE_AFTER`);
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
import threading
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

#: How often a reader's process refreshes the modification time of its leases.
LEASE_HEARTBEAT_SECONDS = 60.0
#: A lease of another host whose heartbeat is older than this is a reader gone (five missed
#: beats: a remote process paused or a machine suspended that long reads on under
#: ``min_version_age`` alone; this host's readers are judged by their process instead). Before
#: heartbeats, a lease from another host counted for a fixed 24 hours, dead or alive.
LEASE_STALE_AFTER = 5 * LEASE_HEARTBEAT_SECONDS

#: This process's leases, refreshed by one daemon thread (started with the first lease).
_LEASES: set[Path] = set()
_LEASES_LOCK = threading.Lock()
_wake = threading.Event()
_beating: list[threading.Thread] = []

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
    _keep_beating(lease)
    return lease


def _drop_lease(lease: Path | None) -> None:
    if lease is not None:
        with _LEASES_LOCK:
            _LEASES.discard(lease)
        with contextlib.suppress(OSError):
            lease.unlink()


def _keep_beating(lease: Path) -> None:
    """Refresh ``lease`` from now on (until dropped), starting the heartbeat thread if needed."""
    with _LEASES_LOCK:
        _LEASES.add(lease)
        if not any(t.is_alive() for t in _beating):
            thread = threading.Thread(target=_beat, name="zarr-parallel-leases", daemon=True)
            _beating[:] = [thread]
            thread.start()
    _wake.set()  # a new period takes effect at once (tests shorten it)


def _beat() -> None:
    while True:
        _wake.wait(LEASE_HEARTBEAT_SECONDS)
        _wake.clear()
        refresh_leases()


def refresh_leases() -> int:
    """Refresh the modification time of this process's leases; returns how many were refreshed.

    Best effort: a lease that cannot be touched (removed, or access lost) stays as it is, and
    its version is then protected by ``min_version_age`` alone once the lease looks stale.
    """
    with _LEASES_LOCK:
        leases = list(_LEASES)
    done = 0
    for lease in leases:
        try:
            os.utime(lease)
            done += 1
        except OSError as e:
            logger.debug("could not refresh the lease %s: %s", lease, e)
    return done


def _forget_in_child() -> None:
    # A forked child has no heartbeat thread and holds none of its parent's leases.
    _LEASES.clear()
    _beating.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def live_lease(lease: Path) -> str | None:
    """The version a lease file holds, or None when its reader is gone (the file is removed).

    A lease from this host holds while its process runs (the same process: its start time is
    checked, so a reused pid does not count), however long it was paused; one from another host
    while its heartbeat (the file's modification time) is younger than :data:`LEASE_STALE_AFTER`.
    """
    try:
        age = time.time() - lease.stat().st_mtime
        data = json.loads(lease.read_text())
        version = str(data["version"])
        host, pid, started = str(data["host"]), int(data["pid"]), float(data["pid_start"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Unreadable: honoured by its heartbeat alone, as any lease is.
        try:
            age = time.time() - lease.stat().st_mtime
        except OSError:
            return None
        return lease.name.split("--")[0] if age < LEASE_STALE_AFTER else None
    # This host's reader holds its lease while its process lives, however old the heartbeat:
    # a reader paused (SIGSTOP, a suspended session) longer than LEASE_STALE_AFTER still has
    # the dataset open. Another host's reader can only be judged by its heartbeat.
    alive = process_alive(pid, started) if host == host_name() else age < LEASE_STALE_AFTER
    if not alive:
        logger.info("removing the lease %s of a reader that is gone", lease.name)
        _drop_lease(lease)
        return None
    return version
