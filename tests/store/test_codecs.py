"""The cache's codec (store/codecs.py, docs/request.md ``compression``): every codec round-trips a
real netCDF source through the real write path, the store's metadata names it (Zarr v3 and v2), a
variable's ``encoding`` transform overrides it, and the content fingerprint follows it.

Runs go through the steps a series run takes (plan, initialise, each job in this process, finish),
without Prefect: the flow adds nothing codec-specific.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.planning.memory import FAST_MARGIN, FAST_WRITE_INFLIGHT
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.steps import Prepared, initialise, make_plan, prepare
from zarr_parallel.store.codecs import zarr_compressors

#: Per codec: the compressors the array's metadata names (v3 ``codecs`` after ``bytes``; v2
#: ``compressor``).
V3 = {
    "zstd": [{"name": "zstd", "configuration": {"level": 0, "checksum": False}}],
    "zstd:5": [{"name": "zstd", "configuration": {"level": 5, "checksum": False}}],
    "blosc:lz4:5": [
        {
            "name": "blosc",
            "configuration": {
                "typesize": 4,
                "cname": "lz4",
                "clevel": 5,
                "shuffle": "shuffle",
                "blocksize": 0,
            },
        }
    ],
    "blosc:zstd:3": [
        {
            "name": "blosc",
            "configuration": {
                "typesize": 4,
                "cname": "zstd",
                "clevel": 3,
                "shuffle": "shuffle",
                "blocksize": 0,
            },
        }
    ],
    "zlib:1": [{"name": "numcodecs.zlib", "configuration": {"level": 1}}],
    "gzip:5": [{"name": "gzip", "configuration": {"level": 5}}],
    "none": [],
}
V2 = {
    "zstd": {"id": "zstd", "level": 0},
    "zstd:5": {"id": "zstd", "level": 5},
    "blosc:lz4:5": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0},
    "blosc:zstd:3": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 0},
    "zlib:1": {"id": "zlib", "level": 1},
    "gzip:5": {"id": "gzip", "level": 5},
    "none": None,
}


@pytest.fixture(scope="module")
def source(era5_factory: Any) -> list[Path]:
    """Two small ERA5-like netCDF4 files (float32 t2m and d2m, HDF5 chunks of 6 steps)."""
    return era5_factory(n_files=2, steps_per_file=12, nlat=21, nlon=36, chunks=(6, 21, 36))


def _request(files: list[Path], store: Path, **extra: Any) -> CacheRequest:
    return build_request(
        data_uri=[str(p) for p in files],
        cache_store=str(store),
        deploy_mode="series",
        chunks={"time": 6},
        num_jobs=2,
        **extra,
    )


def _cache(req: CacheRequest) -> tuple[Prepared, list[dict[str, Any]]]:
    """Run ``req`` as a series run does, without the flow; the records of the jobs run."""
    prepared = prepare(req)
    if prepared.status == "up_to_date":
        return prepared, []
    initialise(prepared)
    records = [
        run_job(prepared.request_json, str(prepared.version), j.id) for j in prepared.plan.jobs
    ]
    finish(prepared, records, time.time())
    return prepared, records


def _compressors(store: Path, name: str, zarr_format: int) -> Any:
    """What the array's own metadata file says its compressors are."""
    if zarr_format == 2:
        return json.loads((store / name / ".zarray").read_text())["compressor"]
    codecs = json.loads((store / name / "zarr.json").read_text())["codecs"]
    assert codecs[0]["name"] == "bytes"
    return codecs[1:]


def _assert_same_as_source(files: list[Path], store: Path) -> None:
    with xr.open_mfdataset(files) as src, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that numcodecs.zlib is not in v3's spec
        cache = xr.open_zarr(store).load()
        for name in src.data_vars:
            np.testing.assert_array_equal(cache[name].values, src[name].values)
            assert cache[name].dtype == src[name].dtype, name
        np.testing.assert_array_equal(cache["time"].values, src["time"].values)


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("codec", list(V3))
def test_each_codec_round_trips_and_is_named_in_the_metadata(
    source: list[Path], tmp_path: Path, codec: str, zarr_format: int
) -> None:
    store = tmp_path / "c.zarr"
    _, records = _cache(_request(source, store, compression=codec, zarr_format=zarr_format))
    # The fast path wrote the data (the codec reached zarr's own chunk writes too).
    assert any(r["fast_read"] for r in records), records
    _assert_same_as_source(source, store)
    expected = V3[codec] if zarr_format == 3 else V2[codec]
    for name in ("t2m", "d2m", "time", "latitude"):
        got = _compressors(store, name, zarr_format)
        if name in ("time", "latitude") and zarr_format == 3 and codec.startswith("blosc"):
            # Coordinates get the codec too, with their own item size (int64/float64 here).
            got = [{**c, "configuration": {**c["configuration"], "typesize": 4}} for c in got]
        assert got == expected, (name, got)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_the_default_is_zarrs_own_default(tmp_path: Path, zarr_format: int) -> None:
    """Caches written before the field existed had zarr's default codec: ``zstd`` is exactly it."""
    default = zarr.create_array(
        tmp_path / "default", shape=(4,), dtype="f4", zarr_format=zarr_format
    )
    ours = zarr.create_array(
        tmp_path / "ours",
        shape=(4,),
        dtype="f4",
        zarr_format=zarr_format,
        compressors=zarr_compressors(parse_compression("zstd", "compression"), zarr_format),
    )
    assert ours.metadata.to_dict() == default.metadata.to_dict()
    assert CacheRequest.model_fields["compression"].default == "zstd"


def test_a_variable_overrides_the_request_codec(source: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    req = _request(
        source,
        store,
        compression="blosc:lz4:5",
        variables={"t2m": [{"type": "encoding", "compression": "ZLIB:1"}], "d2m": []},
    )
    # Kept in its canonical spelling (what the fingerprint hashes).
    assert req.variables is not None and req.variables["t2m"][0]["compression"] == "zlib:1"
    _cache(req)
    _assert_same_as_source(source, store)
    assert _compressors(store, "t2m", 3) == V3["zlib:1"]
    assert _compressors(store, "d2m", 3) == V3["blosc:lz4:5"]


def test_a_preprocessor_sets_the_codec_of_every_data_variable(
    source: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "c.zarr"
    req = _request(
        source, store, zarr_format=2, preprocessors=[{"type": "encoding", "compression": "none"}]
    )
    _cache(req)
    _assert_same_as_source(source, store)
    assert _compressors(store, "t2m", 2) is None
    assert _compressors(store, "d2m", 2) is None
    assert _compressors(store, "time", 2) == V2["zstd"]  # coordinates: the request's codec


def test_the_codec_is_part_of_the_content_fingerprint(source: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    _cache(_request(source, store, compression="gzip:5"))
    # The same codec (spelt differently): up to date, nothing written.
    assert prepare(_request(source, store, compression="GZIP:5")).status == "up_to_date"
    # Another codec, on the request or on one variable: a new version.
    assert prepare(_request(source, store, compression="gzip:6")).status != "up_to_date"
    override = {"t2m": [{"type": "encoding", "compression": "none"}], "d2m": []}
    changed = _request(source, store, compression="gzip:5", variables=override)
    same_vars = _request(source, store, compression="gzip:5", variables={"t2m": [], "d2m": []})
    assert changed.digest() != same_vars.digest()


def test_the_default_keeps_the_fingerprint_caches_had(source: list[Path], tmp_path: Path) -> None:
    """The default codec adds nothing to the request's digest: caches made before stay current."""
    req = _request(source, tmp_path / "c.zarr")
    before = {
        "data_uri",
        "engine",
        "open_options",
        "preprocessors",
        "variables",
        "chunks",
        "shards",
        "tiles",
        "add_attrs",
        "zarr_format",
        "keep_packing",
    }
    content = req.model_dump(include=before)
    content["data_uri"] = sorted(content["data_uri"])
    assert req.digest() == fingerprint(canonical_json(content))
    assert _request(source, tmp_path / "c.zarr", compression="zstd:0").digest() == req.digest()
    assert _request(source, tmp_path / "c.zarr", compression="zstd:3").digest() != req.digest()


def test_the_memory_model_follows_the_codec(source: list[Path], tmp_path: Path) -> None:
    """Uncompressed chunks: one chunk-sized buffer less per encoding thread in each estimate."""
    zstd = make_plan(_request(source, tmp_path / "c.zarr"))[1]
    none = make_plan(_request(source, tmp_path / "c.zarr", compression="none"))[1]
    blosc = make_plan(_request(source, tmp_path / "c.zarr", compression="blosc:lz4:5"))[1]
    assert [j.region for j in zstd.jobs] == [j.region for j in none.jobs]
    assert [j.memory for j in blosc.jobs] == [j.memory for j in zstd.jobs]
    # Each job's slabs are one write chunk of float32 (6 steps): one chunk encoded at a time.
    encoding = min(FAST_WRITE_INFLIGHT, 1) * 6 * 21 * 36 * 4
    for z, n in zip(zstd.jobs, none.jobs, strict=True):
        assert z.memory - n.memory == pytest.approx(encoding * FAST_MARGIN, abs=2)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_blosc_blocks_of_the_asked_size_round_trip(tmp_path: Path, zarr_format: int) -> None:
    """A staged plan's intermediate asks Blosc for 1 MiB blocks: the metadata names them and
    the values come back exactly (a 4 MB chunk is four blocks)."""
    codecs = zarr_compressors(parse_compression("blosc:zstd:1", "compression"), zarr_format, 2**20)
    values = np.random.default_rng(3).standard_normal((4, 512, 512)).astype("f4")
    arr = zarr.create_array(
        tmp_path / "a",
        shape=values.shape,
        chunks=values.shape,
        dtype="f4",
        zarr_format=zarr_format,
        compressors=codecs,
    )
    arr[...] = values
    meta = _compressors(tmp_path, "a", zarr_format)
    blocks = meta[0]["configuration"]["blocksize"] if zarr_format == 3 else meta["blocksize"]
    assert blocks == 2**20
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[...], values)
