"""Remote sources over real HTTP on loopback: kerchunk references, netCDF files and Zarr stores.

The server (tests/sources_servers.py) is a real HTTP/1.1 server with byte ranges; its flaky
mode fails about 30 % of requests (503/500 replies, resets, bodies cut short) in a fixed pattern.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import zarr_parallel
from sources_support import (
    CHUNKS,
    RUN,
    HTTPService,
    assert_same_cache,
    kerchunk_refs,
    local_reference_cache,
    serve_http,
)
from zarr_parallel import RequestError, RunFailed, ZarrParallelAssembler
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import prepare
from zarr_parallel.sources.target import clear_source_cache


@pytest.fixture(scope="module")
def served(
    era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The ERA5-like files behind a plain and a flaky server, each with its kerchunk JSON."""
    root = tmp_path_factory.mktemp("www")
    for f in era5_files:
        shutil.copy(f, root / f.name)
    files = sorted(root.glob("*.nc"))
    with serve_http(root) as plain, serve_http(root, flaky=True) as flaky:
        for name, svc in (("plain", plain), ("flaky", flaky)):
            (root / f"{name}.json").write_text(json.dumps(kerchunk_refs(files, svc.url)))
        yield {"root": root, "files": files, "plain": plain, "flaky": flaky}


@pytest.fixture(scope="module")
def local_cache(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of the same files read locally: what every remote cache must equal."""
    return local_reference_cache(era5_files, tmp_path_factory.mktemp("local"))


def _data_chunks(refs: dict[str, Any], base_url: str) -> dict[tuple[str, int, int], str]:
    """(path, first byte, last byte) of every data-variable chunk -> its reference key."""
    out = {}
    for key, value in refs["refs"].items():
        name = key.split("/")[0]
        if name in ("t2m", "d2m") and isinstance(value, list) and len(value) == 3:
            url, offset, length = value
            out[(url.removeprefix(base_url), offset, offset + length - 1)] = key
    return out


def _data_gets(svc: HTTPService, chunks: dict[tuple[str, int, int], str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (path, a, b), key in chunks.items():
        counts[key] = svc.stats.ranges(path)[(a, b)]
    return counts


def test_kerchunk_over_http_equals_local_and_fetches_each_chunk_once(
    served: dict[str, Any], local_cache: Path, tmp_path: Path
) -> None:
    svc: HTTPService = served["plain"]
    refs = json.loads((served["root"] / "plain.json").read_text())
    chunks = _data_chunks(refs, svc.url)
    assert len(chunks) == 2 * 10 * 2 * 2  # 2 variables x 10 time x 2 lat x 2 lon chunks
    uri = f"{svc.url}/plain.json"

    # Planning reads the reference JSON and coordinates only: no data chunk is fetched.
    clear_source_cache()
    before = sum(_data_gets(svc, chunks).values())
    prepared = prepare(build_request(data_uri=uri, chunks=CHUNKS, cache_store=str(tmp_path / "p")))
    assert prepared.plan.read_amplification == 1.0
    assert sum(_data_gets(svc, chunks).values()) == before == 0

    result = ZarrParallelAssembler(uri, chunks=CHUNKS).cache(
        cache_store=str(tmp_path / "remote.zarr"), **RUN
    )
    assert_same_cache(result.path, local_cache)
    src = xr.open_mfdataset(served["files"], engine="h5netcdf")
    out = xr.open_zarr(result.path)
    for name in ("t2m", "d2m"):
        np.testing.assert_array_equal(out[name].values, src[name].values)
        assert out[name].dtype == src[name].dtype
        assert out[name].attrs == src[name].attrs
    # Every source chunk was fetched exactly once, by one job.
    assert set(_data_gets(svc, chunks).values()) == {1}
    # Provenance on the root group, under its own keys; the source's attributes unchanged.
    assert out.attrs["zarr_parallel_source"] == uri
    assert out.attrs["zarr_parallel_request_fingerprint"] == prepared.request.digest()
    assert out.attrs["zarr_parallel_plan_fingerprint"] == result.summary["fingerprint"]
    assert out.attrs["zarr_parallel_version"] == zarr_parallel.__version__
    assert pd.Timestamp(out.attrs["zarr_parallel_written"]).tzinfo is not None
    assert {k: v for k, v in out.attrs.items() if not k.startswith("zarr_parallel_")} == src.attrs
    for name in ("t2m", "d2m"):
        assert not any(k.startswith("zarr_parallel") for k in out[name].attrs)


def test_flaky_server_gives_the_same_cache_through_retries(
    served: dict[str, Any], local_cache: Path, tmp_path: Path
) -> None:
    svc: HTTPService = served["flaky"]
    uri = f"{svc.url}/flaky.json"
    # Without retries, the same server breaks the run (before or during the writes).
    svc.reset_failures()
    clear_source_cache()
    with pytest.raises((RequestError, RunFailed)):
        ZarrParallelAssembler(uri, chunks=CHUNKS, remote_retries=0).cache(
            cache_store=str(tmp_path / "noretry.zarr"), retries=0, **RUN
        )
    svc.reset_failures()
    clear_source_cache()
    result = ZarrParallelAssembler(uri, chunks=CHUNKS, remote_retries=8).cache(
        cache_store=str(tmp_path / "flaky.zarr"), retries=0, **RUN
    )
    injected = dict(svc.stats.injected)
    # The server really failed requests, in every way it knows, and no job was retried as a
    # whole (retries=0): the per-request retries did the work.
    assert set(injected) == {"503", "500", "reset", "truncate"}, injected
    assert sum(injected.values()) >= 10
    assert result.summary["jobs_run"] == result.summary["jobs"]
    assert_same_cache(result.path, local_cache)


def test_missing_or_forbidden_file_fails_before_writing_naming_the_url(
    served: dict[str, Any], tmp_path: Path
) -> None:
    svc: HTTPService = served["plain"]
    refs = json.loads((served["root"] / "plain.json").read_text())
    first = served["files"][0].name
    secret_url = f"{svc.url}/gone.nc?X-Amz-Signature=topsecret123"
    refs["refs"] = {
        k: ([secret_url, *v[1:]] if isinstance(v, list) and v[0].endswith(first) else v)
        for k, v in refs["refs"].items()
    }
    (served["root"] / "missing.json").write_text(json.dumps(refs))
    cache = tmp_path / "missing.zarr"
    with pytest.raises(
        RequestError, match=r"gone\.nc\?X-Amz-Signature=\*\*\* \(404 not found\)"
    ) as e:
        ZarrParallelAssembler(f"{svc.url}/missing.json", chunks=CHUNKS).cache(
            cache_store=str(cache), **RUN
        )
    assert "topsecret123" not in str(e.value)
    assert e.value.parameter == "data_uri"
    assert not cache.exists() and not Path(f"{cache}.versions").exists()

    svc.forbid(f"/{served['files'][1].name}")
    try:
        with pytest.raises(RequestError, match=r"403 forbidden"):
            ZarrParallelAssembler(f"{svc.url}/plain.json", chunks=CHUNKS).cache(
                cache_store=str(tmp_path / "forbidden.zarr"), **RUN
            )
    finally:
        svc.server.forbidden.clear()


def test_netcdf_files_over_http(served: dict[str, Any], local_cache: Path, tmp_path: Path) -> None:
    svc: HTTPService = served["plain"]
    urls = [f"{svc.url}/{f.name}" for f in served["files"]]
    result = ZarrParallelAssembler(urls, chunks=CHUNKS).cache(
        cache_store=str(tmp_path / "nc.zarr"), **RUN
    )
    assert_same_cache(result.path, local_cache)


def test_zarr_store_over_http(served: dict[str, Any], local_cache: Path, tmp_path: Path) -> None:
    svc: HTTPService = served["plain"]
    shutil.copytree(local_cache.resolve(), served["root"] / "store.zarr", dirs_exist_ok=True)
    result = ZarrParallelAssembler(f"{svc.url}/store.zarr", chunks=CHUNKS).cache(
        cache_store=str(tmp_path / "z.zarr"), **RUN
    )
    a, b = xr.open_zarr(result.path), xr.open_zarr(local_cache)
    for name in ("t2m", "d2m"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
        assert a[name].dtype == b[name].dtype


@pytest.mark.parametrize("concurrency", [1, 4])
def test_remote_concurrency_bounds_requests_in_flight(
    served: dict[str, Any], tmp_path: Path, concurrency: int
) -> None:
    svc: HTTPService = served["plain"]
    svc.server.delay = 0.02
    try:
        with svc.stats.lock:
            svc.stats.max_in_flight = 0
        ZarrParallelAssembler(
            f"{svc.url}/plain.json", chunks=CHUNKS, remote_concurrency=concurrency
        ).cache(cache_store=str(tmp_path / "c.zarr"), **RUN)
    finally:
        svc.server.delay = 0.0
    # Never more than asked; and with room, the reads really overlap.
    assert svc.stats.max_in_flight <= concurrency
    assert svc.stats.max_in_flight == concurrency
