"""A job process readies a run's plan before its first job (:mod:`zarr_parallel.run.warm`), on
real netCDF files: chunk indexes read ahead, slab buffers kept and lent to the first job."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zarr_parallel import buffers
from zarr_parallel.planning.memory import fast_slab_bounds
from zarr_parallel.run import warm as warm_module
from zarr_parallel.run.job import run_job
from zarr_parallel.run.steps import Prepared
from zarr_parallel.run.warm import read_indexes_ahead, warm
from zarr_parallel.sources.hdf5_chunks import _h5_storage
from zarr_parallel.sources.target import cached_source

Initialise = Callable[..., Prepared]


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    buffers.clear()
    _h5_storage.cache_clear()
    yield
    buffers.clear()


def _largest_slab(prepared: Prepared, jobs: int | None = None) -> int:
    """Bytes of the largest slab the first ``jobs`` jobs (all: None) read (float32 variables of
    73 × 144, chunks of 12)."""
    longest = 0
    for job in sorted(prepared.plan.jobs, key=lambda j: j.id)[:jobs]:
        a, b = job.bounds["time"]
        cuts = fast_slab_bounds(a, b, 12).tolist()
        longest = max(longest, *(y - x for x, y in itertools.pairwise(cuts)))
    return longest * 73 * 144 * 4


def test_warming_reads_the_indexes_and_keeps_the_slab_buffers_the_first_job_is_lent(
    initialised: Initialise, era5_files: list[Path]
) -> None:
    prepared = initialised(memory_limit="1GB")
    done = warm(prepared.request_json, str(prepared.version))
    variables = {v for job in prepared.plan.jobs for v in job.variables}
    assert done["files"] == len(variables) * len(era5_files)
    assert _h5_storage.cache_info().currsize == done["files"]
    assert done["kept"] == buffers.kept_bytes() == buffers.KEPT * _largest_slab(prepared)

    job = prepared.plan.jobs[0]
    record = run_job(prepared.request_json, str(prepared.version), job.id)
    assert record["lent_memory"] == done["kept"] > 0
    assert record["peak_memory"] >= record["lent_memory"]
    assert _h5_storage.cache_info().misses == done["files"]  # the job read no index again


def test_nothing_is_kept_when_two_slabs_exceed_the_largest_jobs_estimate(
    initialised: Initialise, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = initialised()
    monkeypatch.setattr(buffers, "KEPT", 10**6)  # two slabs "weigh" a million
    assert warm(prepared.request_json, str(prepared.version))["kept"] == 0
    assert buffers.kept_bytes() == 0


def test_the_source_alone_gives_the_indexes_within_the_time_given(
    initialised: Initialise, era5_files: list[Path]
) -> None:
    prepared = initialised()
    source = cached_source(prepared.request)
    data_vars = [v for v in source.layout.variables if v not in source.dataset.coords]
    assert read_indexes_ahead(source, None) == len(data_vars) * len(era5_files)
    _h5_storage.cache_clear()
    assert read_indexes_ahead(source, None, seconds=0.0) == 0  # no time: nothing read
    assert _h5_storage.cache_info().currsize == 0


def test_only_the_first_jobs_size_the_buffers(
    initialised: Initialise, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan of many jobs keeps its first job waiting only for its first jobs' slabs."""
    prepared = initialised(memory_limit="1GB")
    monkeypatch.setattr(warm_module, "WARM_JOBS", 1)
    assert warm(prepared.request_json, str(prepared.version))["kept"] == (
        buffers.KEPT * _largest_slab(prepared, 1)
    )
    buffers.clear()
    monkeypatch.setattr(warm_module, "WARM_JOBS", 0)
    assert warm(prepared.request_json, str(prepared.version)) == {"files": 0, "kept": 0}
