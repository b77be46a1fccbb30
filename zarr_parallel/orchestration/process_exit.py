"""How a command's process ends: as ``sys.exit`` does, without the interpreter's finalisation.

After a run the process holds the whole stack (Prefect, xarray, pandas, SQLAlchemy: thousands of
modules), and Python's finalisation, tearing them down one by one, took 0.5 s of every command
on the development machine (docs/design.md §2b). Nothing in it is needed once the command is
done: its data are durable, its clusters and temporary API are stopped, and everything ``exit``
would still do for others is done here first: non-daemon threads joined, ``atexit`` handlers
(Prefect's own log and event drains among them) run, logging and the standard streams flushed.
Only the commands' entries call it; the library and the Python API never do.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int | None) -> NoReturn:
    """End the process with ``code`` after doing what ``sys.exit`` would, except the
    interpreter's finalisation (module teardown)."""
    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:  # pragma: no cover - another interpreter
        sys.exit(code)
    shutdown()  # joins non-daemon threads and runs threading's exit hooks, as exit does
    run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # Closed, or a broken pipe: nothing more can be said.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)


__all__ = ["exit_now"]
