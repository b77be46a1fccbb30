"""Sources on S3: a real S3-compatible server (moto's) on loopback, with authentication enforced.

Credentials come from the environment only. The tests look for them everywhere a run leaves
text behind: every file of the cache (manifest and plan.json included), every log record (at
DEBUG, botocore included), the Prefect flow-run parameters, logs and artifacts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
import s3fs
import xarray as xr

from sources_support import (
    CHUNKS,
    RUN,
    S3Service,
    assert_same_cache,
    kerchunk_refs,
    local_reference_cache,
    serve_s3,
)
from zarr_parallel import RequestError, ZarrParallelAssembler
from zarr_parallel.sources.target import clear_source_cache

BUCKET = "era5-archive"


@pytest.fixture(scope="module")
def s3(
    era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The ERA5-like files and their kerchunk JSON in a bucket; AWS credentials in the env."""
    folder = tmp_path_factory.mktemp("s3")
    with serve_s3(folder / "moto.log") as svc, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", svc.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", svc.secret_key)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=svc.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for f in era5_files:
            client.upload_file(str(f), BUCKET, f"netcdf/{f.name}")
        refs = kerchunk_refs(era5_files, f"s3://{BUCKET}/netcdf")
        client.put_object(Bucket=BUCKET, Key="era5.json", Body=json.dumps(refs).encode())
        yield {"svc": svc, "files": era5_files, "mp": mp}


def _options(svc: S3Service) -> dict[str, Any]:
    return {"s3": {"endpoint_url": svc.endpoint}}


def _secrets(svc: S3Service) -> list[str]:
    return [svc.secret_key, svc.access_key]


@contextmanager
def every_log_record() -> Iterator[list[logging.LogRecord]]:
    """Every log record created in this process, at DEBUG, whatever handlers Prefect set up.

    Records are collected where they are made (the log record factory), so loggers that do
    not propagate to the root are included; they are formatted (with tracebacks) at the end.
    """
    records: list[logging.LogRecord] = []
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        records.append(record)
        return record

    levels = {name: logging.getLogger(name).level for name in ("", "botocore", "s3fs", "fsspec")}
    logging.setLogRecordFactory(factory)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logging.setLogRecordFactory(previous)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _formatted(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(message)s")
    return "\n".join(formatter.format(r) for r in records)


def _assert_nowhere(secrets: list[str], folder: Path, text: str) -> None:
    """No secret in any file under ``folder``, in ``text``, or in Prefect's records."""
    from prefect.client.orchestration import get_client

    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"a credential is stored in {path}"
    for s in secrets:
        assert s not in text, "a credential is in the log"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        assert runs
        stored = json.dumps([r.parameters for r in runs], default=str)
        stored += json.dumps([a.data for a in client.read_artifacts()], default=str)
        stored += json.dumps([log.message for log in client.read_logs()], default=str)
    for s in secrets:
        assert s not in stored, "a credential is stored in Prefect"


def test_kerchunk_on_s3_equals_local_and_keeps_credentials_out(
    s3: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    svc: S3Service = s3["svc"]
    local = local_reference_cache(s3["files"], tmp_path_factory.mktemp("local"))
    with every_log_record() as records:
        result = ZarrParallelAssembler(
            f"s3://{BUCKET}/era5.json", chunks=CHUNKS, storage_options=_options(svc)
        ).cache(cache_store=str(tmp_path / "s3.zarr"), generate_stats=True, **RUN)
    assert_same_cache(result.path, local)
    assert xr.open_zarr(result.path).attrs["zarr_parallel_source"] == f"s3://{BUCKET}/era5.json"
    out, err = capfd.readouterr()
    logged = _formatted(records)
    # The S3 client's own debug log was captured, and it did sign with the access key.
    assert "botocore" in logged and "Authorization" in logged
    _assert_nowhere(_secrets(svc), tmp_path, logged + out + err)


def test_netcdf_glob_on_s3_with_env_references(
    s3: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """``${NAME}`` references in storage_options, expanded from the environment where used."""
    svc: S3Service = s3["svc"]
    mp: pytest.MonkeyPatch = s3["mp"]
    local = local_reference_cache(s3["files"], tmp_path_factory.mktemp("local"))
    with pytest.MonkeyPatch.context() as inner:
        inner.delenv("AWS_ACCESS_KEY_ID")
        inner.delenv("AWS_SECRET_ACCESS_KEY")
        inner.setenv("ARCHIVE_KEY_ID", svc.access_key)
        inner.setenv("ARCHIVE_SECRET", svc.secret_key)
        options = {
            "s3": {
                "endpoint_url": svc.endpoint,
                "key": "${ARCHIVE_KEY_ID}",
                "secret": "${ARCHIVE_SECRET}",
            }
        }
        clear_source_cache()
        result = ZarrParallelAssembler(
            f"s3://{BUCKET}/netcdf/era5_like_*.nc", chunks=CHUNKS, storage_options=options
        ).cache(cache_store=str(tmp_path / "nc.zarr"), **RUN)
    assert mp is not None
    assert_same_cache(result.path, local)
    plan = json.loads((result.path / ".zarr-parallel" / "plan.json").read_text())
    assert plan["request"]["storage_options"]["s3"]["secret"] == "${ARCHIVE_SECRET}"
    _assert_nowhere(_secrets(svc), tmp_path, "")


def test_wrong_or_literal_credentials_are_refused_without_showing_them(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    svc: S3Service = s3["svc"]
    literal = {"s3": {"endpoint_url": svc.endpoint, "secret": svc.secret_key}}
    with pytest.raises(RequestError, match=r"storage_options\.s3\.secret='\*\*\*'") as e:
        ZarrParallelAssembler(f"s3://{BUCKET}/era5.json", storage_options=literal)
    assert svc.secret_key not in str(e.value)
    # The user name is masked too: it can be a token itself.
    with pytest.raises(RequestError, match=r"data_uri='https://\*\*\*@example\.org"):
        ZarrParallelAssembler("https://reader:hunter22@example.org/era5.json")

    wrong = "wrong-secret-0123456789"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        # Filesystems are cached per process with the credentials they started with.
        s3fs.S3FileSystem.clear_instance_cache()
        clear_source_cache()
        with pytest.raises(RequestError, match=r"era5\.json \(access denied\)") as e:
            ZarrParallelAssembler(
                f"s3://{BUCKET}/era5.json", chunks=CHUNKS, storage_options=_options(svc)
            ).cache(cache_store=str(tmp_path / "denied.zarr"), **RUN)
        assert wrong not in str(e.value)
    s3fs.S3FileSystem.clear_instance_cache()
    assert not (tmp_path / "denied.zarr.versions").exists()


def _upload_tree(client: Any, folder: Path, prefix: str, only: set[Path] | None = None) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (only is None or path in only):
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")


def _digests(folder: Path) -> dict[Path, bytes]:
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).digest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(900)
def test_a_zarr_chunk_on_s3_rewritten_where_no_job_looks_stops_the_publish(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    """A Zarr store on S3: besides the sampled chunks the jobs check, each array's listing (keys
    with their sizes and ETags) is recorded at planning and checked before publishing. A chunk
    that no sample covers rewritten in place (metadata untouched) once every job is recorded:
    the run fails naming the array's chunk files and the published version stays. Before, only
    the sample was checked, and the run published the mix."""
    import os
    import signal

    import numpy as np
    import yaml
    import zarr

    from core_support import cli_result, frozen_run
    from zarr_parallel.sources.identity import job_entries
    from zarr_parallel.sources.remote_identity import sample_chunk_keys

    svc: S3Service = s3["svc"]
    client = boto3.client("s3", endpoint_url=svc.endpoint, region_name="us-east-1")
    local = tmp_path / "era5.zarr"
    with xr.open_mfdataset(s3["files"], combine="by_coords") as ds:
        ds.chunk({"time": 6}).to_zarr(local, consolidated=True, zarr_format=3)
    _upload_tree(client, local, "zarr/era5.zarr")
    uri = f"s3://{BUCKET}/zarr/era5.zarr"
    meta = json.loads((local / "t2m" / "zarr.json").read_text())
    assert not any(key.startswith("c/1/") for key in sample_chunk_keys(meta))
    fields = {
        "data_uri": uri,
        "storage_options": _options(svc),
        "chunks": CHUNKS,
        "cache_store": str(tmp_path / "out" / "c.zarr"),
        "retries": 0,
        **RUN,
    }
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump({**fields, "add_attrs": {"run": 1}}))
    first = cli_result(request)  # a first version, published
    assert first.returncode == 0, first.stderr[-3000:]
    final = tmp_path / "out" / "c.zarr"
    published = final.resolve()
    planned = json.loads((published / ".zarr-parallel" / "plan.json").read_text())["layout"]
    listing = f"{uri}/t2m/"
    assert planned["identity"]["entries"][listing]["kind"] == "remote-listing"
    assert listing not in job_entries(planned, None, ["t2m"], None, None)

    def rewrite_unsampled_chunk() -> None:
        before = _digests(local)
        arr = zarr.open_array(local / "t2m", mode="r+")
        arr[6:12] = np.asarray(arr[6:12]) + 1.0
        changed = {p for p, digest in _digests(local).items() if before.get(p) != digest}
        assert changed and all("/c/1/" in str(p) for p in changed)
        _upload_tree(client, local, "zarr/era5.zarr", changed)

    request.write_text(yaml.safe_dump({**fields, "add_attrs": {"run": 2}}))
    with frozen_run(request, "before-finalise") as second:
        rewrite_unsampled_chunk()
        os.kill(second.pid, signal.SIGCONT)
        _, err = second.communicate(timeout=600)
    assert second.returncode == 1, err[-3000:]
    assert listing in err and "chunk files" in err
    assert final.resolve() == published
    assert xr.open_zarr(final).attrs.get("run") == 1
