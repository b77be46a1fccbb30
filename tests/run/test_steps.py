"""The run's steps (zarr_parallel.run.steps and .finish), called one by one as the flow calls them.

Real netCDF4 files (the session's ERA5-like factory), real caches under ``tmp_path``: what
``prepare`` chooses (fresh, resume, adopt, up to date, or a refusal) without writing, and what
``finish`` does with a staging version that does not match its source.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from zarr_parallel.errors import RecommendationsPending, RequestError, RunFailed
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.steps import (
    Prepared,
    initialise,
    limits_for,
    prepare,
    recommendations_message,
    worker_note,
)
from zarr_parallel.run.verify import location_snapshot
from zarr_parallel.store.manifest import is_complete, plan_record, recorded_jobs
from zarr_parallel.store.paths import CachePaths


def _request(src: list[Path], cache: Path, **extra: Any) -> CacheRequest:
    fields: dict[str, Any] = {
        "data_uri": str(src[0].parent / "*.nc"),
        "chunks": {"time": 12},
        "cache_store": str(cache),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 4,
        **extra,
    }
    return build_request(**fields)


def _jobs(prepared: Prepared, ids: list[int] | None = None) -> list[dict[str, Any]]:
    todo = prepared.todo if ids is None else ids
    return [run_job(prepared.request_json, str(prepared.version), i) for i in todo]


def _publish(req: CacheRequest) -> Prepared:
    prepared = prepare(req)
    initialise(prepared)
    finish(prepared, _jobs(prepared), 0.0)
    return prepared


def _interrupted(req: CacheRequest, jobs: int) -> Prepared:
    """A run killed after its first ``jobs`` jobs: initialised, partly recorded, unpublished."""
    prepared = prepare(req)
    initialise(prepared)
    _jobs(prepared, prepared.todo[:jobs])
    return prepared


def test_prepare_plans_a_fresh_version_and_writes_nothing(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "out" / "c.zarr"
    cache.parent.mkdir()
    prepared = prepare(_request(era5_files, cache))
    assert prepared.status == "fresh"
    assert len(prepared.plan.jobs) >= 4
    assert prepared.todo == [j.id for j in prepared.plan.jobs]
    assert prepared.version == CachePaths(cache).next_version(prepared.plan.fingerprint)
    assert list(cache.parent.iterdir()) == []  # no version, no lock, no link
    stored = prepared.plan_json()
    assert stored["cache_path"] == prepared.paths.canonical
    assert set(read_jobs(stored)) == set(prepared.todo)


def test_prepare_halts_on_recommendations_before_any_write(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    # Steps 3..43 start and end inside the source's 6-step chunks: the plan reads more.
    mid_chunk = [{"type": "isel", "time": [3, 44]}]
    req = _request(
        era5_files, cache, preprocessors=mid_chunk, chunks={"time": 41}, recommend_changes="halt"
    )
    with pytest.raises(RecommendationsPending) as info:
        prepare(req)
    assert info.value.plan.read_amplification > 1
    text = recommendations_message(info.value.plan, info.value.recommendations)
    assert text.startswith("The plan reads ")
    assert "recommend_changes='proceed'" in text
    assert not cache.exists() and not CachePaths(cache).versions.exists()


def test_a_published_cache_is_up_to_date(era5_files: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "c.zarr"
    first = _publish(_request(era5_files, cache))
    before = location_snapshot(cache)
    again = prepare(_request(era5_files, cache))
    assert again.status == "up_to_date" and again.todo == []
    assert again.version == first.version == CachePaths(cache).current()
    # Another split of the same content (other num_jobs) is up to date too, and reports the
    # jobs that made the cache.
    other = prepare(_request(era5_files, cache, num_jobs=2))
    assert other.status == "up_to_date"
    assert other.plan.fingerprint == first.plan.fingerprint
    summary = finish(other, [], 0.0)
    assert summary["status"] == "up to date" and summary["jobs_run"] == 0
    assert summary["jobs_skipped"] == len(first.plan.jobs)
    assert location_snapshot(cache) == before


def test_other_content_without_overwrite_is_refused(era5_files: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "c.zarr"
    _publish(_request(era5_files, cache))
    before = location_snapshot(cache)
    with pytest.raises(RequestError, match="holds a cache of a different request") as info:
        prepare(_request(era5_files, cache, chunks={"time": 24}, overwrite=False))
    assert info.value.parameter == "overwrite"
    assert location_snapshot(cache) == before


def test_a_path_the_cache_did_not_make_is_refused(era5_files: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "c.zarr"
    cache.write_text("not a cache")
    with pytest.raises(RequestError, match="refuses to start") as info:
        prepare(_request(era5_files, cache))
    assert info.value.parameter == "cache_store"
    assert cache.read_text() == "not a cache"
    # An empty folder may be replaced, but only with overwrite=True.
    cache.unlink()
    cache.mkdir()
    with pytest.raises(RequestError, match="exists and was not made by this version") as info:
        prepare(_request(era5_files, cache, overwrite=False))
    assert info.value.parameter == "overwrite"
    assert prepare(_request(era5_files, cache)).status == "fresh"


def test_an_interrupted_run_resumes_with_the_jobs_left(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    req = _request(era5_files, cache)
    first = _interrupted(req, 2)
    again = prepare(req)
    assert again.status == "resume" and again.version == first.version
    assert again.todo == first.todo[2:]
    initialise(again)
    summary = finish(again, _jobs(again), 0.0)
    assert summary["resumed"] and summary["jobs_skipped"] == 2
    assert CachePaths(cache).current() == first.version and is_complete(first.version)
    published = xr.open_zarr(cache)
    source = xr.open_mfdataset(sorted(p for p in era5_files), engine="h5netcdf")
    np.testing.assert_array_equal(published.t2m.values, source.t2m.values)


def test_resume_false_starts_afresh_and_resume_true_needs_a_run(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    with pytest.raises(RequestError, match="no interrupted run of this cache was found") as info:
        prepare(_request(era5_files, cache, resume=True))
    assert info.value.parameter == "resume"
    first = _interrupted(_request(era5_files, cache), 1)
    fresh = prepare(_request(era5_files, cache, resume=False))
    assert fresh.status == "fresh" and fresh.version != first.version
    assert fresh.todo == [j.id for j in fresh.plan.jobs]
    # resume=True with an interrupted run of other content names it.
    with pytest.raises(RequestError, match=f"the interrupted run {first.version.name} was of"):
        prepare(_request(era5_files, cache, resume=True, chunks={"time": 24}))


def test_an_interrupted_run_of_the_same_content_is_continued_with_its_own_plan(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    first = _interrupted(_request(era5_files, cache, num_jobs=2), 1)
    other = prepare(_request(era5_files, cache, num_jobs=4))
    assert other.plan.fingerprint == first.plan.fingerprint  # the stored plan, not a new split
    assert other.status == "resume" and other.version == first.version
    assert other.todo == first.todo[1:]


def test_finish_unrecords_the_jobs_whose_chunks_differ_and_publishes_nothing(
    era5_files: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    prepared = prepare(_request(era5_files, cache, verify_before_publish="full"))
    initialise(prepared)
    results = _jobs(prepared)
    fp = prepared.plan.fingerprint
    assert recorded_jobs(prepared.version, fp) == set(prepared.todo)
    # The chunk of time 0:12 copied over the chunk of time 12:24: valid bytes, wrong values.
    chunks = prepared.version / "t2m" / "c"
    shutil.copyfile(chunks / "0" / "0" / "0", chunks / "1" / "0" / "0")
    with pytest.raises(RunFailed, match="does not match its source") as info:
        finish(prepared, results, 0.0)
    jobs = read_jobs(plan_record(prepared.version)).values()
    wrong = {"time": (12, 24), "latitude": (0, 40), "longitude": (0, 72)}
    bad = {
        j.id
        for j in jobs
        if "t2m" in j.variables
        and all(j.bounds[d][0] < b and a < j.bounds[d][1] for d, (a, b) in wrong.items())
    }
    assert bad and {r["id"] for r in info.value.failed} == bad
    assert recorded_jobs(prepared.version, fp) == set(prepared.todo) - bad
    assert CachePaths(cache).current() is None and not is_complete(prepared.version)
    # The next run writes the un-recorded jobs again and publishes.
    again = prepare(_request(era5_files, cache, verify_before_publish="full"))
    assert again.status == "resume" and set(again.todo) == bad
    initialise(again)
    finish(again, _jobs(again), 0.0)
    assert CachePaths(cache).current() == prepared.version


def test_workers_and_budgets(era5_files: list[Path], tmp_path: Path) -> None:
    req = _request(era5_files, tmp_path / "c.zarr")
    assert worker_note(req) == (1, None)
    limits = limits_for(req)
    assert limits.overhead == 0 and limits.min_jobs == 4
    assert limits.memory_budget == req.memory_bytes - req.reserve_bytes
    # Beside a dask worker process, 300MB leaves nothing once the interpreter reserve and the
    # worker process are counted.
    beside = _request(era5_files, tmp_path / "c.zarr", deploy_mode="dask_distributed")
    with pytest.raises(RequestError, match="leaves nothing for jobs") as info:
        limits_for(beside)
    assert info.value.parameter == "memory_limit"
    assert "deploy_mode='series'" in str(info.value)
