"""Test-only transform plug-ins that inject real faults into write jobs.

Registered through the ``zarr_parallel.transforms`` entry point group by the ``.dist-info`` folder
beside this file, so every process that has this folder on ``PYTHONPATH`` (the test process,
dask workers, SLURM jobs and their job processes) finds them by name, as it would a user's
plug-in. They act only when a block of the data is computed, i.e. inside a write job, never
while planning.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import xarray as xr


def _on_block(
    ds: xr.Dataset, dim: str, index: int, action: Any, also: dict[str, int] | None = None
) -> xr.Dataset:
    """Run ``action()`` when a block holding ``index`` along ``dim`` (and each ``also``
    index along its dimension) is computed.

    ``also`` defaults to latitude 0: one job acts where a plan balanced for two workers splits
    latitude as well as time (docs/design.md §3.4), as the tests' "the job holding step 30" means.
    """
    where = {dim: index, **({"latitude": 0} if also is None else also)}
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if dim not in var.dims or not hasattr(var.data, "map_blocks"):
            continue
        axes = {var.dims.index(d): i for d, i in where.items() if d in var.dims}

        def fn(
            block: np.ndarray, block_info: Any = None, axes: dict[int, int] = axes
        ) -> np.ndarray:
            if block_info is not None and None in block_info:
                location = block_info[None]["array-location"]
                if all(location[a][0] <= i < location[a][1] for a, i in axes.items()):
                    action()
            return block

        out[name] = var.copy(data=var.data.map_blocks(fn, dtype=var.dtype))
    return out


def _announce(started: str | None) -> None:
    """Append one JSON line about this process to ``started`` (one line per blocked attempt)."""
    if started:
        info = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "time": time.time(),
        }
        with open(started, "a") as f:
            f.write(json.dumps(info) + "\n")


def hold(
    ds: xr.Dataset,
    ctx: Any,
    marker: str,
    index: int = 0,
    dim: str = "time",
    started: str | None = None,
    seconds: float = 600.0,
    also: dict[str, int] | None = None,
) -> xr.Dataset:
    """Block the job that computes ``index`` along ``dim`` while the file ``marker`` exists.

    ``started`` (a path) gets a line with the blocked process's pid, parent pid and SLURM job id
    each time a block begins to wait, so a test knows which worker to kill.
    """

    announced = set()

    def action() -> None:
        if not os.path.exists(marker):
            return
        if os.getpid() not in announced:  # once per process: one line per attempt
            announced.add(os.getpid())
            _announce(started)
        t0 = time.monotonic()
        while os.path.exists(marker) and time.monotonic() - t0 < seconds:
            time.sleep(0.05)

    return _on_block(ds, dim, index, action, also)


def balloon(
    ds: xr.Dataset,
    ctx: Any,
    nbytes: int,
    index: int = 0,
    dim: str = "time",
    seconds: float = 5.0,
    also: dict[str, int] | None = None,
) -> xr.Dataset:
    """Make the job that computes ``index`` along ``dim`` hold ``nbytes`` more than it needs."""

    def action() -> None:
        extra = np.ones(int(nbytes), dtype=np.uint8)  # touched pages: really resident
        time.sleep(seconds)
        del extra

    return _on_block(ds, dim, index, action, also)


def fail(
    ds: xr.Dataset,
    ctx: Any,
    message: str,
    index: int = 0,
    dim: str = "time",
    also: dict[str, int] | None = None,
) -> xr.Dataset:
    """Make the job that computes ``index`` along ``dim`` raise ``OSError(message)``."""

    def action() -> None:
        raise OSError(message)

    return _on_block(ds, dim, index, action, also)
