"""Test hooks that stop a process for real, or make its file operations fail, at named places.

Inert unless the environment variable ``ZARR_PARALLEL_FAULT`` is set (or a test calls
:func:`activate`). The variable holds one fault, ``ACTION@TRIGGER``:

``ACTION``
    ``kill`` (the process sends itself SIGKILL: nothing is cleaned up, exactly as if the machine
    or the scheduler had killed it), ``stop`` (SIGSTOP: the process freezes, holding whatever it
    holds, until someone sends SIGCONT; the thread that reached the point goes no further),
    ``enospc`` or ``eio`` (the file operation raises ``OSError`` with that errno, as a full or
    failing disk does; only with an operation trigger).
``TRIGGER``
    ``POINT`` or ``POINT#N``: the N-th time the run reaches the named point (default the first).
    ``os.OP#M``: the M-th file operation of kind OP (see :data:`OPERATIONS`) on a path under
    ``ZARR_PARALLEL_FAULT_ROOT`` (every path when unset). ``POINT#N+os.OP#M``: the M-th such
    operation after the point was reached N times (e.g. ``kill@prune+os.unlink#3``: in the
    middle of removing an old version). ``#M*`` makes every operation from the M-th on fail
    (a disk that stays full) instead of the M-th alone.

Points, in run order:

``planned``
    The run holds the lock and has chosen its version and jobs; nothing written yet.
``init``
    Store metadata written, ``plan.json`` not yet (the version is not initialised).
``initialised``
    The version is initialised (or a resumed one cleaned); no job has run.
``job-written``
    A job's chunks are written and synced, its record is not yet written.
``job-recorded``
    A job's record is written.
``before-finalise``
    Every job recorded; metadata not yet consolidated, version not marked complete.
``before-publish``
    Version marked complete; the final path not yet switched to it.
``publish``
    The new link is made beside the final path, not yet moved over it.
``published``
    The final path points at the new version; older versions not yet pruned.
``prune``
    Just before one old version is removed (reached once per version removed).

The file-operation layer wraps functions of :mod:`os` and the built-in ``open`` in the process
(pathlib, shutil and zarr's local store call them at call time, so every write of the run goes
through it); it is installed only while a fault names an operation. This module imports nothing
of the package, so it can be loaded alone. The tests use it to kill whole runs at deterministic
points and to fail the N-th write, fsync, rename... of a run (see tests/run/test_durability.py).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

ENV = "ZARR_PARALLEL_FAULT"
#: Only file operations on paths under this folder are counted (and failed).
ROOT_ENV = "ZARR_PARALLEL_FAULT_ROOT"
#: When set, every counted file operation is appended to this file (``OP PATH`` per line).
TRACE_ENV = "ZARR_PARALLEL_FAULT_TRACE"
POINTS = (
    "planned",
    "init",
    "initialised",
    "job-written",
    "job-recorded",
    "before-finalise",
    "before-publish",
    "publish",
    "published",
    "prune",
)
#: Kinds of file operation a fault can name, and the :mod:`os` functions counted as each.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "open": (),  # a file opened for writing (os.open with write flags, or open(..., "w"))
    "write": ("write",),  # also the first write() to each file opened for writing
    "fsync": ("fsync", "fdatasync"),
    "rename": ("rename",),
    "replace": ("replace",),
    "link": ("link",),
    "symlink": ("symlink",),
    "unlink": ("unlink", "remove"),
    "rmdir": ("rmdir",),
    "mkdir": ("mkdir",),
}
ACTIONS = ("kill", "stop", "enospc", "eio")
_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Fault(NamedTuple):
    """One parsed fault: what to do, and when."""

    action: str
    point: str | None = None
    point_nth: int = 1
    operation: str | None = None
    operation_nth: int = 1
    persistent: bool = False
    root: str | None = None


def parse(spec: str, root: str | None = None) -> Fault:
    """Parse ``ACTION@TRIGGER`` (see the module's docstring); unknown names are errors.

    >>> parse("kill@prune+os.unlink#3")
    Fault(action='kill', point='prune', point_nth=1, operation='unlink', operation_nth=3, \
persistent=False, root=None)
    """
    action, sep, trigger = spec.partition("@")
    if not sep or action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: expected ACTION@TRIGGER with ACTION one of {ACTIONS}")
    point, point_nth, operation, operation_nth, persistent = None, 1, None, 1, False
    for part in trigger.split("+"):
        name, _, nth = part.partition("#")
        persistent = persistent or nth.endswith("*")
        count = int(nth.rstrip("*") or 1)
        if name.startswith("os."):
            operation, operation_nth = name[3:], count
            if operation not in OPERATIONS:
                raise ValueError(f"{ENV}={spec!r}: unknown operation; known: {list(OPERATIONS)}")
        else:
            point, point_nth = name, count
            if point not in POINTS:
                raise ValueError(f"{ENV}={spec!r}: unknown point {point!r}; known: {POINTS}")
    if operation is None and action in _ERRNO:
        raise ValueError(f"{ENV}={spec!r}: {action} needs a file operation (os.OP)")
    return Fault(action, point, point_nth, operation, operation_nth, persistent, root)


class _State:
    """What this process has counted for the active fault."""

    def __init__(self, fault: Fault | None, key: Any) -> None:
        self.fault, self.key = fault, key
        self.points: dict[str, int] = {}
        self.operations = 0
        self.armed = fault is not None and fault.point is None
        self.fired = False


_guard = threading.RLock()
_state = _State(None, None)
_active: Fault | None = None  # set by activate(): wins over the environment
_originals: dict[str, Any] = {}


def _current() -> _State:
    """The state for the active fault, reset whenever the fault changes."""
    global _state
    if _active is not None:
        key: Any = _active
    else:
        key = (os.environ.get(ENV) or None, os.environ.get(ROOT_ENV) or None)
    if key != _state.key:
        if _active is not None:
            fault: Fault | None = _active
        else:
            fault = parse(key[0], key[1]) if key[0] else None
        _state = _State(fault, key)
    return _state


#: Set while a door plans ahead of its run (no lock held): the points name the run's own steps.
_POINTS_OFF: ContextVar[bool] = ContextVar("zarr_parallel_fault_points_off", default=False)


@contextmanager
def points_off() -> Iterator[None]:
    """Within the block no point is reached: a door's planning ahead of the run (outside the
    cache's lock) is not the run's ``planned`` step."""
    token = _POINTS_OFF.set(True)
    try:
        yield
    finally:
        _POINTS_OFF.reset(token)


def fault_point(name: str) -> None:
    """Kill or stop this process here if the active fault names this point."""
    if _active is None and not os.environ.get(ENV):
        return
    if _POINTS_OFF.get():
        return
    with _guard:
        state = _current()
        fault = state.fault
        if fault is None or fault.point != name:
            return
        state.points[name] = state.points.get(name, 0) + 1
        reached = state.points[name] == fault.point_nth
        if reached and fault.operation is not None:
            state.armed = True  # count operations from here on
            return
    if reached:
        _signal(fault.action)


def _signal(action: str) -> None:
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    if os.environ.get("ZARR_PARALLEL_JOB_PROCESS") == "1":
        # In a job process (zarr_parallel.run.job_process) the run is its parent, the worker:
        # that is what dies or freezes. A frozen parent simply gets no further job from it;
        # a killed one takes this process with it.
        os.kill(os.getppid(), sig)
        if action != "kill":
            return
    if sig == signal.SIGSTOP:
        # To this thread, not the process: a stop sent to the process is taken by its main
        # thread, and until that thread is scheduled (seconds, on busy cores) this one ran on
        # and, e.g., wrote the very job record the stop was meant to come before. A stop taken
        # by any thread still freezes the whole process.
        signal.pthread_kill(threading.get_ident(), sig)
        return
    os.kill(os.getpid(), sig)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _path_of(args: tuple[Any, ...], kwargs: dict[str, Any], by_fd: bool) -> str:
    """The path an os call acts on (its first argument), made absolute."""
    if not args:
        return ""
    first = args[0]
    if by_fd or isinstance(first, int):
        return _fd_path(int(first))
    path = os.fsdecode(first)
    dir_fd = kwargs.get("dir_fd")
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(_fd_path(dir_fd), path)
    return os.path.abspath(path)


def _watched(path: str) -> bool:
    """True when the active fault counts operations on ``path``."""
    fault = _current().fault
    if fault is None or fault.operation is None:
        return False
    if not fault.root:
        return True
    roots = {os.path.abspath(fault.root), os.path.realpath(fault.root)}
    return any((path + os.sep).startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _count(operation: str, path: str) -> None:
    """Count one file operation; act when it is the one the fault names."""
    with _guard:
        if not _watched(path):
            return
        state = _current()
        fault = state.fault
        if fault is None:
            return
        trace = os.environ.get(TRACE_ENV)
        if trace:
            with _originals.get("open", builtins.open)(trace, "a") as f:
                f.write(f"{operation} {path}\n")
        if operation != fault.operation or not state.armed:
            return
        state.operations += 1
        hit = state.operations == fault.operation_nth or (
            fault.persistent and state.operations > fault.operation_nth
        )
        if not hit:
            return
        state.fired = True
    if fault.action in _ERRNO:
        code = _ERRNO[fault.action]
        raise OSError(
            code, f"{os.strerror(code)} (injected: {operation} #{state.operations})", path
        )
    _signal(fault.action)


def _wrap_os(name: str, operation: str) -> Callable[..., Any]:
    original = getattr(os, name)
    by_fd = name in ("write", "fsync", "fdatasync")

    # A link is counted where it is made (its second argument): a symlink's first argument is
    # the target it points to, often relative, which lies under no fault root.
    made = name in ("symlink", "link")

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if made:
            dst = args[1] if len(args) > 1 else kwargs.get("dst")
            where = {"dir_fd": kwargs.get("dst_dir_fd", kwargs.get("dir_fd"))}
            _count(operation, _path_of((dst,), where, False) if dst is not None else "")
        else:
            _count(operation, _path_of(args, kwargs, by_fd))
        return original(*args, **kwargs)

    wrapper.__name__ = name
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def _wrap_os_open() -> Callable[..., Any]:
    original = os.open

    def wrapper(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE_FLAGS:
            _count("open", _path_of((path,), kwargs, False))
        return original(path, flags, *args, **kwargs)

    return wrapper


class _CountedFile:
    """A file opened for writing whose ``write`` calls are counted (and may fail)."""

    def __init__(self, f: Any, path: str) -> None:
        self._f, self._path, self._written = f, path, False

    def write(self, data: Any) -> Any:
        if not self._written:
            # One count per file: json.dump alone makes hundreds of small writes, and failing
            # the fifth of them takes the same error path as failing the first.
            self._written = True
            _count("write", self._path)
        return self._f.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _CountedFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _wrap_open() -> Callable[..., Any]:
    original = io.open

    def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return original(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fsdecode(file))
        with _guard:
            if not _watched(path):
                return original(file, mode, *args, **kwargs)
        _count("open", path)
        return _CountedFile(original(file, mode, *args, **kwargs), path)

    return wrapper


def _install() -> None:
    """Wrap the os functions and ``open`` (once per process)."""
    with _guard:
        if _originals:
            return
        _originals["open"] = io.open
        _originals["os.open"] = os.open
        for operation, names in OPERATIONS.items():
            for name in names:
                _originals[f"os.{name}"] = getattr(os, name)
                setattr(os, name, _wrap_os(name, operation))
        os.open = _wrap_os_open()
        builtins.open = io.open = _wrap_open()


def _uninstall() -> None:
    with _guard:
        if not _originals:
            return
        for key, original in _originals.items():
            if key == "open":
                builtins.open = io.open = original
            else:
                setattr(os, key[3:], original)
        _originals.clear()


def install_from_environment() -> None:
    """Install the file-operation layer when ``ZARR_PARALLEL_FAULT`` names an operation.

    Called on import (every process of a run imports this module before writing); a process
    that sets the variable later (a forked run) calls it again.
    """
    spec = os.environ.get(ENV)
    if spec and "os." in spec:
        _current()  # parse now: a typo fails at start-up, not silently never
        _install()


@contextmanager
def activate(spec: str, root: str | os.PathLike[str] | None = None) -> Iterator[Fault]:
    """Make ``spec`` the fault of this process while the block runs (tests, in process).

    Counts start from zero; the file-operation layer is installed for the block only.
    """
    global _active
    fault = parse(spec, os.fspath(root) if root is not None else None)
    with _guard:
        _active = fault
        _current()
    if fault.operation is not None:
        _install()
    try:
        yield fault
    finally:
        with _guard:
            _active = None
        _uninstall()


def fired() -> bool:
    """True once the active fault has acted (an operation failed) in this process."""
    return _state.fired


install_from_environment()
