"""A source that changes during a run fails the run; the published version stays.

On the old code a file replaced after job 1 of 4 was recorded gave a published cache half old,
half new with exit 0, and a Zarr source rewritten in place (metadata untouched) was reported
"up to date". Runs here are real CLI processes frozen (SIGSTOP) after their first job record
(``ZARR_PARALLEL_FAULT=stop@job-recorded#1``); the test changes the source, lets the run go on
(SIGCONT) and checks the exit code, the message and that the published version's bytes are
those it had before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from core_support import frozen_run
from sources_support import kerchunk_refs
from zarr_parallel.api import run_request
from zarr_parallel.errors import SourceChanged
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import make_plan
from zarr_parallel.sources.identity import check_identity, job_entries
from zarr_parallel.sources.source import open_source
from zarr_parallel.store.manifest import iter_job_records, plan_record
from zarr_parallel.store.paths import CachePaths

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}


def _tree_digest(path: Path) -> str:
    """SHA-256 over every file's relative name and bytes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _copy_files(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        shutil.copy(f, folder / f.name)
        out.append(folder / f.name)
    return out


def _make_source(kind: str, era5_files: list[Path], tmp_path: Path) -> tuple[str, list[Path]]:
    """A private source of ``kind`` (its data_uri) and the netCDF files behind it."""
    files = _copy_files(era5_files, tmp_path / "src")
    if kind == "netcdf":
        return "", files
    if kind == "zarr":
        store = tmp_path / "src" / "era5.zarr"
        with xr.open_mfdataset(files, combine="by_coords") as ds:
            ds.chunk(CHUNKS).to_zarr(store, consolidated=False)
        return str(store), files
    refs = tmp_path / "src" / "era5.json"
    refs.write_text(json.dumps(kerchunk_refs(files, str(tmp_path / "src"))))
    return str(refs), files


def _fields(data_uri: str | list[str], store: Path, **extra: Any) -> dict[str, Any]:
    return {
        "data_uri": data_uri,
        "chunks": CHUNKS,
        "cache_store": str(store),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 4,
        "retries": 0,
        **extra,
    }


def _replace(path: Path, change: Callable[[xr.Dataset], xr.Dataset]) -> None:
    """Write a changed copy of a netCDF file beside it and rename it over the original."""
    tmp = path.with_suffix(".new")
    with xr.open_dataset(path) as ds:
        change(ds.load()).to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)


def _warmer(ds: xr.Dataset) -> xr.Dataset:
    return ds.assign(t2m=ds.t2m + 1.0)


def _frozen_then_changed(
    fields: dict[str, Any],
    tmp_path: Path,
    change: Callable[[], None],
    point: str = "job-recorded#1",
) -> tuple[int, str]:
    """Run the CLI, freeze it at the fault ``point`` (after its first job record), ``change()``,
    let it go on.

    Returns the exit code and stderr.
    """
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(fields))
    with frozen_run(request, point) as run:
        change()
        os.kill(run.pid, signal.SIGCONT)
        _, err = run.communicate(timeout=300)
    return run.returncode, err


def _published(store: Path) -> tuple[Path, str]:
    return store.resolve(), _tree_digest(store.resolve())


@pytest.mark.parametrize("which", ["later", "after_all_jobs"])
def test_file_replaced_after_job_1_of_4_fails_and_keeps_the_published_version(
    era5_files: list[Path], tmp_path: Path, which: str
) -> None:
    """``later``: after job 1 of 4 is recorded, the file a later job reads is replaced (that
    job's check stops the run). ``after_all_jobs``: every job is recorded when the first file is
    replaced (only the check before publishing can stop the run)."""
    files = _copy_files(era5_files, tmp_path / "src")
    store = tmp_path / "out" / "era5.zarr"
    uris = [str(f) for f in files]
    run_request(build_request(**_fields(uris, store, add_attrs={"run": 1})))
    before = _published(store)
    victim = files[-1] if which == "later" else files[0]
    code, err = _frozen_then_changed(
        _fields(uris, store, add_attrs={"run": 2}),
        tmp_path,
        lambda: _replace(victim, _warmer),
        "job-recorded#1" if which == "later" else "before-finalise",
    )
    assert code == 1, err
    assert victim.name in err and "run failed: the source" in err
    assert "inode" in err or "mtime_ns" in err
    assert _published(store) == before
    staging = [v for v in CachePaths(store).all_versions() if v != before[0]]
    (version,) = staging
    recorded = {r["id"] for r in iter_job_records(version)}
    jobs = len((plan_record(version) or {})["job_list"])
    if which == "later":
        assert 1 <= len(recorded) < jobs  # stopped part-way
    else:
        assert len(recorded) == jobs  # every job ran; the publish was refused


def test_a_file_that_grows_during_the_run_fails_it(era5_files: list[Path], tmp_path: Path) -> None:
    files = _copy_files(era5_files, tmp_path / "src")
    store = tmp_path / "out" / "era5.zarr"

    def grow() -> None:
        with open(files[-1], "ab") as f:
            f.write(b"\0" * 4096)

    code, err = _frozen_then_changed(_fields([str(f) for f in files], store), tmp_path, grow)
    assert code == 1, err
    assert files[-1].name in err and "size:" in err
    assert not store.exists()


def test_a_new_file_matching_the_glob_is_not_a_change(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """The run caches the files it planned; the next re-cache appends the new one."""
    files = _copy_files(era5_files[:2], tmp_path / "src")
    store = tmp_path / "out" / "era5.zarr"
    pattern = str(tmp_path / "src" / "*.nc")

    def add() -> None:
        shutil.copy(era5_files[2], tmp_path / "src" / era5_files[2].name)

    code, err = _frozen_then_changed(_fields(pattern, store), tmp_path, add)
    assert code == 0, err
    with xr.open_zarr(store) as cache, xr.open_mfdataset(files) as src:
        assert cache.sizes["time"] == src.sizes["time"]


def _rewrite_zarr_chunk(store: str) -> None:
    """Rewrite the last time chunk of t2m in place: chunk files only, metadata untouched."""
    arr = zarr.open_array(os.path.join(store, "t2m"), mode="r+")
    arr[-12:] = np.asarray(arr[-12:]) + 1.0


def _grow_referenced_file(files: list[Path]) -> Callable[[], None]:
    def grow() -> None:
        with open(files[-1], "ab") as f:
            f.write(b"\0" * 4096)

    return grow


@pytest.mark.parametrize("kind", ["netcdf", "zarr", "kerchunk"])
def test_a_change_between_jobs_is_detected_for_each_source_kind(
    era5_files: list[Path], tmp_path: Path, kind: str
) -> None:
    data_uri, files = _make_source(kind, era5_files, tmp_path)
    store = tmp_path / "out" / "era5.zarr"
    if kind == "netcdf":
        change, expected = (lambda: _replace(files[-1], _warmer)), files[-1].name
    elif kind == "zarr":
        change, expected = (lambda: _rewrite_zarr_chunk(data_uri)), "era5.zarr/t2m"
    else:
        change, expected = _grow_referenced_file(files), files[-1].name
    uri: str | list[str] = data_uri or [str(f) for f in files]
    code, err = _frozen_then_changed(_fields(uri, store), tmp_path, change)
    assert code == 1, err
    assert expected in err and "run failed: the source" in err
    assert "write jobs failed" not in err  # not "resume to write the rest": it would not help
    assert not store.exists()


def test_zarr_source_rewritten_in_place_is_cached_again(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Same process, same request: the rewritten chunk must reach the cache."""
    data_uri, _ = _make_source("zarr", era5_files, tmp_path)
    store = tmp_path / "out" / "era5.zarr"
    fields = _fields(data_uri, store)
    first = run_request(build_request(**fields))
    assert first.status == "done"
    meta = {p: p.stat().st_mtime_ns for p in Path(data_uri).rglob("zarr.json")}
    time.sleep(0.01)
    _rewrite_zarr_chunk(data_uri)
    assert {p: p.stat().st_mtime_ns for p in Path(data_uri).rglob("zarr.json")} == meta
    second = run_request(build_request(**fields))
    assert second.status == "done" and second.summary["jobs_run"] > 0
    assert store.resolve() != Path(first.summary["version"]).resolve()
    with xr.open_zarr(store) as cache, xr.open_zarr(data_uri, consolidated=False) as src:
        np.testing.assert_array_equal(cache.t2m.values, src.t2m.values)


def test_fingerprint_ignores_the_order_of_variables_and_files(
    era5_files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "c.zarr")
    uris = [str(f) for f in era5_files]
    plans = [
        make_plan(build_request(**_fields(u, Path(store), variables=v)))[1]
        for u, v in (
            (uris, {"t2m": [], "d2m": []}),
            (uris, {"d2m": [], "t2m": []}),
            (uris[::-1], {"d2m": [], "t2m": []}),
        )
    ]
    assert len({(p.fingerprint, p.content_fingerprint) for p in plans}) == 1
    assert len({tuple(j.variables for j in p.jobs) for p in plans}) == 1


def test_jobs_check_only_the_files_they_read(era5_files: list[Path], tmp_path: Path) -> None:
    """A multi-file job checks the files overlapping its steps (stat calls, nothing else)."""
    files = _copy_files(era5_files, tmp_path / "src")
    req = build_request(**_fields([str(f) for f in files], tmp_path / "c.zarr"))
    planned = open_source(req).layout.to_json()
    assert job_entries(planned, None, ["t2m"], (0, 12)) == [str(files[0])]
    assert job_entries(planned, None, ["t2m"], (12, 36)) == [str(files[0]), str(files[1])]
    assert job_entries(planned, None, ["t2m"], None) == [str(f) for f in files]
    _replace(files[2], _warmer)
    # Job 1's files are unchanged; the full check (before publishing) sees the change.
    assert check_identity(planned["identity"], job_entries(planned, None, ["t2m"], (0, 12)), _no)
    with pytest.raises(SourceChanged, match=files[2].name) as info:
        check_identity(planned["identity"], None, _no)
    assert info.value.path == str(files[2])


def _no(name: str, planned: Any) -> dict[str, Any]:
    raise AssertionError(f"no remote entry expected, got {name}")


def test_source_changed_keeps_its_fields_across_processes() -> None:
    """Jobs run in other processes (dask workers, job processes): the error is pickled."""
    import pickle

    from zarr_parallel.errors import RunFailed

    error = pickle.loads(pickle.dumps(SourceChanged("/data/a.nc", "size: 1 → 2")))
    assert isinstance(error, RunFailed)
    assert (error.path, error.change) == ("/data/a.nc", "size: 1 → 2")
    assert "/data/a.nc changed while the run was copying it (size: 1 → 2)" in str(error)


def test_remote_files_are_identified_by_what_the_server_reports(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Over real HTTP: a served netCDF file that grows, and a kerchunk reference rewritten on
    the server, are changes (one HEAD request per entry)."""
    from sources_support import serve_http
    from zarr_parallel.sources.identity import check_sources

    root = tmp_path / "www"
    files = _copy_files(era5_files, root)
    with serve_http(root) as svc:
        (root / "era5.json").write_text(json.dumps(kerchunk_refs(files, svc.url)))
        store = tmp_path / "c.zarr"
        netcdf = build_request(**_fields([f"{svc.url}/{f.name}" for f in files], store))
        kerchunk = build_request(**_fields(f"{svc.url}/era5.json", store))
        planned = {
            "netcdf": open_source(netcdf).layout.identity,
            "kerchunk": open_source(kerchunk).layout.identity,
        }
        assert check_sources(netcdf, planned["netcdf"]) == 3
        # The reference and the three files it points at (one HEAD each).
        assert check_sources(kerchunk, planned["kerchunk"]) == 4
        with open(files[1], "ab") as f:
            f.write(b"\0" * 100)
        with pytest.raises(SourceChanged, match=rf"{files[1].name} changed .*size") as info:
            check_sources(netcdf, planned["netcdf"])
        assert info.value.path == f"{svc.url}/{files[1].name}"
        refs = json.loads((root / "era5.json").read_text())
        refs["refs"][".zattrs"] = json.dumps({"edited": "yes"})
        (root / "era5.json").write_text(json.dumps(refs))
        with pytest.raises(SourceChanged, match=r"era5\.json changed"):
            check_sources(kerchunk, planned["kerchunk"])


def _flip_chunk(refs: dict[str, Any], key: str, root: Path) -> Callable[[], None]:
    """Overwrite the bytes of one referenced chunk in place: same size, the data changed."""

    def flip() -> None:
        url, offset, length = refs["refs"][key]
        with open(root / url.rsplit("/", 1)[-1], "r+b") as f:
            f.seek(offset)
            data = f.read(length)
            f.seek(offset)
            f.write(bytes(255 - b for b in data))

    return flip


def test_a_remote_file_behind_a_reference_changed_between_jobs_fails_the_run(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Over real HTTP (the server sends ETag and Last-Modified): a file the kerchunk reference
    points at is rewritten in place, same size, after job 1 is recorded; the job that reads it
    stops the run (exit 1, naming the URL) and the version published before stays, byte for
    byte. Before, only the reference itself was identified: the run read the changed bytes."""
    from sources_support import serve_http

    root = tmp_path / "www"
    files = _copy_files(era5_files, root)
    with serve_http(root, versions=True) as svc:
        refs = kerchunk_refs(files, svc.url)
        (root / "era5.json").write_text(json.dumps(refs))
        uri = f"{svc.url}/era5.json"
        store = tmp_path / "out" / "era5.zarr"
        older = _fields(uri, store, chunks={**CHUNKS, "time": 24})
        assert run_request(build_request(**older)).status == "done"
        before = _published(store)
        last = max((k for k in refs["refs"] if k.startswith("t2m/")), key=lambda k: k.split("/")[1])
        assert files[-1].name in refs["refs"][last][0]
        code, err = _frozen_then_changed(
            _fields(uri, store), tmp_path, _flip_chunk(refs, last, root)
        )
    assert code == 1, err[-3000:]
    assert f"{svc.url}/{files[-1].name} changed" in err and "ETag" in err
    assert "run failed: the source" in err
    assert _published(store) == before


def test_a_job_checks_the_remote_files_holding_its_chunks(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Remote referenced files are entries of their own; a job's entries are the reference and
    the files holding the source chunks of its region (by chunk key), not every file."""
    from sources_support import serve_http
    from zarr_parallel.sources.source import open_source as open_fresh

    root = tmp_path / "www"
    files = _copy_files(era5_files, root)
    with serve_http(root, versions=True) as svc:
        refs = kerchunk_refs(files, svc.url)
        (root / "era5.json").write_text(json.dumps(refs))
        req = build_request(**_fields(f"{svc.url}/era5.json", tmp_path / "c.zarr"))
        planned = open_fresh(req).layout.to_json()
        urls = [f"{svc.url}/{f.name}" for f in files]
        assert set(planned["identity"]["entries"]) == {f"{svc.url}/era5.json", *urls}
        t2m = planned["variables"]["t2m"]
        steps = t2m["chunks"][t2m["dims"].index("time")][-1]  # HDF5 chunks of 6 steps
        first_day = {"t2m": {"time": (0, 24 // steps)}}
        assert job_entries(planned, refs, ["t2m"], None, first_day) == [
            f"{svc.url}/era5.json",
            urls[0],
        ]
        last_steps = {"t2m": {"time": (48 // steps, 60 // steps)}}
        assert job_entries(planned, refs, ["t2m"], None, last_steps)[1:] == [urls[2]]
        assert job_entries(planned, refs, ["t2m"], None, None)[1:] == sorted(urls)


def test_a_remote_zarr_chunk_rewritten_between_jobs_fails_the_run(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A Zarr store over HTTP: per array its metadata documents and a sample of chunk files
    (first, last, evenly spaced) are identified. The last time steps rewritten in place, the
    metadata untouched, after job 1: the job reading the last chunk stops the run. Before, a
    remote store was identified by its root metadata only, and the run published the mix."""
    from sources_support import serve_http

    root = tmp_path / "www"
    src = root / "era5.zarr"
    with xr.open_mfdataset(era5_files, combine="by_coords") as ds:
        ds.chunk(CHUNKS).to_zarr(src, consolidated=True)
    with serve_http(root, versions=True) as svc:
        uri = f"{svc.url}/era5.zarr"
        store = tmp_path / "out" / "era5.zarr"
        older = _fields(uri, store, chunks={**CHUNKS, "time": 24})
        assert run_request(build_request(**older)).status == "done"
        before = _published(store)
        planned = plan_record(store.resolve())
        assert planned is not None
        entries = planned["layout"]["identity"]["entries"]
        assert f"{uri}/t2m/zarr.json" in entries and f"{uri}/t2m/c/4/1/1" in entries
        code, err = _frozen_then_changed(
            _fields(uri, store), tmp_path, lambda: _rewrite_zarr_chunk(str(src))
        )
    assert code == 1, err[-3000:]
    assert f"{uri}/t2m/c/4/" in err and "run failed: the source" in err
    assert _published(store) == before


@pytest.mark.timeout(600)
def test_dask_distributed_job_process_reports_the_change(
    era5_files: list[Path], tmp_path: Path, fault_plugins: Path
) -> None:
    """In a job process of a dask worker: the first job is held (``test_hold``) while a file a
    later job reads is replaced; that job's check fails the run with SourceChanged."""
    import threading

    from deploy_helpers import hold_spec, run_cache, started_lines

    files = _copy_files(era5_files, tmp_path / "src")
    spec, marker, started = hold_spec(tmp_path, index=0)
    store = tmp_path / "out" / "era5.zarr"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            run_cache(
                files,
                store,
                deploy_mode="dask_distributed",
                simultaneous_worker_limit=1,
                retries=0,
                preprocessors=[spec],
            )
        except Exception as e:  # the outcome is checked below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.time() + 300
        while not started_lines(started):
            assert thread.is_alive() and time.time() < deadline, outcome
            time.sleep(0.1)
        _replace(files[-1], _warmer)
    finally:
        marker.unlink()
        thread.join(300)
    error = outcome.get("error")
    assert isinstance(error, SourceChanged), error
    assert error.path == str(files[-1])
    assert not store.exists()
