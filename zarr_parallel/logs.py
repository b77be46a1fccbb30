"""What a run prints: ``log_level`` 0 (warnings only), 1 (progress) or 2 (debug)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from zarr_parallel.errors import PlanError, RequestError

#: log_level → the level of this package's loggers and of the console.
LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
#: Our own loggers (library and flows).
OWN_LOGGERS = ("zarr_parallel", "flows")
#: Libraries whose info lines are noise for a caching run: warnings only, info when debugging.
CHATTY_LOGGERS = ("distributed", "dask", "dask_jobqueue", "tornado", "fsspec")
#: Libraries whose debug lines say nothing about a run (h5py's type converters...).
SILENT_LOGGERS = ("h5py", "numcodecs", "asyncio")
#: The loggers of Prefect's flow and task runs (their states, and the exceptions that end them).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
#: The errors of an invalid request: the door that ran the flow says them in one message.
INVALID_REQUEST = (RequestError, PlanError)
#: How a failed state's message names its exception ("... an exception RequestError: ...").
_STATE_EXCEPTION = re.compile(r"encountered an exception:? (\w+):")


class QuietInvalidRequests(logging.Filter):
    """Keep Prefect's console lines about a run stopped by an invalid request off the terminal.

    Below ``log_level=2`` such a run prints the one message its door gives (exit 2 at the
    command line, the exception in Python), not Prefect's tracebacks of the task and the flow
    that raised it; at 2 they are shown. Only the console is filtered: the run's logs in the
    Prefect API (the UI) keep them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(RUN_LOGGERS):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            return not isinstance(record.exc_info[1], INVALID_REQUEST)
        found = _STATE_EXCEPTION.search(record.getMessage())
        return found is None or found[1] not in _invalid_request_names()


def _invalid_request_names() -> set[str]:
    """The class names of :data:`INVALID_REQUEST` and their subclasses (e.g. InsufficientSpace)."""
    names: set[str] = set()
    todo: list[type] = list(INVALID_REQUEST)
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


#: The one filter on Prefect's console handler (added below log level 2).
QUIET_INVALID_REQUESTS = QuietInvalidRequests()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (the progress output's live
    line redirects it, to print log lines above itself)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


#: This package's console lines before Prefect has set up its own (the command plans before it
#: imports Prefect): the same layout as Prefect's console lines. Removed once Prefect's console
#: handler exists, which then prints them (through the root logger).
EARLY_HANDLER = _StderrHandler()
EARLY_HANDLER.setFormatter(
    logging.Formatter(
        "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"
    )
)


def _console_for_own_loggers(prefect_console: bool) -> None:
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if prefect_console:
            logger.removeHandler(EARLY_HANDLER)
        elif EARLY_HANDLER not in logger.handlers:
            logger.addHandler(EARLY_HANDLER)


def set_log_level(level: int) -> None:
    """Apply ``log_level`` to this process's loggers and console.

    At 0 the console shows warnings and errors only (Prefect's flow and task progress still
    reaches the Prefect API, so the UI keeps it); 1 adds progress (source, plan figures, flow
    and task states); 2 adds this package's debugging detail (layouts, target chunks, rejected
    recommendations) and the execution libraries' info lines. Below 2 a run stopped by an
    invalid request keeps Prefect's tracebacks off the console (:class:`QuietInvalidRequests`).
    Prefect's own lines outside the run loggers follow ``PREFECT_LOGGING_LEVEL``.
    """
    if level not in LEVELS:
        raise ValueError(f"log_level must be 0, 1 or 2; got {level!r}")
    own = LEVELS[level]
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if level == 2 else logging.WARNING)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # The flow's and tasks' run loggers carry the run's progress (to the console at 1, and to
    # the API at every level, where the UI shows it): ``log_level`` decides them, not a
    # ``PREFECT_LOGGING_LEVEL=WARNING`` the user set to quiet Prefect's own chatter.
    for name in RUN_LOGGERS:
        logging.getLogger(name).setLevel(min(own, logging.INFO))
    # Prefect prints through a console handler on the root logger. Its level decides what the
    # terminal shows; the API handler (the UI's copy of the run logs) is left as it is. Before
    # Prefect is set up, this package's lines go to the console through EARLY_HANDLER.
    consoles = [
        h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"
    ]
    _console_for_own_loggers(bool(consoles))
    EARLY_HANDLER.setLevel(own)
    for handler in consoles:
        handler.setLevel(own)
        if level < 2:
            handler.addFilter(QUIET_INVALID_REQUESTS)
        else:
            handler.removeFilter(QUIET_INVALID_REQUESTS)
