"""Re-caching: up to date → no writes; grown → append only new chunks; changed → new version.

Real netCDF4 files (copied into a folder that grows or is rewritten), real Zarr stores on disk,
the real re-cache flow under the session's Prefect API.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.artifacts import Artifact

from zarr_parallel.errors import PlanError
from zarr_parallel.examples import make_era5_like
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.orchestration.recache import recache_flow
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.plan import plan_jobs_from
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run import steps as pipeline
from zarr_parallel.run.chunk_reuse import link_unchanged
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.recache_decision import AppendPrepared, decide
from zarr_parallel.store.manifest import is_complete
from zarr_parallel.store.paths import CachePaths

STEPS = [24, 24, 12, 24, 24]  # three files cached first, then two appended
TIME_CHUNK = 24  # the cached end (60) falls inside a chunk: [48, 72) is partial


@pytest.fixture(scope="module")
def era5_all(era5_factory: Any) -> list[Path]:
    """Five consecutive files; HDF5 chunks (6, 40, 72) so target time chunks of 24 align."""
    return list(era5_factory(n_files=5, steps_per_file=STEPS, chunks=(6, 40, 72)))


def _source(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, folder / f.name)
    return folder


def _replace(new: Path, old: Path) -> None:
    """Rewrite a source file as downloaders do: a new file renamed over the old one.

    (Writing into a file that this process still has open through HDF5 is not a supported
    change: HDF5 shares one handle per open file and would read stale metadata.)
    """
    tmp = old.with_name(old.name + ".part")
    shutil.copyfile(new, tmp)
    os.replace(tmp, old)


def _request(src: Path, cache: Path, **extra: Any) -> CacheRequest:
    fields: dict[str, Any] = {
        "data_uri": str(src / "*.nc"),
        "chunks": {"time": TIME_CHUNK},
        "cache_store": str(cache),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        **extra,
    }
    return build_request(**fields)


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root``: (inode, mtime_ns, size), to count writes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            st_ = p.stat()
            out[str(p.relative_to(root))] = (st_.st_ino, st_.st_mtime_ns, st_.st_size)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _chunk_files(version: Path, name: str) -> dict[str, Path]:
    return {
        str(p.relative_to(version / name)): p
        for p in (version / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


def _without_provenance(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("zarr_parallel_")}
    return out


def _artifact(cache: Path, prefix: str = "zp-recache") -> str:
    from zarr_parallel.orchestration.tasks import artifact_key

    art = Artifact.get(artifact_key(prefix, cache))
    assert art is not None, f"no {prefix} artifact for {cache.name}"
    return str(art.data)


# ---------------------------------------------------------------------------------------------
# Planning a region from an offset (pure)


def test_plan_jobs_from_plans_only_the_tail_aligned() -> None:
    arr = ArrayInput(
        "t2m", (AxisMap.uniform("time", 108, 6), AxisMap.uniform("lat", 73, 40)), (24, 40), 4, 4
    )
    plan = plan_jobs_from([arr], Limits(memory_budget=10**6, min_jobs=2), "d", "time", 48)
    starts = sorted((r[0][1], r[0][2]) for r in (j.region for j in plan.jobs))
    covered = [t for a, b in {(a, b) for a, b in starts} for t in range(a, b)]
    assert sorted(set(covered)) == list(range(48, 108))
    assert all(a % 24 == 0 for a, _ in starts)
    with pytest.raises(ValueError, match="not on the write grid"):
        plan_jobs_from([arr], Limits(memory_budget=10**6), "d", "time", 50)
    with pytest.raises(ValueError, match="no array has the dimension 'step'"):
        plan_jobs_from([arr], Limits(memory_budget=10**6), "d", "step", 0)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    chunk=st.integers(1, 40),
    source_chunk=st.integers(1, 30),
    start_chunks=st.integers(0, 20),
    budget=st.integers(200, 20_000),
    min_jobs=st.integers(1, 6),
)
def test_plan_jobs_from_tiles_exactly_property(
    size: int, chunk: int, source_chunk: int, start_chunks: int, budget: int, min_jobs: int
) -> None:
    start = start_chunks * chunk
    if start >= size:
        start = ((size - 1) // chunk) * chunk
    arr = ArrayInput("v", (AxisMap.uniform("t", size, source_chunk),), (chunk,), 1, 1)
    try:
        plan = plan_jobs_from(
            [arr], Limits(memory_budget=budget, min_jobs=min_jobs), "", "t", start
        )
    except PlanError:  # a budget too small for one chunk is refused, as plan_jobs refuses it
        return
    seen = np.zeros(size, dtype=int)
    for job in plan.jobs:
        ((_, a, b),) = job.region
        seen[a:b] += 1
        assert a % chunk == 0 and (b % chunk == 0 or b == size)
    assert (seen[:start] == 0).all() and (seen[start:] == 1).all()


# ---------------------------------------------------------------------------------------------
# Decisions that need no writes


def test_decisions_name_what_changed(era5_all: list[Path], tmp_path: Path) -> None:
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "c.zarr"
    decision, _ = decide(_request(src, cache))
    assert decision.action == "full" and "no published cache" in decision.reason
    recache_flow(_request(src, cache))
    decision, _ = decide(_request(src, cache, chunks={"time": 12}))
    assert decision.action == "full" and "request changed (chunks" in decision.reason
    decision, _ = decide(_request(src, cache, memory_limit="400MB", num_jobs=3))
    assert decision.action == "up_to_date" and "only how the run is executed" in decision.reason
    (src / era5_all[0].name).unlink()
    decision, _ = decide(_request(src, cache))
    assert decision.action == "full" and "era5_like_000.nc are gone" in decision.reason


# ---------------------------------------------------------------------------------------------
# Unchanged, appended, repeated


@pytest.fixture(scope="module")
def appended(era5_all: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A cache of three files, then re-cached after two files were added to its source."""
    root = tmp_path_factory.mktemp("recache")
    src = _source(root / "src", era5_all[:3])
    cache = root / "era5.zarr"
    first = recache_flow(_request(src, cache))
    before = CachePaths(cache).current()
    assert before is not None
    before_hashes = _hashes(before)
    _source(src, era5_all[3:])
    check = recache_flow(_request(src, cache), check_only=True)
    after_check = _files(CachePaths(cache).versions)
    summary = recache_flow(_request(src, cache))
    yield {
        "root": root,
        "src": src,
        "cache": cache,
        "first": first,
        "before": before,
        "before_hashes": before_hashes,
        "check": check,
        "after_check": after_check,
        "summary": summary,
        "artifact": _artifact(cache),
    }


def test_unchanged_source_writes_nothing(era5_all: list[Path], tmp_path: Path) -> None:
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    first = recache_flow(_request(src, cache))
    assert first["recache"]["action"] == "full"
    before = _files(CachePaths(cache).versions)
    again = recache_flow(_request(src, cache))
    assert again["status"] == "up to date"
    assert again["recache"]["action"] == "up_to_date"
    assert again["jobs_run"] == 0 and again["bytes_written"] == 0
    assert _files(CachePaths(cache).versions) == before  # no file created, replaced or touched
    assert "Re-cache: up to date" in _artifact(cache)


def test_two_new_files_append_only_new_chunks(appended: dict, tmp_path: Path) -> None:
    cache, before = appended["cache"], appended["before"]
    # check_only decided without writing anything
    assert appended["check"]["status"] == "would append"
    summary = appended["summary"]
    assert summary["status"] == "appended"
    decision = summary["recache"]
    assert decision["action"] == "append"
    assert (decision["old_length"], decision["new_length"], decision["start"]) == (60, 108, 48)
    assert "2 new source file(s) (era5_like_003.nc, era5_like_004.nc)" in decision["reason"]
    assert "Re-cache: append" in appended["artifact"]
    after = CachePaths(cache).current()
    assert after is not None and after != before
    # Only chunks from time index 48 on are new files; earlier ones are the published inodes.
    for name in ("t2m", "d2m"):
        old_files, new_files = _chunk_files(before, name), _chunk_files(after, name)
        linked = {k for k, p in new_files.items() if k in old_files and p.samefile(old_files[k])}
        written = set(new_files) - linked
        assert {int(k.split("/")[1]) for k in linked} == {0, 1}  # c/<time>/<lat>/<lon>
        assert {int(k.split("/")[1]) for k in written} == {2, 3, 4}
        assert len(written) == 3 * 2 * 2  # time chunks 2..4 x 2 latitude x 2 longitude
    # The published version was never written to: every file has its old bytes.
    assert _hashes(before) == appended["before_hashes"]
    old = xr.open_zarr(before)
    assert old.sizes["time"] == 60  # still complete and readable
    # The appended cache equals a fresh full cache of the grown source, chunk file for chunk file.
    fresh = tmp_path / "fresh.zarr"
    cache_flow(_request(appended["src"], fresh))
    fresh_version = CachePaths(fresh).current()
    assert fresh_version is not None
    ours_ds, fresh_ds = xr.open_zarr(cache), xr.open_zarr(fresh)
    # Provenance differs by design (when written, which plan); everything else is identical.
    assert len(ours_ds.attrs["zarr_parallel_source"]) == len(STEPS)
    xr.testing.assert_identical(_without_provenance(ours_ds), _without_provenance(fresh_ds))
    for name in ("t2m", "d2m"):
        ours, theirs = _chunk_files(after, name), _chunk_files(fresh_version, name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].read_bytes() == theirs[key].read_bytes(), f"{name}/{key}"
    src = xr.open_mfdataset(sorted(appended["src"].glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(xr.open_zarr(cache).t2m.values, src.t2m.values)


def test_same_scheduled_run_twice_no_duplicate_steps(appended: dict) -> None:
    cache, src = appended["cache"], appended["src"]
    version = CachePaths(cache).current()
    files = _files(CachePaths(cache).versions)
    for _ in range(2):
        again = recache_flow(_request(src, cache))
        assert again["recache"]["action"] == "up_to_date"
    # The plain cache flow agrees: the appended version records the full plan it equals.
    assert cache_flow(_request(src, cache))["status"] == "up to date"
    assert CachePaths(cache).current() == version
    assert _files(CachePaths(cache).versions) == files
    times = xr.open_zarr(cache).time.values
    assert times.size == sum(STEPS) and np.unique(times).size == times.size
    assert (np.diff(times) > np.timedelta64(0)).all()


# ---------------------------------------------------------------------------------------------
# Files changed in place


def test_rewritten_source_file_publishes_new_version(era5_all: list[Path], tmp_path: Path) -> None:
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    recache_flow(_request(src, cache, keep_versions=2))
    old_version = CachePaths(cache).current()
    assert old_version is not None
    old_values = xr.open_zarr(cache).t2m.values
    # Rewrite the middle file: same times, different values.
    other = make_era5_like(
        tmp_path / "other", n_files=3, steps_per_file=STEPS[:3], chunks=(6, 40, 72), seed=7
    )
    _replace(other[1], src / other[1].name)
    req = _request(src, cache, keep_versions=2)
    decision, _ = decide(req)
    assert decision.action == "full"
    assert "era5_like_001.nc were rewritten" in decision.reason
    # Step through the full re-cache: until publish, the cache is the old version, whole.
    prepared = pipeline.prepare(req)
    assert prepared.status == "fresh" and prepared.version != old_version
    pipeline.initialise(prepared)
    results = [run_job(prepared.request_json, str(prepared.version), i) for i in prepared.todo]
    assert CachePaths(cache).current() == old_version
    np.testing.assert_array_equal(xr.open_zarr(cache).t2m.values, old_values)
    summary = finish(prepared, results, 0.0)
    assert CachePaths(cache).current() == prepared.version
    new = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(xr.open_zarr(cache).t2m.values, new.t2m.values)
    assert summary["status"] == "done"
    # The previous version is kept (keep_versions=2) and still reads as before.
    assert is_complete(old_version)
    np.testing.assert_array_equal(xr.open_zarr(old_version).t2m.values, old_values)


def test_rewritten_file_through_the_flow(era5_all: list[Path], tmp_path: Path) -> None:
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    recache_flow(_request(src, cache))
    old_version = CachePaths(cache).current()
    other = make_era5_like(
        tmp_path / "other", n_files=3, steps_per_file=STEPS[:3], chunks=(6, 40, 72), seed=3
    )
    _replace(other[2], src / other[2].name)
    summary = recache_flow(_request(src, cache))
    assert summary["recache"]["action"] == "full" and summary["status"] == "done"
    assert "era5_like_002.nc were rewritten" in summary["recache"]["reason"]
    assert CachePaths(cache).current() not in (None, old_version)
    assert "Re-cache: full re-cache" in _artifact(cache)
    new = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(xr.open_zarr(cache).d2m.values, new.d2m.values)


def test_last_file_grown_in_place_is_checked_and_appended(
    era5_all: list[Path], tmp_path: Path
) -> None:
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    recache_flow(_request(src, cache))
    # The last file gains the next 24 steps (as a file of the current month grows).
    last = src / era5_all[2].name
    grown = xr.concat(
        [xr.open_dataset(last).load(), xr.open_dataset(era5_all[3]).load()], dim="time"
    )
    encoding = {
        v: {"chunksizes": (6, 40, 72), "zlib": True, "complevel": 1, "shuffle": True}
        for v in ("t2m", "d2m")
    }
    grown.to_netcdf(tmp_path / "grown.nc", engine="netcdf4", encoding=encoding)
    os.replace(tmp_path / "grown.nc", last)
    summary = recache_flow(_request(src, cache))
    decision = summary["recache"]
    assert decision["action"] == "append", decision["reason"]
    assert decision["checked_files"] == [str(last)]
    assert (decision["old_length"], decision["new_length"]) == (60, 84)
    ref = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf")
    out = xr.open_zarr(cache)
    np.testing.assert_array_equal(out.time.values, ref.time.values)
    np.testing.assert_array_equal(out.t2m.values, ref.t2m.values)


# ---------------------------------------------------------------------------------------------
# The property the copy-on-write append leans on (measured on the installed zarr)


def test_zarr_local_store_rewrites_a_key_as_a_new_file(tmp_path: Path) -> None:
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(4,), chunks=(4,), dtype="i4")
    arr[:] = 1
    chunk = tmp_path / "a.zarr" / "c" / "0"
    link = tmp_path / "link"
    os.link(chunk, link)
    arr[:] = 2
    assert not chunk.samefile(link)  # a new inode: the hard-linked file keeps its bytes
    assert np.frombuffer(link.read_bytes(), dtype="u1").size > 0
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a.zarr")[:], [2, 2, 2, 2])


def _append_prepared(era5_all: list[Path], tmp_path: Path) -> tuple[Path, Path, AppendPrepared]:
    """A cache of the first three files, then two more files: the append's prepared plan."""
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    recache_flow(_request(src, cache, num_jobs=3))
    _source(src, era5_all[3:])
    decision, prepared = decide(_request(src, cache, num_jobs=3))
    assert decision.action == "append" and prepared is not None
    return src, cache, prepared


def test_interrupted_append_resumes(era5_all: list[Path], tmp_path: Path) -> None:
    src, cache, prepared = _append_prepared(era5_all, tmp_path)
    pipeline.initialise(prepared)
    link_unchanged(prepared)
    assert len(prepared.todo) >= 2
    run_job(prepared.request_json, str(prepared.version), prepared.todo[0])  # then "killed"
    summary = recache_flow(_request(src, cache, num_jobs=3))
    assert summary["status"] == "appended" and summary["resumed"]
    assert summary["jobs_skipped"] == 1
    assert CachePaths(cache).current() == prepared.version
    ref = xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf")
    np.testing.assert_array_equal(xr.open_zarr(cache).d2m.values, ref.d2m.values)


def test_an_append_that_lost_its_lock_links_nothing_and_never_remakes_its_version(
    era5_all: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-cache whose lock another run broke while it linked the published chunks, and whose
    new version that run removed, stops with LockLost and does not bring the removed version
    back (its chunk folders were made with their parents)."""
    from zarr_parallel.errors import LockLost
    from zarr_parallel.run import chunk_reuse
    from zarr_parallel.store.lock import cache_lock

    _, _, prepared = _append_prepared(era5_all, tmp_path)
    lock, real = prepared.paths.lock, chunk_reuse.check_lock_token
    calls: list[str] = []

    def broken_just_after(path: Path, token: str, before: str) -> None:
        real(path, token, before)
        if not calls:  # the other run breaks the lock and removes the version right after
            lock.write_text(lock.read_text().replace(token, "another run's token"))
            shutil.rmtree(prepared.version)
        calls.append(before)

    with cache_lock(lock):
        pipeline.initialise(prepared)
        monkeypatch.setattr(chunk_reuse, "check_lock_token", broken_just_after)
        with pytest.raises(LockLost, match="no longer holds the lock"):
            link_unchanged(prepared)
        assert not prepared.version.exists()
        assert calls == ["linking the chunks of t2m"]


def test_tiled_cache_appends_like_a_fresh_one(era5_all: list[Path], tmp_path: Path) -> None:
    tiles = {"latitude": 40, "longitude": 72, "edge": "pad"}
    src = _source(tmp_path / "src", era5_all[:3])
    cache, fresh = tmp_path / "tiled.zarr", tmp_path / "fresh.zarr"
    recache_flow(_request(src, cache, tiles=tiles))
    _source(src, era5_all[3:])
    summary = recache_flow(_request(src, cache, tiles=tiles))
    assert summary["recache"]["action"] == "append", summary["recache"]["reason"]
    cache_flow(_request(src, fresh, tiles=tiles))
    ours, theirs = CachePaths(cache).current(), CachePaths(fresh).current()
    assert ours is not None and theirs is not None
    xr.testing.assert_identical(
        _without_provenance(xr.open_zarr(cache)), _without_provenance(xr.open_zarr(fresh))
    )
    for name in ("t2m", "d2m"):
        a, b = _chunk_files(ours, name), _chunk_files(theirs, name)
        assert a.keys() == b.keys()
        assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)


def test_time_series_cache_grown_is_a_full_run_that_says_so(
    era5_all: list[Path], tmp_path: Path
) -> None:
    """One chunk spans every cached step: an append would rewrite every chunk (design §3.4)."""
    src = _source(tmp_path / "src", era5_all[:3])
    cache = tmp_path / "era5.zarr"
    recache_flow(_request(src, cache, chunks={"time": -1}))
    _source(src, era5_all[3:])
    decision, prepared = decide(_request(src, cache, chunks={"time": -1}))
    assert decision.action == "full" and prepared is None
    assert "an append would rewrite every chunk" in decision.reason
