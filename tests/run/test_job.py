"""Unit tests of one write job (:mod:`zarr_parallel.run.job`) on real netCDF files.

Each test prepares and initialises a version through :mod:`zarr_parallel.run.steps` (the
``initialised`` fixture of tests/run/conftest.py), then runs single jobs in this process, as
series mode does, and reads back what they wrote and recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from zarr_parallel.errors import SourceChanged
from zarr_parallel.planning.jobs import Job
from zarr_parallel.planning.memory import FAST_SLABS
from zarr_parallel.run import job as job_module
from zarr_parallel.run.job import (
    FAST_READ_ENV,
    high_water_mark,
    measure_peak,
    reset_high_water_mark,
    run_job,
    slab_slices,
)
from zarr_parallel.run.job_stats import merge_stats
from zarr_parallel.run.steps import Prepared
from zarr_parallel.sources import fastread
from zarr_parallel.store.manifest import iter_job_records, recorded_jobs
from zarr_parallel.store.zarr_io import array_checksum

MiB = 2**20
Initialise = Callable[..., Prepared]


def _source(files: list[Path]) -> xr.Dataset:
    with xr.open_mfdataset([str(p) for p in files], engine="h5netcdf") as ds:
        return ds.load()


def _jobs(prepared: Prepared) -> dict[int, Job]:
    return {job.id: job for job in prepared.plan.jobs}


def _job_at(prepared: Prepared, first_step: int) -> Job:
    """The first job (by id) whose time range starts at or after ``first_step``."""
    return next(j for j in _jobs(prepared).values() if j.bounds["time"][0] >= first_step)


def _run(prepared: Prepared, job: Job, stats: bool = False) -> dict[str, Any]:
    return run_job(prepared.request_json, str(prepared.version), job.id, stats)


def _chunk_files(version: Path) -> dict[str, str]:
    """Every file of the version's arrays (the manifest aside), by relative path: its digest."""
    return {
        str(p.relative_to(version)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(version.rglob("*"))
        if p.is_file() and ".zarr-parallel" not in p.relative_to(version).parts
    }


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fast-read", "xarray-read"])
def test_job_writes_its_region_and_records_it_with_checksums(
    initialised: Initialise, era5_files: list[Path], fast: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAST_READ_ENV, fast)
    prepared = initialised()
    job = _job_at(prepared, 12)
    record = _run(prepared, job)

    # The record says what was written, and that is what the version's manifest holds.
    assert record["id"] == job.id
    assert [tuple(r) for r in record["region"]] == list(job.region)
    assert record["variables"] == list(job.variables)
    assert record["fingerprint"] == prepared.plan.fingerprint
    assert bool(record["fast_read"]) == (fast == "1"), record["fast_read"]
    assert record["pid"] == os.getpid() and record["peak_rss"] > 0
    assert list(iter_job_records(prepared.version)) == [record]
    assert recorded_jobs(prepared.version, prepared.plan.fingerprint) == {job.id}

    # The region holds the source's values; every other job's region is still unwritten.
    src = _source(era5_files)
    expected = {name: src[name].isel(job.slices).values for name in job.variables}
    assert record["bytes"] == sum(v.nbytes for v in expected.values())
    assert record["checksums"] == {n: array_checksum(v) for n, v in expected.items()}
    with xr.open_zarr(prepared.version, consolidated=False) as cache:
        for name, values in expected.items():
            np.testing.assert_array_equal(cache[name].isel(job.slices).values, values)
        for other in _jobs(prepared).values():
            if other.id != job.id:
                for name in other.variables:
                    assert np.isnan(cache[name].isel(other.slices).values).all(), other


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "in-turn"])
def test_slabs_are_written_while_the_next_is_read_only_where_reading_waits(
    initialised: Initialise,
    era5_files: list[Path],
    overlap: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the first read left idle cores (run/overlap.py says so), the next slab's read
    overlaps this one's write; where it did not, each slab is written before the next is read,
    and its buffer takes the next. Either way the region holds the source's values."""
    monkeypatch.setattr(job_module, "overlaps", lambda before, after: overlap)
    reads: dict[str, list[float]] = {}
    writes: dict[str, list[tuple[float, float]]] = {}
    read_region, write_values = fastread.read_region, job_module.write_values

    def timed_read(fv: Any, *args: Any, **kwargs: Any) -> Any:
        reads.setdefault(fv.name, []).append(time.monotonic())
        return read_region(fv, *args, **kwargs)

    def slow_write(version: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        time.sleep(0.2)  # long beside a small slab's read: an overlap cannot be missed
        result = write_values(version, name, *args, **kwargs)
        writes.setdefault(name, []).append((start, time.monotonic()))
        return result

    held: set[int] = set()
    most_held = 0
    take, give = job_module.buffers.take, job_module.buffers.give

    def counted_take(*args: Any) -> Any:
        nonlocal most_held
        array = take(*args)
        held.add(id(job_module.buffers.base_of(array)))
        most_held = max(most_held, len(held))
        return array

    def counted_give(array: Any) -> None:
        held.discard(id(job_module.buffers.base_of(array)))
        give(array)

    monkeypatch.setattr(fastread, "read_region", timed_read)
    monkeypatch.setattr(job_module, "write_values", slow_write)
    monkeypatch.setattr(job_module.buffers, "take", counted_take)
    monkeypatch.setattr(job_module.buffers, "give", counted_give)
    prepared = initialised(chunks={"time": 2}, num_jobs=2)
    job = _job_at(prepared, 0)
    record = _run(prepared, job)
    assert record["fast_read"] and sorted(writes) == sorted(reads) == sorted(job.variables)
    for name, spans in writes.items():
        spans.sort()
        assert len(spans) == len(reads[name]) >= 2, (name, spans)
        # Slab k + 1's read began before slab k's write ended, or only after it.
        during = [read < end for read, (_, end) in zip(reads[name][1:], spans, strict=False)]
        assert all(during) if overlap else not any(during), (name, during)
    # Slab buffers held at once: the one written and the one read, or one in turn.
    assert most_held == (2 if overlap else 1), most_held
    src = _source(era5_files)
    with xr.open_zarr(prepared.version, consolidated=False) as cache:
        for name in job.variables:
            np.testing.assert_array_equal(
                cache[name].isel(job.slices).values, src[name].isel(job.slices).values
            )


def test_a_job_run_again_rewrites_the_same_bytes_and_one_record(initialised: Initialise) -> None:
    prepared = initialised()
    job = _job_at(prepared, 0)
    first = _run(prepared, job)
    written = _chunk_files(prepared.version)
    second = _run(prepared, job)
    assert _chunk_files(prepared.version) == written
    assert second["checksums"] == first["checksums"] and second["bytes"] == first["bytes"]
    assert [r["id"] for r in iter_job_records(prepared.version)] == [job.id]
    assert recorded_jobs(prepared.version, prepared.plan.fingerprint) == {job.id}


def test_a_job_refuses_a_source_file_changed_since_planning(
    initialised: Initialise, own_sources: list[Path]
) -> None:
    """Only the files a job reads are checked: a job of the changed file stops before it
    writes or records anything; a job of the other files goes on."""
    prepared = initialised(own_sources)
    changed = own_sources[0]  # time steps 0-23
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reads_it, reads_others = _job_at(prepared, 0), _job_at(prepared, 24)
    with pytest.raises(SourceChanged) as info:
        _run(prepared, reads_it)
    assert Path(info.value.path).name == changed.name, str(info.value)
    assert "mtime" in info.value.change and "size" not in info.value.change, info.value.change
    assert recorded_jobs(prepared.version, prepared.plan.fingerprint) == set()
    with xr.open_zarr(prepared.version, consolidated=False) as cache:
        assert np.isnan(cache["t2m"].isel(reads_it.slices).values).all()
    _run(prepared, reads_others)
    assert recorded_jobs(prepared.version, prepared.plan.fingerprint) == {reads_others.id}


def test_job_statistics_and_their_merge(initialised: Initialise, era5_files: list[Path]) -> None:
    prepared = initialised()
    jobs = [_job_at(prepared, 0), _job_at(prepared, 36)]
    records = [_run(prepared, job, stats=True) for job in jobs]
    src = _source(era5_files)
    for job, record in zip(jobs, records, strict=True):
        values = src["t2m"].isel(job.slices).values
        stats = record["stats"]["t2m"]
        assert stats["count"] == values.size and stats["nan_count"] == 0
        assert stats["min"] == pytest.approx(float(values.min()))
        assert stats["max"] == pytest.approx(float(values.max()))
        assert stats["sum"] == pytest.approx(float(values.sum(dtype="float64")), rel=1e-9)
    both = np.concatenate([src["t2m"].isel(j.slices).values.ravel() for j in jobs])
    merged = merge_stats(records)["t2m"]
    assert merged["count"] == both.size and merged["nan_count"] == 0
    assert merged["min"] == pytest.approx(float(both.min()))
    assert merged["max"] == pytest.approx(float(both.max()))
    assert merged["mean"] == pytest.approx(float(both.mean(dtype="float64")), rel=1e-9)


def test_a_job_of_a_version_never_initialised_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no plan\.json: it was not initialised"):
        run_job("{}", str(tmp_path / "nothing.zarr"), 0)


@pytest.mark.parametrize(
    ("start", "stop", "chunk"), [(0, 60, 12), (24, 60, 12), (48, 500, 48), (0, 5, 12)]
)
def test_slabs_cover_the_region_in_whole_write_chunks(start: int, stop: int, chunk: int) -> None:
    """A job's region starts on a write chunk; its slabs are whole chunks, the last may end
    at the region's end, and there are at most FAST_SLABS of them."""
    slabs = slab_slices(slice(start, stop), chunk)
    assert slabs[0].start == start and slabs[-1].stop == stop
    assert all(a.stop == b.start for a, b in itertools.pairwise(slabs))
    assert all((s.stop - s.start) % chunk == 0 for s in slabs[:-1]), slabs
    assert all(s.start < s.stop for s in slabs)
    assert len(slabs) <= FAST_SLABS


def test_measure_peak_sees_what_the_block_held_and_nothing_more() -> None:
    with measure_peak() as idle:
        time.sleep(0.05)
    with measure_peak() as busy:
        block = np.ones(200 * MiB, dtype=np.uint8)  # touched pages: really resident
        time.sleep(0.1)
        del block
    assert idle.increase < 50 * MiB
    assert busy.increase >= 190 * MiB
    assert busy.peak >= busy.start + busy.increase


def test_measure_peak_in_a_job_process_reads_the_kernels_high_water_mark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peak shorter than the sampling interval is still seen: the kernel's own mark."""
    if not reset_high_water_mark():
        # CI's kernel (Linux >= 4.0) has /proc/self/clear_refs: there this must run.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("this kernel does not let a process reset its peak RSS")
        pytest.skip("this kernel does not let a process reset its peak RSS")
    monkeypatch.setenv("ZARR_PARALLEL_JOB_PROCESS", "1")
    threads = {t.ident for t in threading.enumerate()}
    with measure_peak() as peak:
        # The kernel's mark is exact: no sampling thread competes with the job's own.
        started = {t.ident for t in threading.enumerate()} - threads
        block = np.ones(200 * MiB, dtype=np.uint8)
        del block
    assert started == set()
    assert high_water_mark() >= peak.start + 190 * MiB
    assert peak.increase >= 190 * MiB


def test_a_prewarmed_process_has_what_its_first_job_would_import() -> None:
    """A job process warms up as it starts: the imports a first job made mid-job (``distributed``
    for xarray's client lookup, h5py and h5netcdf for the source check) are done, in a fresh
    interpreter that had none of them after importing the job module."""
    import subprocess
    import sys

    code = (
        "import sys; import zarr_parallel.run.job as j; "
        "wanted = ('distributed', 'h5py', 'h5netcdf'); "
        "before = [m for m in wanted if m in sys.modules]; "
        "j.prewarm_job_stack(); "
        "print(before, [m for m in wanted if m not in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert out == "[] []", out
