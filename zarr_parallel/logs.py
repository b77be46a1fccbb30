"""What a run prints: ``log_level`` 0 (warnings only), 1 (progress) or 2 (debug)."""

from __future__ import annotations

import logging

#: log_level → the level of this package's loggers and of the console.
LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
#: Our own loggers (library and flows).
OWN_LOGGERS = ("zarr_parallel", "flows")
#: Libraries whose info lines are noise for a caching run: warnings only, info when debugging.
CHATTY_LOGGERS = ("distributed", "dask", "dask_jobqueue", "tornado", "fsspec")
#: Libraries whose debug lines say nothing about a run (h5py's type converters...).
SILENT_LOGGERS = ("h5py", "numcodecs", "asyncio")


def set_log_level(level: int) -> None:
    """Apply ``log_level`` to this process's loggers and console.

    At 0 the console shows warnings and errors only (Prefect's flow and task progress still
    reaches the Prefect API, so the UI keeps it); 1 adds progress (source, plan figures, flow
    and task states); 2 adds this package's debugging detail (layouts, target chunks, rejected
    recommendations) and the execution libraries' info lines. Prefect's own debug output is
    ``PREFECT_LOGGING_LEVEL=DEBUG``'s business.
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
    # Prefect prints through a console handler on the root logger. Its level decides what the
    # terminal shows; the API handler (the UI's copy of the run logs) is left as it is.
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.setLevel(own)
