"""The cache lock ``P.lock``: one run at a time per cache, and safe recovery from dead runs.

The lock file holds who owns it (host, pid, the process's start time, when the run started and a
random token). It appears atomically, complete, through ``os.link`` of a fully written temporary
file, so two runs can never both create it and nobody ever reads a half-written lock. While a run
holds it, a heartbeat thread refreshes the file's modification time every
:data:`HEARTBEAT_SECONDS`.

A lock whose owner is gone is *stale*:

- on this host, the owner's pid no longer runs, or now runs another process (a different start
  time, i.e. the pid was reused), or is a zombie: the lock is provably dead and is broken
  automatically;
- on another host nothing can be proved, so the lock is broken only when asked
  (``break_lock=True``) *and* its heartbeat is older than :data:`STALE_AFTER_SECONDS`.

Breaking is serialised by an ``flock`` on a side file and checked by renaming the stale lock aside
and comparing tokens, so two runs breaking the same stale lock at once cannot both win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from zarr_parallel.errors import CacheLocked, RunFailed
from zarr_parallel.store.files import fsync_dir

logger = logging.getLogger(__name__)

#: How often the holder refreshes the lock's modification time.
HEARTBEAT_SECONDS = 30.0
#: A lock from another host whose heartbeat is older than this may be broken with break_lock.
STALE_AFTER_SECONDS = 600.0
#: Tries to take the lock before giving up (each try either takes it, breaks a dead one, or fails).
_ATTEMPTS = 20
#: How long a breaker or a release waits for the breakers' guard before going on with the
#: rename checks alone: a process paused (SIGSTOP, a suspended VM) while holding the guard
#: must not block every other run's break for ever.
_GUARD_WAIT_S = 10.0


def _flock_within(fd: int, guard: Path, seconds: float) -> None:
    """Take an exclusive flock on ``fd`` within ``seconds``, else go on without it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                logger.warning(
                    "the guard %s stayed taken for %.0f s (its holder paused?); relying on "
                    "rename checks",
                    guard,
                    seconds,
                )
                return
            time.sleep(0.02)
        except OSError as e:
            logger.debug("flock unsupported on %s (%s); relying on rename checks", guard, e)
            return


#: Lock files this process holds, by path: the token each was taken with. A run's steps look
#: their token up here to check, before they record or publish, that the lock is still theirs.
_HELD: dict[str, str] = {}


def held_token(path: Path) -> str | None:
    """The token this process took the lock ``path`` with, or None when it does not hold it."""
    return _HELD.get(str(path))


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as read from the lock file."""

    host: str
    pid: int
    pid_start: float
    started: float
    token: str
    command: str = ""
    heartbeat: float = 0.0

    @classmethod
    def from_file(cls, path: Path) -> LockHolder | None:
        """The holder recorded in ``path``; None when the file is missing.

        An unreadable file (edited by hand, or not made by this module) gives a holder with an
        empty host and pid 0, which is never taken for a live local process.
        """
        try:
            st = path.stat()
            raw = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                pid_start=float(data["pid_start"]),
                started=float(data["started"]),
                token=str(data["token"]),
                command=str(data.get("command", "")),
                heartbeat=st.st_mtime,
            )
        except (ValueError, KeyError, TypeError):
            token = f"unreadable:{st.st_ino}:{st.st_mtime_ns}"
            return cls("", 0, 0.0, st.st_mtime, token, "", heartbeat=st.st_mtime)

    def describe(self) -> str:
        """Host, pid and start time in words."""
        if not self.host:
            return "an unreadable lock file (not written by zarr-parallel)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        text = f"host {self.host}, pid {self.pid}, started {started}"
        return f"{text} ({self.command})" if self.command else text

    def state(self) -> str:
        """``alive``, ``dead`` (provably, on this host) or ``unknown`` (another host)."""
        if not self.host or self.host != host_name():
            return "unknown"
        return "alive" if process_alive(self.pid, self.pid_start) else "dead"

    def heartbeat_age(self) -> float:
        """Seconds since the holder last refreshed the lock."""
        return max(0.0, time.time() - self.heartbeat)


def host_name() -> str:
    """This machine's host name, as lock files and readers' leases record it."""
    return socket.gethostname()


def process_alive(pid: int, pid_start: float) -> bool:
    """True when ``pid`` runs the process started at ``pid_start`` (no reused pid, no zombie).

    The process that took a lock, or a reader's lease, records its pid and start time.
    """
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # create_time is derived from boot time and clock ticks: stable for one process.
        return bool(abs(proc.create_time() - pid_start) < 1.0)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class CacheLock:
    """The lock of one cache; use :func:`cache_lock` or ``acquire``/``release``.

    Parameters
    ----------
    path
        The lock file (``P.lock`` beside the cache ``P``).
    break_lock
        Also break a lock from another host whose heartbeat is older than ``stale_after``.
    stale_after
        Seconds without heartbeat after which a lock from another host counts as stale.
    heartbeat
        Seconds between heartbeats while held (0 disables the thread).
    guard
        The file whose ``flock`` serialises breakers (default ``<path>.break``). It is never
        deleted: a waiter could otherwise lock a deleted file while a newcomer locks a new one.
    """

    def __init__(
        self,
        path: Path,
        break_lock: bool = False,
        stale_after: float = STALE_AFTER_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        guard: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.guard = Path(guard) if guard else self.path.with_name(f"{self.path.name}.break")
        self.break_lock = break_lock
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[Path] = []  # folders acquire() created, deepest first

    # -- taking and giving back --------------------------------------------------------------

    def _content(self) -> dict[str, Any]:
        me = psutil.Process()
        return {
            "host": host_name(),
            "pid": os.getpid(),
            "pid_start": me.create_time(),
            "started": time.time(),
            "token": self.token,
            "command": " ".join(os.path.basename(a) for a in sys.argv[:3])[:200],
        }

    def _try_create(self) -> bool:
        """Create the lock atomically and complete; False when it exists."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{self.token}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self._content(), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            # A full disk (or quota) fails the write: leave nothing behind, and say so plainly.
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._unwritable(e) from e
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise self._unwritable(e) from e  # the temporary file goes in `finally`
            # No hard links here (some FUSE and object-store mounts): fall back to O_EXCL.
            return self._try_create_excl(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(self.path.parent)
        return True

    def _unwritable(self, e: OSError) -> RunFailed:
        return RunFailed(
            f"could not write the lock file {self.path} ({e.strerror or e}); nothing was "
            "written. Free space (or fix permissions) where the cache goes and run again"
        )

    def _remove_dead_temporaries(self) -> None:
        """Remove the temporary lock files of processes that are gone.

        A run killed between linking its temporary file as the lock and removing it leaves the
        file beside the cache; its name carries its pid, so it is recognised as dead (a live
        run taking the lock at this moment keeps its own).
        """
        for tmp in self.path.parent.glob(f"{glob.escape(self.path.name)}.*.tmp"):
            pid = tmp.name[len(self.path.name) + 1 :].split(".")[0]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _try_create_excl(self, tmp: Path) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.path.unlink()  # ours, and incomplete: nobody may read half a lock
            raise RunFailed(
                f"could not write the lock file {self.path} ({e.strerror or e}); nothing was "
                "written. Free space (or fix permissions) where the cache goes and run again"
            ) from e
        return True

    def acquire(self) -> CacheLock:
        """Take the lock, breaking a provably dead one; else raise :class:`CacheLocked`."""
        missing = self.path.parent
        while not missing.exists() and missing != missing.parent:
            self._made.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            try:
                created = self._try_create()
            except RunFailed:
                self._remove_made()  # a failed run leaves the disk as it found it
                raise
            if created:
                self.held = True
                _HELD[str(self.path)] = self.token
                self._remove_dead_temporaries()
                self._start_heartbeat()
                logger.debug("took lock %s", self.path)
                return self
            holder = LockHolder.from_file(self.path)
            if holder is None:
                continue  # released between our try and our look: try again
            state = holder.state()
            if state == "alive":
                raise CacheLocked(
                    self.path,
                    holder,
                    f"{self.path} is held by a running process: {holder.describe()}. Wait for "
                    "that run to finish (or stop it) before starting another on this cache",
                )
            if state == "unknown":
                age = holder.heartbeat_age()
                if not (self.break_lock and age > self.stale_after):
                    raise CacheLocked(self.path, holder, self._unknown_message(holder, age))
            self._break(holder)
        raise CacheLocked(
            self.path,
            None,
            f"{self.path} kept changing hands while this run tried to take it; try again",
        )

    def _unknown_message(self, holder: LockHolder, age: float) -> str:
        where = (
            f"{self.path} is held by a run on another host: {holder.describe()}; "
            if holder.host
            else f"{self.path} is {holder.describe()}; "
        )
        if age > self.stale_after:
            return (
                where + f"its heartbeat stopped {age / 60:.0f} min ago, so that run looks dead. "
                "If it is, re-run with break_lock=True to take the lock over"
            )
        return (
            where + f"it refreshed the lock {age:.0f} s ago, so it is probably still running. "
            f"Wait for it; a lock counts as stale after {self.stale_after / 60:.0f} min without "
            "a heartbeat, and can then be broken with break_lock=True"
        )

    @contextlib.contextmanager
    def _break_guard(self) -> Iterator[None]:
        """Serialise lock breakers on this cache (best effort where flock is unsupported)."""
        guard = self.guard
        guard.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_within(fd, guard, _GUARD_WAIT_S)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _break(self, stale: LockHolder) -> None:
        """Remove the stale lock ``stale`` if it is still the one in place."""
        with self._break_guard():
            current = LockHolder.from_file(self.path)
            if current is None or current.token != stale.token:
                return  # someone else broke or replaced it: look again
            aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return
            moved = LockHolder.from_file(aside)
            if moved is not None and moved.token != stale.token:
                # Lost a race (only possible where flock does not work): put the live lock back.
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                aside.unlink()
                return
            aside.unlink()
        logger.warning(
            "broke the stale lock %s of %s (%s)",
            self.path,
            stale.describe(),
            "its process is gone" if stale.state() == "dead" else "break_lock=True",
        )

    def release(self) -> None:
        """Give the lock back (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        if _HELD.get(str(self.path)) == self.token:
            del _HELD[str(self.path)]
        if self._remove_if_ours():
            logger.debug("released lock %s", self.path)
            # A run that failed before writing leaves the disk as it found it: the folders made
            # for the lock go again if nothing else was put in them.
            self._remove_made()
        else:
            logger.error(
                "lock %s was taken from this run while it ran (broken by hand?)", self.path
            )

    def _remove_if_ours(self) -> bool:
        """Remove the lock file if it still holds this run's token; else leave it.

        Read-then-unlink would remove the lock of a run that broke ours between the two (a run
        paused past the stale threshold wakes inside its release): the lock is moved aside
        first and what was moved is compared, as :meth:`_break` does. A breaker renaming the
        same lock at the same moment is safe: one rename wins, the other finds nothing. (No
        guard file: a released lock leaves the cache's folder as it was.)
        """
        # Named like a temporary lock file of this pid: if killed here, the next acquire
        # removes it (``_remove_dead_temporaries``).
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.released.tmp")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = LockHolder.from_file(aside)
        if moved is None or moved.token != self.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # another's lock: put it back
            aside.unlink()
            return False
        aside.unlink()
        return True

    def _remove_made(self) -> None:
        """Remove the folders ``acquire`` made, deepest first, while they are empty."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    # -- heartbeat -----------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self.heartbeat <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"zarr-parallel-lock-{self.path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = LockHolder.from_file(self.path)
            if holder is None or holder.token != self.token:
                logger.error("lock %s is no longer held by this run", self.path)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def cache_lock(path: Path, break_lock: bool = False) -> Iterator[CacheLock]:
    """Hold the lock file ``path`` for the block (see :class:`CacheLock`)."""
    lock = CacheLock(path, break_lock=break_lock)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
