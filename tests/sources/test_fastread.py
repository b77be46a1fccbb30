"""The fast read path gives exactly what xarray gives, and the write path around it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zarr_parallel.request.model import build_request
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import FAST_READ_ENV, run_job
from zarr_parallel.run.steps import initialise, prepare
from zarr_parallel.sources import fastread, hdf5_chunks
from zarr_parallel.sources.target import cached_target
from zarr_parallel.store.manifest import iter_job_records


def _special_file(folder: Path) -> Path:
    """Contiguous variables, a non-NaN fill value with masked elements, unwritten chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "special.nc"
    rng = np.random.default_rng(3)
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("time", 9)
        nc.createDimension("y", 11)
        nc.createDimension("x", 13)
        nc.createVariable("time", "i4", ("time",))[:] = np.arange(9)
        nc.createVariable("y", "f8", ("y",))[:] = np.linspace(50, 40, 11)
        nc.createVariable("x", "f8", ("x",))[:] = np.arange(13.0)
        nc["time"].units = "hours since 2020-01-01"
        flat = nc.createVariable("flat", "f4", ("time", "y", "x"), contiguous=True)
        values = rng.standard_normal((9, 11, 13)).astype("f4")
        flat[:] = values
        masked = nc.createVariable(
            "masked", "f4", ("time", "y", "x"), chunksizes=(2, 5, 7), fill_value=-9999.0
        )
        data = values.copy()
        data[0, 0, :4] = -9999.0
        masked[:] = data
        missing = nc.createVariable("missing", "f4", ("time", "y", "x"), chunksizes=(9, 3, 13))
        missing.missing_value = np.float32(-8888.0)
        data[1, 2, 3] = -8888.0
        missing[:] = data
        # Chunks never written read as the fill value (HDF5 does not allocate them).
        sparse = nc.createVariable(
            "sparse", "i2", ("time", "y", "x"), chunksizes=(3, 4, 5), zlib=True, fill_value=-7
        )
        sparse.scale_factor = 0.5
        sparse[0:3, 0:4, 0:5] = np.arange(60, dtype="i2").reshape(3, 4, 5)
    return path


@pytest.fixture(scope="session")
def sources(era5_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Real netCDF4 sources in the layouts the fast path reads."""
    small = {"nlat": 19, "nlon": 36}
    return {
        "archive-zlib": era5_factory(n_files=3, steps_per_file=[10, 7, 5], **small),
        "tiled-raw": era5_factory(
            n_files=2, steps_per_file=[8, 6], chunks=(5, 8, 10), compression=None, **small
        ),
        "packed": era5_factory(n_files=2, steps_per_file=[6, 6], chunks=(4, 10, 20), packed=True),
        "special": [_special_file(tmp_path_factory.mktemp("special"))],
    }


def _target(files: list[Path], **fields: Any) -> tuple[Any, Any]:
    req = build_request(data_uri=[str(f) for f in files], cache_store="unused.zarr", **fields)
    return req, cached_target(req.model_dump_json())


def _compare(files: list[Path], preprocessors: list[dict[str, Any]], data: Any) -> None:
    req, target = _target(files, preprocessors=preprocessors)
    for name in target.variables:
        fv = fastread.fast_plan(target, req, name)
        assert fv is not None, f"{name} with {preprocessors} should be read fast"
        var = target.dataset[name]
        region = {}
        for dim in var.dims:
            n = int(var.sizes[dim])
            start = data.draw(st.integers(0, n - 1), label=f"{dim} start")
            stop = data.draw(st.integers(start + 1, n), label=f"{dim} stop")
            region[str(dim)] = slice(start, stop)
        expected = var.isel(region).values
        got, stats = fastread.read_region(fv, region, threads=data.draw(st.sampled_from([1, 3])))
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        assert stats.chunks >= 1


@st.composite
def transforms(draw: Any, sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Index-only preprocessors: drops, selections with steps, flips, rolls, transposes."""
    out: list[dict[str, Any]] = []
    drop = draw(st.sampled_from([None, *sizes]))
    if drop is not None:
        n = sizes[drop]
        gone = draw(st.lists(st.integers(0, n - 1), unique=True, min_size=1, max_size=n - 1))
        out.append({"type": "drop_isel", drop: sorted(gone)})
        sizes = {**sizes, drop: n - len(gone)}
    isel: dict[str, Any] = {}
    for dim, n in sizes.items():
        kind = draw(st.sampled_from(["all", "slice", "step", "scalar"]))
        if kind == "slice":
            a = draw(st.integers(0, n - 1))
            isel[dim] = [a, draw(st.integers(a + 1, n))]
        elif kind == "step":
            a = draw(st.integers(0, n - 1))
            isel[dim] = [a, n, draw(st.integers(2, 4))]
        elif kind == "scalar" and dim != "time":
            isel[dim] = draw(st.integers(0, n - 1))
    if isel:
        out.append({"type": "isel", **isel})
    kept = [d for d in sizes if not isinstance(isel.get(d), int)]
    flips = draw(st.lists(st.sampled_from(kept), unique=True, max_size=2))
    if flips:
        out.append({"type": "reverse", "dims": flips})
    if "longitude" in kept and draw(st.booleans()):
        out.append({"type": "roll", "longitude": draw(st.integers(-5, 5))})
    if draw(st.booleans()):
        out.append({"type": "transpose", "dims": draw(st.permutations(kept))})
    return out


ERA5_SIZES = {"time": 22, "latitude": 19, "longitude": 36}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_equals_xarray_archive_layout(sources: dict[str, list[Path]], data: Any) -> None:
    _compare(sources["archive-zlib"], data.draw(transforms(ERA5_SIZES)), data)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_equals_xarray_tiled_uncompressed(sources: dict[str, list[Path]], data: Any) -> None:
    sizes = {"time": 14, "latitude": 19, "longitude": 36}
    _compare(sources["tiled-raw"], data.draw(transforms(sizes)), data)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_equals_xarray_packed_ints(sources: dict[str, list[Path]], data: Any) -> None:
    sizes = {"time": 12, "latitude": 73, "longitude": 144}
    _compare(sources["packed"], data.draw(transforms(sizes)), data)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_equals_xarray_contiguous_fill_and_unwritten(
    sources: dict[str, list[Path]], data: Any
) -> None:
    sizes = {"time": 9, "y": 11, "x": 13}
    _compare(sources["special"], data.draw(transforms(sizes)), data)


def test_special_file_really_has_the_cases(sources: dict[str, list[Path]]) -> None:
    path = str(sources["special"][0])
    assert hdf5_chunks.h5_storage(path, "flat").chunks is None
    sparse = hdf5_chunks.h5_storage(path, "sparse")
    assert sparse.chunks is not None and len(sparse.index) < 3 * 3 * 3
    ds = xr.open_dataset(path)
    assert int(ds["masked"].isnull().sum()) == 4
    assert int(ds["missing"].isnull().sum()) == 1
    assert ds["sparse"].dtype.kind == "f" and bool(ds["sparse"].isnull().any())


def test_astype_and_rename_per_variable(sources: dict[str, list[Path]]) -> None:
    files = sources["packed"]
    req, target = _target(
        files,
        variables={
            "t2m": [{"type": "astype", "dtype": "float32"}],
            "d2m": [{"type": "rename", "new_name_or_name_dict": "dew"}],
        },
    )
    for name in target.variables:
        fv = fastread.fast_plan(target, req, name)
        assert fv is not None
        got, _ = fastread.read_region(fv, {})
        expected = target.dataset[name].values
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"open_options": {"mask_and_scale": False}}, "open_options"),
        ({"preprocessors": [{"type": "roll", "longitude": 3, "roll_coords": False}]}, "roll"),
    ],
)
def test_falls_back_when_not_provably_equal(
    sources: dict[str, list[Path]],
    fields: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    req, target = _target(sources["archive-zlib"], **fields)
    with caplog.at_level("INFO", logger="zarr_parallel.sources.fastread"):
        assert fastread.fast_plan(target, req, target.variables[0]) is None
    assert reason in caplog.text


def test_falls_back_on_unsupported_filters(tmp_path: Path) -> None:
    path = tmp_path / "fletcher.nc"
    ds = xr.Dataset({"v": (("t", "x"), np.arange(20.0).reshape(4, 5))})
    ds.to_netcdf(path, engine="netcdf4", encoding={"v": {"fletcher32": True, "zlib": True}})
    req, target = _target([path])
    assert fastread.fast_plan(target, req, "v") is None


def _store_digest(version: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(version.rglob("*")):
        if f.is_file() and ".zarr-parallel" not in f.parts and f.name not in ("zarr.json",):
            h.update(str(f.relative_to(version)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _run(files: list[Path], out: Path, **fields: Any) -> tuple[Path, list[dict[str, Any]]]:
    req = build_request(
        data_uri=[str(f) for f in files],
        cache_store=str(out),
        deploy_mode="series",
        recommend_changes="proceed",
        generate_stats=True,
        **fields,
    )
    prepared = prepare(req)
    initialise(prepared)
    results = [
        run_job(prepared.request_json, str(prepared.version), j, True) for j in prepared.todo
    ]
    finish(prepared, results, 0.0)
    return prepared.version, sorted(iter_job_records(prepared.version), key=lambda r: r["id"])


@pytest.mark.parametrize("source", ["archive-zlib", "packed", "special"])
def test_jobs_write_the_same_bytes_as_the_xarray_path(
    sources: dict[str, list[Path]],
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = sources[source]
    dims = list(xr.open_dataset(files[0]).dims)
    fields: dict[str, Any] = {
        "chunks": {dims[0]: 4, dims[1]: 6},
        "preprocessors": [{"type": "reverse", "dim": dims[1]}],
        "memory_limit": "300MB",
        "memory_reserve": "100MB",
        "num_jobs": 3,
    }
    if source == "special":
        # A variable with only missing_value cannot be written by xarray's to_zarr (its
        # encoding conflicts with the store's NaN fill): a store-initialisation limit.
        fields["variables"] = {"flat": [], "masked": [], "sparse": []}
    fast_version, fast_records = _run(files, tmp_path / "fast.zarr", **fields)
    monkeypatch.setenv(FAST_READ_ENV, "0")
    slow_version, slow_records = _run(files, tmp_path / "slow.zarr", **fields)
    assert _store_digest(fast_version) == _store_digest(slow_version)
    assert [r["checksums"] for r in fast_records] == [r["checksums"] for r in slow_records]
    for fast, slow in zip(fast_records, slow_records, strict=True):
        assert fast["stats"].keys() == slow["stats"].keys()
        for name, s in fast["stats"].items():
            assert s == pytest.approx(slow["stats"][name], nan_ok=True)
    assert all(r["fast_read"] for r in fast_records)
    assert not any(r["fast_read"] for r in slow_records)
    # The measured bytes (/proc/self/io) cover the source bytes the fast path counted.
    assert sum(sum(r["fast_read"].values()) for r in fast_records) > 0
    for r in fast_records:
        counted = sum(r["fast_read"].values())
        if r["read_bytes"] is not None:
            assert counted <= r["read_bytes"] <= counted + 2_000_000
    expected = xr.open_mfdataset([str(f) for f in files]).isel({dims[1]: slice(None, None, -1)})
    got = xr.open_zarr(tmp_path / "fast.zarr")
    for name in got.data_vars:
        np.testing.assert_array_equal(got[name].values, expected[name].values)
        assert got[name].dtype == expected[name].dtype


def test_slabs_keep_the_checksum_of_the_whole_region() -> None:
    from zarr_parallel.run.job import slab_slices
    from zarr_parallel.store.zarr_io import array_checksum

    values = np.random.default_rng(0).standard_normal((10, 3, 4)).astype("f4")
    import zlib

    crc = 0
    for s in slab_slices(slice(0, 10), 3):
        crc = zlib.crc32(np.ascontiguousarray(values[s]).data, crc)
    assert f"{crc:08x}" == array_checksum(values)
    assert [(s.start, s.stop) for s in slab_slices(slice(0, 10), 3)] == [
        (0, 3),
        (3, 6),
        (6, 9),
        (9, 10),
    ]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 9), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_unshuffle_is_the_inverse_of_hdf5_shuffle(size: int, n: int, seed: int) -> None:
    # HDF5's shuffle stores byte k of every element in plane k; trailing bytes stay as they are.
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    whole = n // size * size
    shuffled = np.concatenate([raw[:whole].reshape(-1, size).T.reshape(-1), raw[whole:]])
    out = np.empty_like(raw)
    hdf5_chunks.unshuffle_into(shuffled, out, size)
    np.testing.assert_array_equal(out, raw)
    back = np.frombuffer(hdf5_chunks.unshuffle(shuffled.data, size), np.uint8)
    np.testing.assert_array_equal(back, raw)


def test_chunks_decoded_in_place_equal_both_decoders(
    sources: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whole archive chunks (one step x full grid) are inflated and un-shuffled straight into
    # the region buffer by libdeflate through ctypes; deflate's own API gives the same values.
    assert hdf5_chunks.LIBDEFLATE is not None, "libdeflate through ctypes should be available"
    req, target = _target(sources["archive-zlib"])
    for name in target.variables:
        fv = fastread.fast_plan(target, req, name)
        assert fv is not None
        var = target.dataset[name]
        expected = var.values
        got, _ = fastread.read_region(fv, {}, threads=2)
        np.testing.assert_array_equal(got, expected)
        part = {"time": slice(3, 15), "latitude": slice(2, 11)}
        got_part, _ = fastread.read_region(fv, part, threads=2)
        np.testing.assert_array_equal(got_part, var.isel(part).values)
        with monkeypatch.context() as m:
            m.setattr(hdf5_chunks, "LIBDEFLATE", None)
            again, _ = fastread.read_region(fv, {}, threads=2)
        np.testing.assert_array_equal(again, expected)


def test_threads_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from zarr_parallel.planning.memory import FAST_READ_THREADS

    monkeypatch.setenv("ZARR_PARALLEL_THREADS", "1")
    assert fastread.reader_threads() == 1
    monkeypatch.setenv("ZARR_PARALLEL_THREADS", str(FAST_READ_THREADS + 5))
    assert fastread.reader_threads() == FAST_READ_THREADS  # the memory model's cap
    monkeypatch.delenv("ZARR_PARALLEL_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert fastread.reader_threads() == min(cores, FAST_READ_THREADS)


def test_fast_memory_model_counts_slabs_not_the_region() -> None:
    from zarr_parallel.planning.grid import AxisMap
    from zarr_parallel.planning.inputs import ArrayInput, Limits
    from zarr_parallel.planning.memory import (
        FAST_MARGIN,
        FAST_READ_COPIES,
        FAST_READ_THREADS,
        fast_job_memory,
    )
    from zarr_parallel.planning.plan import plan_jobs

    # 504 hourly steps of the archive layout, one step × full grid per source chunk.
    axes = (
        AxisMap.uniform("time", 504, 1),
        AxisMap.uniform("latitude", 721, 721),
        AxisMap.uniform("longitude", 1440, 1440),
    )
    slow = ArrayInput("t2m", axes, (48, 180, 360), 4, 4)
    fast = ArrayInput("t2m", axes, (48, 180, 360), 4, 4, fast=True)
    limits = Limits(memory_budget=1_750_000_000)
    slow_plan, fast_plan_ = plan_jobs([slow], limits), plan_jobs([fast], limits)
    # Streaming slabs lets a job cover more of the region within the same budget.
    assert len(fast_plan_.jobs) < len(slow_plan.jobs)
    assert all(j.memory <= limits.memory_budget for j in fast_plan_.jobs)
    # One slab read while the previous one is written, plus what zarr encodes at once and the
    # readers' chunks; a single-slab job holds one slab.
    grid = 721 * 1440
    one_slab = fast_job_memory([48, 721, 1440], (48, 180, 360), 4, 4, grid)
    two_slabs = fast_job_memory([96, 721, 1440], (48, 180, 360), 4, 4, grid)
    eight_slabs_worth = fast_job_memory([384, 721, 1440], (48, 180, 360), 4, 4, grid)
    sixteen_rows = fast_job_memory([768, 721, 1440], (48, 180, 360), 4, 4, grid)
    slab_bytes = 48 * grid * 4
    reader_bytes = FAST_READ_THREADS * FAST_READ_COPIES * grid * 4  # chunks the readers hold
    # A second slab is read while the first is written: the readers' chunks now coexist with
    # the encoders' (a single-slab job reads, then writes).
    expected = (slab_bytes + reader_bytes) * FAST_MARGIN
    assert two_slabs - one_slab == pytest.approx(expected, abs=2)
    # Two slabs of unequal length (48 + 24 steps): the shorter one is what is held beside.
    uneven = fast_job_memory([72, 721, 1440], (48, 180, 360), 4, 4, grid)
    expected = (slab_bytes // 2 + reader_bytes) * FAST_MARGIN
    assert uneven - one_slab == pytest.approx(expected, abs=2)
    # 8 chunk rows stream as 8 slabs of one row (FAST_SLABS): held like two rows; 16 rows as 8
    # slabs of 2 rows: the estimate follows the slab, not the region.
    assert eight_slabs_worth == two_slabs
    assert sixteen_rows - two_slabs == pytest.approx(2 * slab_bytes * FAST_MARGIN, abs=2)
    # Decoding that changes the item size (packed int16 -> float32) holds a decoded copy; the
    # readers' int16 chunks do not count beside the encoders' buffers in a single slab.
    packed = fast_job_memory([48, 721, 1440], (48, 180, 360), 4, 2, grid)
    assert packed - one_slab == pytest.approx(slab_bytes // 2 * FAST_MARGIN, abs=2)


@pytest.mark.parametrize(
    ("spec", "dropped"),
    [
        # Positions across both files' boundary, and inside the grid.
        ({"type": "drop_isel", "time": [0, 9, 10, 21], "latitude": [3]}, "isel"),
        ({"type": "drop_sel", "longitude": [0.0, 50.0]}, "sel"),
    ],
)
def test_drops_take_the_fast_path(
    sources: dict[str, list[Path]], spec: dict[str, Any], dropped: str, tmp_path: Path
) -> None:
    """drop_sel/drop_isel only select indices: jobs read them fast and write what xarray gives."""
    files = sources["archive-zlib"]
    req, target = _target(files, preprocessors=[spec])
    assert all(fastread.fast_plan(target, req, name) for name in target.variables)
    _, records = _run(files, tmp_path / "drop.zarr", preprocessors=[spec], chunks={"time": 4})
    assert records and all(r["fast_read"] for r in records)
    labels = {k: v for k, v in spec.items() if k != "type"}
    source = xr.open_mfdataset([str(f) for f in files])
    expected = source.drop_isel(labels) if dropped == "isel" else source.drop_sel(labels)
    got = xr.open_zarr(tmp_path / "drop.zarr")
    assert dict(got.sizes) == dict(expected.sizes)
    for name in expected.data_vars:
        np.testing.assert_array_equal(got[name].values, expected[name].values)
        assert got[name].dtype == expected[name].dtype
    for dim in expected.dims:
        np.testing.assert_array_equal(got[dim].values, expected[dim].values)
