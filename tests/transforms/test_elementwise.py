"""0.5's xarray methods as transforms: the element-wise ones and drop_sel/drop_isel, end to end.

Each case caches the session's ERA5-like files (three netCDF files of 24, 24 and 12 hourly steps,
HDF5 chunks (6, 40, 72), variables t2m and d2m) in series mode and compares the cache with xarray
applying the same methods to the source: values, dtypes and coordinates. Methods that look at
neighbours, reduce, take code or do I/O stay refused with the list of known names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_support import open_cache
from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.sources.source import open_source
from zarr_parallel.sources.target import build_target
from zarr_parallel.transforms import registry

Expect = Callable[[xr.Dataset], xr.Dataset]


def _each(ds: xr.Dataset, fn: Callable[[xr.DataArray], xr.DataArray]) -> xr.Dataset:
    return ds.assign({name: fn(ds[name]) for name in ds.data_vars})


# (case, preprocessors, per-variable transforms, what xarray gives on the source)
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], Expect]] = [
    (
        "where-then-fillna",
        [],
        {
            "t2m": [
                {"type": "where", "cond": {"op": ">", "value": 275.0}},
                {"type": "fillna", "value": -1.5},
            ],
            "d2m": [],
        },
        lambda ds: ds.assign(t2m=ds.t2m.where(ds.t2m > 275.0).fillna(-1.5)),
    ),
    (
        "clip",
        [],
        {
            "t2m": [{"type": "clip", "min": 270, "max": 285.5}],
            "d2m": [{"type": "clip", "max": 270}],
        },
        lambda ds: ds.assign(t2m=ds.t2m.clip(270, 285.5), d2m=ds.d2m.clip(None, 270)),
    ),
    (
        "where-all-conditions-other",
        [
            {
                "type": "where",
                "cond": [{"op": ">=", "value": 265}, {"op": "<", "value": 290}],
                "other": 0,
            }
        ],
        {},
        lambda ds: _each(ds, lambda v: v.where((v >= 265) & (v < 290), 0)),
    ),
    (
        "round",
        [{"type": "round", "decimals": 1}],
        {},
        lambda ds: _each(ds, lambda v: v.round(1)),
    ),
    (
        "abs",
        [],
        {
            "t2m": [
                {"type": "where", "cond": {"op": ">", "value": 280}, "other": -7.25},
                {"type": "abs"},
            ],
            "d2m": [],
        },
        lambda ds: ds.assign(t2m=abs(ds.t2m.where(ds.t2m > 280, -7.25))),
    ),
    (
        "drop_sel",
        [{"type": "drop_sel", "time": ["2020-01-01T05:00", "2020-01-02T00:00"], "latitude": 90.0}],
        {},
        lambda ds: ds.drop_sel(
            time=np.array(["2020-01-01T05:00", "2020-01-02T00:00"], dtype="datetime64[ns]"),
            latitude=[90.0],
        ),
    ),
    (
        "drop_isel-after-a-selection",
        [{"type": "isel", "time": [3, 40]}, {"type": "drop_isel", "time": [0, 10, 36]}],
        {},
        lambda ds: ds.isel(time=slice(3, 40)).drop_isel(time=[0, 10, 36]),
    ),
    (
        "astype",
        [],
        {"t2m": [{"type": "astype", "dtype": "float64"}], "d2m": []},
        lambda ds: ds.assign(t2m=ds.t2m.astype("float64")),
    ),
]


@pytest.fixture(scope="module")
def source(era5_files: list[Path]) -> xr.Dataset:
    with xr.open_mfdataset([str(p) for p in era5_files], engine="h5netcdf") as ds:
        return ds.load()


@pytest.mark.parametrize(
    ("preprocessors", "variables", "expect"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_cache_equals_xarray_applying_the_method(
    era5_files: list[Path],
    source: xr.Dataset,
    tmp_path: Path,
    preprocessors: list[dict[str, Any]],
    variables: dict[str, Any],
    expect: Expect,
) -> None:
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files],
        preprocessors=preprocessors,
        chunks={"time": 12},
        variables=variables or None,
    )
    result = zp.cache(
        cache_store=str(tmp_path / "c.zarr"),
        deploy_mode="series",
        recommend_changes="proceed",
        num_jobs=3,
    )
    cache = open_cache(Path(result.path))
    expected = expect(source)
    assert sorted(cache.data_vars) == sorted(expected.data_vars)
    for name in expected.data_vars:
        got, want = cache[name], expected[name]
        assert got.dtype == want.dtype, name
        assert got.dims == want.dims, name
        np.testing.assert_array_equal(got.values, want.values, err_msg=name)
    for dim in expected.dims:
        np.testing.assert_array_equal(cache[dim].values, expected[dim].values)


def test_drop_sel_maps_each_target_index_to_its_source_index(era5_files: list[Path]) -> None:
    """The planner reads through the index coordinates: the dropped steps leave gaps there."""
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        cache_store="/tmp/unused.zarr",
        preprocessors=[{"type": "drop_sel", "time": ["2020-01-01T05:00"]}],
    )
    target = build_target(req)
    index = target.dataset["_zpi_time"].values
    np.testing.assert_array_equal(index, np.delete(np.arange(60), 5))
    axis = next(a for a in target.array_inputs()[0].axes if a.dim == "time")
    # Source chunks of 6 steps: target step 5 is source step 6, in the second chunk.
    assert list(axis.chunk_of[:7]) == [0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "name", ["shift", "diff", "rolling", "cumsum", "ffill", "pad", "reindex", "mean"]
)
def test_methods_that_look_at_neighbours_are_refused(era5_files: list[Path], name: str) -> None:
    with pytest.raises(RequestError, match=rf"\.type='{name}': is not a known transform") as info:
        build_request(
            data_uri=[str(p) for p in era5_files],
            cache_store="/tmp/unused.zarr",
            preprocessors=[{"type": name, "time": 1}],
        )
    text = str(info.value)
    assert "a job writing one region cannot" in text
    assert "'fillna'" in text and "'drop_sel'" in text  # the known names


@pytest.mark.parametrize("name", ["eval", "query", "pipe", "map", "to_netcdf", "__class__"])
def test_code_and_io_methods_are_refused(name: str) -> None:
    with pytest.raises(RequestError, match="is not a known transform") as info:
        registry.validate_spec({"type": name}, "preprocessors[0]")
    assert "Use one of [" in str(info.value)


BAD_ARGUMENTS = [
    (
        {"type": "fillna", "value": [0, 1]},
        r"preprocessors\[0\]\.value=\[0, 1\]: must be a finite number",
    ),
    ({"type": "fillna", "value": "0"}, r"preprocessors\[0\]\.value='0': must be a finite number"),
    ({"type": "fillna"}, r"preprocessors\[0\]\.value=None: is required"),
    (
        {"type": "fillna", "value": 0, "method": "ffill"},
        r"preprocessors\[0\]\.method='ffill': is not an argument",
    ),
    (
        {"type": "where", "cond": "t2m > 0"},
        r"preprocessors\[0\]\.cond='t2m > 0': is not a condition",
    ),
    ({"type": "where", "cond": {"op": "=~", "value": 1}}, r"is not a condition\. Write e\.g\."),
    (
        {"type": "where", "cond": {"op": ">", "value": 0}, "drop": True},
        r"\.drop=True: is not an argument",
    ),
    ({"type": "where", "cond": {"op": "notnull", "value": 0}}, r"'notnull' takes no value"),
    ({"type": "clip"}, r"needs min, max or both"),
    ({"type": "clip", "min": 5, "max": 1}, r"\.min=5: is above max \(1\)"),
    ({"type": "round", "decimals": "2"}, r"\.decimals='2': must be a whole number"),
    ({"type": "abs", "out": 1}, r"\.out=1: is not an argument of this transform \(it takes none\)"),
    (
        {"type": "drop_sel", "time": ["1999-01-01"]},
        r"\.time=\['1999-01-01'\]: names labels not in the data",
    ),
    ({"type": "drop_isel", "time": [99]}, r"\.time=\[99\]: names positions not in the data"),
    ({"type": "drop_sel", "level": [1]}, r"\.level='level': is not a dimension"),
]


@pytest.mark.parametrize(
    ("spec", "message"), BAD_ARGUMENTS, ids=[s["type"] for s, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_name_the_parameter(
    era5_files: list[Path], spec: dict[str, Any], message: str
) -> None:
    req = build_request(
        data_uri=[str(p) for p in era5_files], cache_store="/tmp/unused.zarr", preprocessors=[spec]
    )
    with pytest.raises(RequestError, match=message):
        build_target(req)


def test_renamed_variable_is_listed_under_its_new_name(
    era5_files: list[Path], source: xr.Dataset, tmp_path: Path
) -> None:
    renames = [
        {"type": "rename", "var_id": "t2m", "new_name": "temp"},
        {"type": "rename", "name_dict": {"temp": "air_temperature"}},
    ]
    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files],
        preprocessors=renames,
        chunks={"time": 12},
        variables={"air_temperature": [{"type": "clip", "min": 270}]},
    )
    result = zp.cache(cache_store=str(tmp_path / "c.zarr"), deploy_mode="series", num_jobs=2)
    cache = open_cache(Path(result.path))
    assert list(cache.data_vars) == ["air_temperature"]
    assert cache["air_temperature"].dtype == source["t2m"].dtype
    np.testing.assert_array_equal(cache["air_temperature"].values, source["t2m"].clip(270).values)


def test_the_old_name_of_a_renamed_variable_says_the_new_one(era5_files: list[Path]) -> None:
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        cache_store="/tmp/unused.zarr",
        preprocessors=[{"type": "rename", "var_id": "t2m", "new_name": "temp"}],
        variables=["t2m"],
    )
    with pytest.raises(
        RequestError, match=r"variables\['t2m'\]='t2m': is no longer .* Name it 'temp'"
    ):
        build_target(req)


# -- Properties: what the planner sees ---------------------------------------------------------

ELEMENTWISE_SPECS = st.sampled_from(
    [
        {"type": "fillna", "value": 0},
        {"type": "clip", "min": 270, "max": 290},
        {"type": "where", "cond": {"op": ">", "value": 280}},
        {"type": "where", "cond": [{"op": "notnull"}, {"op": "<=", "value": 290}], "other": -1},
        {"type": "round", "decimals": 2},
        {"type": "abs"},
    ]
)


@pytest.fixture(scope="module")
def opened(era5_files: list[Path]) -> Any:
    req = build_request(data_uri=[str(p) for p in era5_files], cache_store="/tmp/unused.zarr")
    return req, open_source(req)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dropped=st.sets(st.integers(0, 59), max_size=30))
def test_drop_isel_keeps_every_other_index_in_order(opened: Any, dropped: set[int]) -> None:
    """Each remaining target step reads its own source step, in its source chunk (6 steps)."""
    req, source = opened
    spec = {"type": "drop_isel", "time": sorted(dropped)}
    target = build_target(req.model_copy(update={"preprocessors": [spec]}), source)
    kept = np.delete(np.arange(60), sorted(dropped))
    np.testing.assert_array_equal(target.dataset["_zpi_time"].values, kept)
    for array in target.array_inputs():
        axis = next(a for a in array.axes if a.dim == "time")
        np.testing.assert_array_equal(axis.chunk_of, kept // 6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(ELEMENTWISE_SPECS, min_size=1, max_size=4))
def test_elementwise_chains_keep_the_alignment(opened: Any, specs: list[dict[str, Any]]) -> None:
    """Element-wise transforms change values only: the planner sees the untransformed inputs."""
    req, source = opened
    plain = build_target(req, source)
    changed = build_target(req.model_copy(update={"preprocessors": specs}), source)
    assert changed.sources == plain.sources and changed.chunks == plain.chunks
    for a, b in zip(changed.array_inputs(), plain.array_inputs(), strict=True):
        assert (a.name, a.write_chunks, a.itemsize) == (b.name, b.write_chunks, b.itemsize)
        for x, y in zip(a.axes, b.axes, strict=True):
            np.testing.assert_array_equal(x.chunk_of, y.chunk_of)
