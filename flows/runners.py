"""Task runners per deploy mode: configuration only, no chunk arithmetic."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from zarr_parallel.pipeline import Prepared


def make_task_runner(prepared: Prepared) -> Any:
    """The task runner that executes the write tasks of this run."""
    mode = prepared.request.deploy_mode
    if mode == "series":
        return ThreadPoolTaskRunner(max_workers=1)
    raise NotImplementedError(f"deploy_mode={mode!r} arrives with the [parallel] issue")
