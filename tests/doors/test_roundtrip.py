"""Round trips: the cache equals source → preprocessors → variables computed directly by xarray.

Every test runs the real flow (series mode) on real netCDF4/HDF5 files, a kerchunk reference
built from them, or a Zarr store, and compares the cache with the same transforms written as
plain xarray calls: values, dtypes, coordinates and attributes (``assert_identical``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from core_support import open_cache
from zarr_parallel import CacheHandle, CacheResult, ZarrParallelAssembler


def _open_nc(files: list[Path]) -> xr.Dataset:
    if len(files) == 1:
        return xr.open_dataset(files[0], engine="h5netcdf")
    return xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords")


def _open_kerchunk(path: Path) -> xr.Dataset:
    return xr.open_dataset(
        "reference://",
        engine="zarr",
        chunks={},
        backend_kwargs={"storage_options": {"fo": str(path)}, "consolidated": False},
    )


def assert_cache_equals(result: CacheResult | CacheHandle, expected: xr.Dataset) -> xr.Dataset:
    """The published cache is identical to ``expected``, dtypes included; returns it."""
    assert isinstance(result, CacheResult)
    assert result.path.is_symlink(), "the final path is a link to the published version"
    cache = open_cache(result.path)
    expected = expected.load()
    xr.testing.assert_identical(cache, expected)
    # assert_identical compares values, not dtypes: float32 and float64 of equal values pass.
    for name, var in expected.variables.items():
        assert cache[name].dtype == var.dtype, name
    # Zarr lists a group's members sorted: the variables' order is not kept (nor compared).
    assert set(cache.data_vars) == set(expected.data_vars)
    return cache


def _chunks(path: Path, name: str) -> tuple[int, ...]:
    arr = zarr.open_array(path, path=name, mode="r")
    return tuple(arr.chunks)


@pytest.fixture(scope="session")
def kerchunk_json(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kerchunk reference combining the three netCDF files along time."""
    from kerchunk.combine import MultiZarrToZarr
    from kerchunk.hdf import SingleHdf5ToZarr

    singles = [SingleHdf5ToZarr(str(f), inline_threshold=300).translate() for f in era5_files]
    combined = MultiZarrToZarr(
        singles, concat_dims=["time"], identical_dims=["latitude", "longitude"]
    ).translate()
    path = tmp_path_factory.mktemp("kerchunk") / "era5_ref.json"
    path.write_text(json.dumps(combined))
    return path


@pytest.fixture(scope="session")
def zarr_source(era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Zarr v3 store of the same data, chunked (8, 30, 50): a grid unlike the netCDF one."""
    path = tmp_path_factory.mktemp("zarrsrc") / "era5_store.zarr"
    ds = _open_nc(era5_files)
    for var in ds.variables.values():
        var.encoding = {}
    # A few missing values, so statistics have NaNs to count.
    ds = ds.load()
    ds["t2m"][0:3, 0:5, 0:7] = np.nan
    ds.chunk({"time": 8, "latitude": 30, "longitude": 50}).to_zarr(path, consolidated=False)
    return path


@pytest.fixture(scope="session")
def odd_files(era5_factory: Any) -> list[Path]:
    """Files of 10, 7 and 5 steps with HDF5 chunks of 4 steps: file ends cut chunks short."""
    return era5_factory(n_files=3, steps_per_file=[10, 7, 5], chunks=(4, 30, 144), nlat=37)


# ------------------------------------------------------------------------------------------
# netCDF4 / HDF5


def test_single_netcdf_defaults(era5_files: list[Path], tmp_path: Path) -> None:
    """One file, every default: the cache is the file, on the file's own chunk shape."""
    result = ZarrParallelAssembler(str(era5_files[0])).cache(
        cache_store=str(tmp_path / "one.zarr"), deploy_mode="series"
    )
    assert_cache_equals(result, _open_nc(era5_files[:1]))
    assert _chunks(result.path, "t2m") == (6, 40, 72)
    assert result.summary["read_amplification"] == 1.0


def test_multi_file_selection_reverse_rename_misaligned(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Irregular files (24, 24, 12), inclusive sel ends, a descending latitude slice, reverse,
    both rename forms, two variables and target chunks that match no source chunk."""
    # The small budget below splits jobs under the xarray path's memory model; the fast path
    # streams slabs and fits one job (it is covered by tests/sources/test_fastread.py).
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    pre = [
        {"type": "sel", "time": ["2020-01-01T05:00", "2020-01-03T02:00"], "latitude": [60, -30]},
        {"type": "reverse", "dim": "latitude"},
    ]
    variables = {
        "d2m": [{"type": "rename", "new_name_or_name_dict": "dew"}],
        "t2m": [{"type": "rename", "var_id": "t2m", "new_name": "temp"}],
    }
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files],
        preprocessors=pre,
        chunks={"time": 10, "latitude": 25, "longitude": 50},
        variables=variables,
    )
    result = zp.cache(
        cache_store=str(tmp_path / "multi.zarr"),
        deploy_mode="series",
        recommend_changes="proceed",
        # A small budget: whole units (the full selection here) do not fit, so jobs are cut at
        # target chunk boundaries and several jobs write side by side.
        memory_limit="6MB",
        memory_reserve="1MB",
    )
    src = _open_nc(era5_files)
    expected = (
        src.sel(time=slice("2020-01-01T05:00", "2020-01-03T02:00"), latitude=slice(60, -30))
        .isel(latitude=slice(None, None, -1))[["d2m", "t2m"]]
        .rename({"d2m": "dew", "t2m": "temp"})
    )
    cache = assert_cache_equals(result, expected)
    # Inclusive label ends, as xarray: 05:00 on day 1 to 02:00 on day 3 is 46 steps.
    assert cache.sizes["time"] == 46
    assert float(cache.latitude[0]) == -30 and float(cache.latitude[-1]) == 60
    assert _chunks(result.path, "dew") == (10, 25, 50)
    assert result.summary["read_amplification"] > 1.0
    assert result.summary["jobs"] > 1
    assert max(j["estimated_memory"] for j in result.jobs) <= 5_000_000
    assert pre[1] == {"type": "reverse", "dim": "latitude"}, "the caller's list is not mutated"


def test_irregular_file_lengths(odd_files: list[Path], tmp_path: Path) -> None:
    """File lengths (10, 7, 5) that are no multiple of the HDF5 chunk (4): aligned anyway."""
    zp = ZarrParallelAssembler([str(p) for p in odd_files], chunks={"time": 2})
    result = zp.cache(cache_store=str(tmp_path / "odd.zarr"), deploy_mode="series", num_jobs=4)
    assert_cache_equals(result, _open_nc(odd_files))
    # Source chunks along time: 0 4 8 10 | 14 17 | 21 22 — every one read once.
    assert result.summary["read_amplification"] == 1.0


def test_per_variable_transforms(era5_files: list[Path], tmp_path: Path) -> None:
    """astype, assign_attrs and encoding per variable; add_attrs on the dataset."""
    variables = {
        "t2m": [
            {"type": "astype", "dtype": "float64"},
            {"type": "assign_attrs", "units": "kelvin", "note": "cast"},
        ],
        "d2m": [{"type": "encoding", "_FillValue": -9999.0}],
    }
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files],
        preprocessors=[{"type": "isel", "time": [0, 36]}],
        variables=variables,
        add_attrs={"project": "round-trip"},
        chunks={"time": 12},
    )
    result = zp.cache(cache_store=str(tmp_path / "pv.zarr"), deploy_mode="series")
    src = _open_nc(era5_files).isel(time=slice(0, 36))
    t2m = src[["t2m"]].astype("float64", keep_attrs=True)
    t2m["t2m"].attrs.update(units="kelvin", note="cast")
    expected = xr.merge([t2m, src[["d2m"]]], combine_attrs="override")
    expected.attrs = {**src.attrs, "project": "round-trip"}
    cache = assert_cache_equals(result, expected)
    assert xr.open_zarr(result.path).d2m.encoding["_FillValue"] == -9999.0
    assert cache.t2m.dtype == np.float64


# ------------------------------------------------------------------------------------------
# kerchunk


def test_kerchunk_05_usage(kerchunk_json: Path, era5_files: list[Path], tmp_path: Path) -> None:
    """zarr-parallel 0.5's documented call, word for word, on a local kerchunk reference."""
    uri = str(kerchunk_json)
    preprocessors = [
        {"type": "sel", "time": ["2020-01-01T00:00", "2020-01-02T11:00"], "latitude": [90, -7.5]}
    ]
    chunks = {"time": 12, "latitude": 20, "longitude": 144}
    zp = ZarrParallelAssembler(
        data_uri=uri,
        preprocessors=preprocessors,
        chunks=chunks,
        engine="kerchunk",
        variables={"d2m": {}},
        cache_label="_v1",
    )
    result = zp.cache(cache_dir=str(tmp_path), deploy_mode="series")
    assert isinstance(result, CacheResult)
    assert result.path == tmp_path / "era5_ref_v1.zarr"
    expected = _open_kerchunk(kerchunk_json).sel(
        time=slice("2020-01-01T00:00", "2020-01-02T11:00"), latitude=slice(90, -7.5)
    )[["d2m"]]
    cache = assert_cache_equals(result, expected)
    # The reference and the files it points at hold the same numbers.
    direct = _open_nc(era5_files).d2m.sel(time=cache.time, latitude=cache.latitude)
    np.testing.assert_array_equal(cache.d2m.values, direct.values)
    assert result.summary["read_amplification"] == 1.0


def test_kerchunk_detected_reverse_and_descending_slice(
    kerchunk_json: Path, tmp_path: Path
) -> None:
    """engine detected from '.json'; reverse first, then an ascending slice of the flipped axis
    (0.5's alias names)."""
    zp = ZarrParallelAssembler(
        str(kerchunk_json),
        preprocessors=[
            {"type": "reverse_axis", "dim": "latitude"},
            {"type": "subset", "latitude": [-90, -10]},
        ],
        chunks={"latitude": 21},
    )
    result = zp.cache(cache_store=str(tmp_path / "k.zarr"), deploy_mode="series")
    expected = (
        _open_kerchunk(kerchunk_json)
        .isel(latitude=slice(None, None, -1))
        .sel(latitude=slice(-90, -10))
    )
    cache = assert_cache_equals(result, expected)
    assert float(cache.latitude[0]) == -90.0 and float(cache.latitude[-1]) == -10.0
    # Latitudes -90..-10 are exactly the source's second HDF5 chunk (rows 40..72): aligned.
    assert result.summary["read_amplification"] == 1.0
    # Provenance names the engine that read the source, not just "detected".
    assert xr.open_zarr(result.path).attrs["zarr_parallel_engine"] == "kerchunk"


# ------------------------------------------------------------------------------------------
# Zarr


def test_zarr_source(zarr_source: Path, tmp_path: Path) -> None:
    """A Zarr store as source, with a target chunking misaligned with its (8, 30, 50) grid."""
    zp = ZarrParallelAssembler(
        str(zarr_source),
        preprocessors=[{"type": "sel", "time": ["2020-01-01T08:00", "2020-01-02T23:00"]}],
        chunks={"time": 20, "longitude": -1},
        variables=["t2m", "d2m"],
    )
    result = zp.cache(cache_store=str(tmp_path / "z.zarr"), deploy_mode="series")
    src = xr.open_zarr(zarr_source, consolidated=False)
    expected = src.sel(time=slice("2020-01-01T08:00", "2020-01-02T23:00"))[["t2m", "d2m"]]
    assert_cache_equals(result, expected)
    # Unnamed latitude keeps the source's 30; -1 is the whole longitude.
    assert _chunks(result.path, "t2m") == (20, 30, 144)
    assert result.summary["read_amplification"] == 1.0


# ------------------------------------------------------------------------------------------
# Target chunk forms, formats and shards


@pytest.mark.parametrize(
    ("chunks", "expected_chunks"),
    [
        ("auto", (6, 40, 72)),
        (None, (6, 40, 72)),
        ({"time": -1, "latitude": -1, "longitude": -1}, (60, 73, 144)),
        ({"latitude": 20}, (6, 20, 72)),
    ],
    ids=["auto", "None", "whole", "partial"],
)
def test_chunk_forms(
    era5_files: list[Path], tmp_path: Path, chunks: Any, expected_chunks: tuple[int, ...]
) -> None:
    zp = ZarrParallelAssembler([str(p) for p in era5_files], chunks=chunks, variables=["t2m"])
    result = zp.cache(cache_store=str(tmp_path / "c.zarr"), deploy_mode="series")
    assert_cache_equals(result, _open_nc(era5_files)[["t2m"]])
    assert _chunks(result.path, "t2m") == expected_chunks


def test_zarr_format_2(era5_files: list[Path], tmp_path: Path) -> None:
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files], chunks={"time": 24}, variables=["d2m"], zarr_format=2
    )
    result = zp.cache(cache_store=str(tmp_path / "v2.zarr"), deploy_mode="series")
    assert_cache_equals(result, _open_nc(era5_files)[["d2m"]])
    assert (result.path / ".zarray").exists() is False  # a group at the root
    assert (result.path / "d2m" / ".zarray").exists()
    assert zarr.open_group(result.path, mode="r").metadata.zarr_format == 2


def test_shards(era5_files: list[Path], tmp_path: Path) -> None:
    """Shards of 4 chunks along time: jobs cover whole shards, the data is unchanged."""
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files],
        chunks={"time": 6, "latitude": 73, "longitude": 144},
        shards={"time": 24},
        variables=["t2m"],
    )
    result = zp.cache(cache_store=str(tmp_path / "sh.zarr"), deploy_mode="series", num_jobs=5)
    assert_cache_equals(result, _open_nc(era5_files)[["t2m"]])
    arr = zarr.open_array(result.path, path="t2m", mode="r")
    assert arr.shards == (24, 73, 144) and arr.chunks == (6, 73, 144)
    # Every job starts on a shard boundary (or is the end of the array).
    for job in result.jobs:
        (_, start, stop) = job["region"][0]
        assert start % 24 == 0 and (stop % 24 == 0 or stop == 60), job["region"]


# ------------------------------------------------------------------------------------------
# 0.5 keywords: generate_stats, await_completion


def test_stats_and_handle(zarr_source: Path, tmp_path: Path) -> None:
    """await_completion=False returns a handle; generate_stats gives per-variable figures."""
    zp = ZarrParallelAssembler(
        str(zarr_source), chunks={"time": 16}, variables={"t2m": {}, "d2m": {}}
    )
    handle = zp.cache(
        cache_store=str(tmp_path / "st.zarr"),
        deploy_mode="series",
        generate_stats=True,
        await_completion=False,
        num_jobs=3,
    )
    assert isinstance(handle, CacheHandle)
    result = handle.wait(timeout=300)
    assert handle.done()
    src = xr.open_zarr(zarr_source, consolidated=False).load()
    assert_cache_equals(result, src[["t2m", "d2m"]])
    assert int(np.isnan(src.t2m.values).sum()) == 3 * 5 * 7
    stats = result.stats
    assert stats is not None and set(stats) == {"t2m", "d2m"}
    for name in ("t2m", "d2m"):
        values = src[name].values
        got = stats[name]
        assert got["count"] == values.size
        assert got["nan_count"] == int(np.isnan(values).sum())
        assert got["min"] == float(np.nanmin(values))
        assert got["max"] == float(np.nanmax(values))
        assert got["mean"] == pytest.approx(float(np.nanmean(values, dtype="float64")), rel=1e-12)


@pytest.fixture(scope="session")
def contiguous_files(
    era5_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Two netCDF4 files with contiguous (unchunked) variables: one chunk per file."""
    folder = tmp_path_factory.mktemp("contiguous")
    src = _open_nc(era5_files).load()
    paths = []
    for i, part in enumerate((src.isel(time=slice(0, 30)), src.isel(time=slice(30, 60)))):
        for var in part.variables.values():
            var.encoding = {}
        path = folder / f"flat_{i}.nc"
        part.to_netcdf(
            path,
            engine="netcdf4",
            encoding={v: {"contiguous": True} for v in ("t2m", "d2m")},
        )
        paths.append(path)
    return paths


def test_contiguous_netcdf4_engine(contiguous_files: list[Path], tmp_path: Path) -> None:
    """Contiguous variables count as one chunk per file; engine='netcdf4' reads them."""
    from zarr_parallel.request.model import build_request
    from zarr_parallel.sources.source import open_source

    req = build_request(
        data_uri=[str(p) for p in contiguous_files],
        engine="netcdf4",
        cache_store=str(tmp_path / "flat.zarr"),
    )
    layout = open_source(req).layout.variables["t2m"]
    assert layout.contiguous and layout.boundaries == ((0, 30, 60), (0, 73), (0, 144))
    zp = ZarrParallelAssembler(
        [str(p) for p in contiguous_files], engine="netcdf4", chunks={"time": 10}
    )
    result = zp.cache(cache_store=str(tmp_path / "flat.zarr"), deploy_mode="series", num_jobs=2)
    expected = xr.open_mfdataset(contiguous_files, engine="netcdf4", combine="by_coords")
    assert_cache_equals(result, expected)
    # Units are whole files (30 steps): two jobs, each reading its file once.
    assert [j["region"][0][1:] for j in result.jobs] == [[0, 30], [30, 60]]
    assert result.summary["read_amplification"] == 1.0


def test_zarr_v2_source(era5_files: list[Path], tmp_path: Path) -> None:
    """A Zarr v2 store as source (detected from '.zarr'), positional selection, rename."""
    store = tmp_path / "src_v2.zarr"
    ds = _open_nc(era5_files)[["d2m"]]
    for var in ds.variables.values():
        var.encoding = {}
    ds.chunk({"time": 12, "latitude": 73, "longitude": 72}).to_zarr(
        store, zarr_format=2, consolidated=True
    )
    zp = ZarrParallelAssembler(
        str(store),
        preprocessors=[{"type": "isel", "time": [12, 48]}],
        variables={"d2m": [{"type": "rename", "new_name_or_name_dict": "dew"}]},
    )
    result = zp.cache(cache_store=str(tmp_path / "out.zarr"), deploy_mode="series")
    expected = xr.open_zarr(store).isel(time=slice(12, 48)).rename({"d2m": "dew"})
    assert_cache_equals(result, expected)
    assert _chunks(result.path, "dew") == (12, 73, 72)
    assert result.summary["read_amplification"] == 1.0


@pytest.mark.parametrize("fast_read", ["1", "0"])
def test_missing_value_without_fill_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_read: str
) -> None:
    """A variable marked only by ``missing_value`` (no ``_FillValue``) caches with NaNs there.

    Both read paths: the raw HDF5 chunk reader and xarray's.
    """
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", fast_read)
    rng = np.random.default_rng(3)
    values = rng.random((6, 4, 5)).astype("f4")
    values[0, 0, 0] = values[5, 3, 4] = -999.0
    src = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), values)},
        coords={"time": np.arange(6.0), "latitude": np.arange(4.0), "longitude": np.arange(5.0)},
    )
    path = tmp_path / "mv.nc"
    src.to_netcdf(
        path,
        engine="h5netcdf",
        encoding={
            "t2m": {"missing_value": np.float32(-999), "_FillValue": None, "chunksizes": (2, 4, 5)}
        },
    )
    zp = ZarrParallelAssembler(str(path), chunks={"time": 3}, variables={"t2m": {}})
    result = zp.cache(cache_store=str(tmp_path / "out.zarr"), deploy_mode="series")
    cache = assert_cache_equals(result, _open_nc([path]))
    assert int(cache["t2m"].isnull().sum()) == 2
