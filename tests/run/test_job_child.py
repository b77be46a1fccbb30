"""The job process's own side (:mod:`zarr_parallel.run.job_child`): a run's source opened ahead
of its jobs is checked as a job's is. The process itself is tested in tests/run/test_job_process.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from sources_support import kerchunk_refs
from zarr_parallel.request.model import build_request
from zarr_parallel.run import job_child
from zarr_parallel.run.policy import default_policy, enforced
from zarr_parallel.sources.target import clear_source_cache


def test_a_source_opened_ahead_in_a_policed_run_is_checked_against_the_policy(
    tmp_path: Path, era5_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A kerchunk reference that points outside a deployment's folders is refused when it is
    opened ahead (the refusal is left for the jobs to report); outside a policed run it opens."""
    workdir = tmp_path / "deployment"
    (workdir / "data").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(era5_files[0], outside / era5_files[0].name)
    sneaky = workdir / "data" / "sneaky.json"
    sneaky.write_text(json.dumps(kerchunk_refs([outside / era5_files[0].name], str(outside))))
    source = build_request(data_uri=str(sneaky), cache_store=str(tmp_path / "c.zarr"))
    clear_source_cache()
    caplog.set_level(logging.DEBUG, logger=job_child.__name__)
    with enforced(default_policy(workdir), workdir):
        job_child._open_source(source.source_json())
    refused = [r.getMessage() for r in caplog.records if "ahead" in r.getMessage()]
    assert len(refused) == 1 and "kerchunk reference to" in refused[0], refused
    caplog.clear()
    job_child._open_source(source.source_json())  # the local user's freedom
    assert not [r for r in caplog.records if "ahead" in r.getMessage()]
    clear_source_cache()
