"""Fixtures of the run room: a cache version planned and initialised, ready for its jobs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import Prepared, initialise, prepare, run_lock


@pytest.fixture
def initialised(tmp_path: Path, era5_files: list[Path]) -> Iterator[Callable[..., Prepared]]:
    """``initialised(files=None, **fields)``: a request prepared and its staging version
    initialised (metadata only) through :mod:`zarr_parallel.run.steps`, as a run does before
    its jobs. The cache's lock is held until the test ends, so job records are fenced by it.

    The request writes ``{tmp_path}/c.zarr`` in series mode with ``chunks={'time': 12}`` and at
    least four jobs; ``fields`` override it, ``files`` replace the session's ERA5-like files.
    """
    with ExitStack() as stack:

        def make(files: list[Path] | None = None, **fields: Any) -> Prepared:
            req = build_request(
                **{
                    "data_uri": [str(p) for p in files or era5_files],
                    "cache_store": str(tmp_path / "c.zarr"),
                    "deploy_mode": "series",
                    "chunks": {"time": 12},
                    "num_jobs": 4,
                    "memory_limit": "1GB",
                    **fields,
                }
            )
            stack.enter_context(run_lock(req))
            prepared = prepare(req)
            initialise(prepared)
            return prepared

        yield make


@pytest.fixture
def own_sources(tmp_path: Path, era5_files: list[Path]) -> list[Path]:
    """Copies of the session's ERA5-like files that a test may change under a run."""
    folder = tmp_path / "sources"
    folder.mkdir()
    return [Path(shutil.copy2(p, folder / p.name)) for p in era5_files]
