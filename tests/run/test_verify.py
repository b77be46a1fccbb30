"""Verification: a sound cache passes; a corrupted, a rewritten or a deleted chunk is caught."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr

from core_support import frozen_run, series_fields
from zarr_parallel.api import run_request
from zarr_parallel.orchestration.command import main
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run.verify import cache_differences, verify_cache

CHUNKS = {"time": 12, "latitude": 40, "longitude": 72}


def _fields(files: list[Path], store: Path, **extra: Any) -> dict[str, Any]:
    return series_fields(files, store, **{"chunks": CHUNKS, **extra})


@pytest.fixture(scope="module")
def built(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published cache of the shared three-file source (never modified: tests copy it)."""
    store = tmp_path_factory.mktemp("verify") / "era5.zarr"
    run_request(build_request(**_fields(era5_files, store)))
    return store


@pytest.fixture
def cache(built: Path, era5_files: list[Path], tmp_path: Path) -> tuple[CacheRequest, Path]:
    """A private copy of the built cache and the request that points at it."""
    shutil.copytree(built.parent, tmp_path / "c", symlinks=True)
    store = tmp_path / "c" / built.name
    return build_request(**_fields(era5_files, store)), store.resolve()


def _kinds(report: Any, variable: str) -> set[str]:
    return {p.kind for p in report.problems if p.variable == variable}


def test_sound_cache_passes(cache: tuple[CacheRequest, Path]) -> None:
    req, _ = cache
    report = verify_cache(req)
    assert report.ok, report.text()
    assert report.mode == "full"
    assert report.chunks_compared == report.chunks_total > 0
    assert report.chunk_files_present == report.chunk_files
    assert report.jobs_recorded == report.jobs > 0
    assert "result    OK" in report.text()


def test_corrupted_chunk_is_caught(cache: tuple[CacheRequest, Path]) -> None:
    req, version = cache
    chunk = version / "t2m" / "c" / "1" / "1" / "0"  # time 12:24, latitude 40:80, longitude 0:72
    raw = bytearray(chunk.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 16):
        raw[i] ^= 0xA5
    chunk.write_bytes(bytes(raw))
    report = verify_cache(req)
    assert not report.ok
    bad = [p for p in report.problems if p.variable == "t2m" and p.kind in ("values", "unreadable")]
    assert bad, report.text()
    assert {p.region for p in bad} == {
        (("time", 12, 24), ("latitude", 40, 73), ("longitude", 0, 72))
    }
    assert "checksum" in _kinds(report, "t2m")
    assert not _kinds(report, "d2m")


def test_silently_rewritten_chunk_is_caught(cache: tuple[CacheRequest, Path]) -> None:
    """A chunk that decodes fine but holds other values (no decoding error to notice)."""
    req, version = cache
    arr = zarr.open_array(version, path="d2m", mode="r+")
    arr[24:36, 0:40, 72:144] = np.float32(0.0)
    report = verify_cache(req)
    values = [p for p in report.problems if p.kind == "values"]
    assert [(p.variable, p.region) for p in values] == [
        ("d2m", (("time", 24, 36), ("latitude", 0, 40), ("longitude", 72, 144)))
    ]
    assert "34560 of 34560 values differ" in values[0].message


def test_changed_or_lost_attributes_are_caught(cache: tuple[CacheRequest, Path]) -> None:
    """Attributes are part of the cache: a changed unit or a lost global attribute is reported."""
    req, version = cache
    t2m = zarr.open_array(version, path="t2m", mode="r+")
    assert t2m.attrs["units"] == "K"  # the source's
    t2m.attrs["units"] = "degC"
    root = zarr.open_group(version, mode="r+")
    lost = next(k for k in root.attrs if not k.startswith(("zarr", "_")))
    del root.attrs[lost]
    zarr.consolidate_metadata(version)  # as published: verify reads the consolidated copy
    report = verify_cache(req)
    meta = [(p.variable, p.message) for p in report.problems if p.kind == "metadata"]
    assert ("t2m", "attribute 'units' is 'degC' in the cache, 'K' from the source") in meta
    assert (None, f"dataset attribute {lost!r} is not in the cache") in meta
    assert len(meta) == 2, meta


def test_deleted_chunk_is_caught(cache: tuple[CacheRequest, Path]) -> None:
    req, version = cache
    (version / "d2m" / "c" / "4" / "0" / "1").unlink()
    report = verify_cache(req)
    missing = [p for p in report.problems if p.kind == "missing"]
    assert [(p.variable, p.region) for p in missing] == [
        ("d2m", (("time", 48, 60), ("latitude", 0, 40), ("longitude", 72, 144)))
    ]
    assert "d2m/c/4/0/1 is missing" in missing[0].message
    assert report.chunk_files_present == report.chunk_files - 1


def test_missing_job_record_and_leftover_temporary_file(cache: tuple[CacheRequest, Path]) -> None:
    req, version = cache
    jobs = sorted((version / ".zarr-parallel" / "jobs").glob("*.json"))
    jobs[0].unlink()
    (version / "t2m" / "c" / "0.abc.partial").write_bytes(b"x")
    report = verify_cache(req)
    kinds = [p.kind for p in report.problems]
    assert "manifest" in kinds and "extra" in kinds
    manifest = next(p for p in report.problems if p.kind == "manifest")
    assert "job 0 is not recorded" in manifest.message
    assert report.jobs_recorded == report.jobs - 1


def test_sample_is_seeded_and_catches_sampled_damage(cache: tuple[CacheRequest, Path]) -> None:
    req, version = cache
    first = verify_cache(req, mode="sample", sample_chunks=5, seed=7)
    again = verify_cache(req, mode="sample", sample_chunks=5, seed=7)
    assert first.ok and again.ok
    assert first.mode == "sample" and first.chunks_compared == 10  # 5 per variable
    assert first.chunks_total == 40
    # Damage every t2m chunk: any sample finds it, and reports only sampled chunks.
    arr = zarr.open_array(version, path="t2m", mode="r+")
    arr[:] = np.float32(-1.0)
    report = verify_cache(req, mode="sample", sample_chunks=5, seed=7)
    assert len([p for p in report.problems if p.kind == "values"]) == 5
    assert _kinds(report, "d2m") == set()


def test_auto_samples_large_caches(cache: tuple[CacheRequest, Path]) -> None:
    req, _ = cache
    report = verify_cache(req, full_bytes=1000, sample_chunks=3)
    assert report.mode == "sample" and report.chunks_compared == 6 and report.ok


def test_changed_source_is_reported_stale(
    era5_factory: Any, tmp_path: Path, era5_files: list[Path]
) -> None:
    files = [Path(shutil.copy(p, tmp_path)) for p in era5_files]
    req = build_request(**_fields(files, tmp_path / "out" / "c.zarr"))
    run_request(req)
    os.utime(files[1], ns=(0, files[1].stat().st_mtime_ns + 10**9))
    report = verify_cache(req)
    stale = [p for p in report.problems if p.kind == "stale"]
    assert stale and "source files changed" in stale[0].message
    # The values themselves still match: only the staleness is reported.
    assert [p.kind for p in report.problems] == ["stale"]


def test_verify_waits_for_no_run(cache: tuple[CacheRequest, Path]) -> None:
    """Verifying while a live run holds the cache's lock is refused, naming the holder."""
    from zarr_parallel.errors import CacheLocked
    from zarr_parallel.run.steps import run_lock

    req, _ = cache
    # writes=False: the cache here is a copy, which a writing run would refuse to touch.
    with run_lock(req, writes=False), pytest.raises(CacheLocked, match=f"pid {os.getpid()}"):
        verify_cache(req)
    # Released: verification runs, and leaves no lock behind.
    assert verify_cache(req).ok
    assert not Path(str(req.cache_store) + ".lock").exists()


def test_no_cache_yet(era5_files: list[Path], tmp_path: Path) -> None:
    report = verify_cache(build_request(**_fields(era5_files, tmp_path / "none.zarr")))
    assert not report.ok and "no published cache" in report.problems[0].message


def test_cli_verify_exit_codes(
    cache: tuple[CacheRequest, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req, version = cache
    path = tmp_path / "request.yaml"
    path.write_text(yaml.safe_dump(req.model_dump(mode="json", exclude_defaults=True)))
    assert main(["verify", str(path)]) == 0
    assert "result    OK" in capsys.readouterr().out
    (version / "t2m" / "c" / "0" / "0" / "0").unlink()
    assert main(["verify", str(path), "--verify-mode", "sample", "--sample", "100"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "t2m [time 0:12, latitude 0:40, longitude 0:72]" in out


def test_cache_differences(built: Path, cache: tuple[CacheRequest, Path]) -> None:
    _, version = cache
    assert cache_differences(built, version) == []
    # Sidecars and root metadata are not part of byte identity.
    (version / ".zarr-parallel" / "complete.json").write_text("{}")
    assert cache_differences(built, version) == []
    chunk = version / "t2m" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes() + b"\0")
    (version / "t2m" / "c" / "0" / "0" / "0.partial").write_bytes(b"")
    assert cache_differences(built, version) == [
        f"only in {version}: t2m/c/0/0/0.partial",
        "differs: t2m/c/0/0/0",
    ]


def test_verify_before_publish_passes_a_sound_run(era5_files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    result = run_request(build_request(**_fields(era5_files, store), verify_before_publish="full"))
    assert result.status == "done" and verify_cache(build_request(**_fields(era5_files, store))).ok


def test_verify_before_publish_refuses_damage_and_the_rerun_repairs_it(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A chunk damaged after its job was recorded: the version is not published, the job is
    un-recorded, and the next run writes only that job."""
    store = tmp_path / "out" / "c.zarr"
    fields = {**_fields(era5_files, store), "verify_before_publish": "full", "retries": 0}
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(fields))
    with frozen_run(request, "before-finalise") as proc:
        (staging,) = [v for v in (tmp_path / "out" / "c.zarr.versions").iterdir() if v.is_dir()]
        zarr.open_array(staging, path="t2m", mode="r+")[0:12, 0:40, 0:72] = np.float32(1.0)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "does not match its source, so it was not published" in err
    assert "t2m [time 0:12, latitude 0:40, longitude 0:72]" in err
    assert not store.exists()
    result = run_request(build_request(**fields))
    assert result.summary["resumed"] and result.summary["jobs_run"] == 1
    assert verify_cache(build_request(**fields)).ok
