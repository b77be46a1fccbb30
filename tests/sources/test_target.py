"""Unit tests of the target (:mod:`zarr_parallel.sources.target`) on real netCDF files.

The session's ERA5-like files (tests/conftest.py): three files of 24, 24 and 12 hourly steps,
HDF5 chunks (6, 40, 72) on a 73 × 144 grid, variables t2m and d2m.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.sources.source import open_source
from zarr_parallel.sources.target import (
    INDEX_PREFIX,
    SOURCE_ATTR,
    build_target,
    cached_target,
    indexed_source,
    source_state,
)

DIMS = ("time", "latitude", "longitude")


def _request(files: list[Path], **fields: Any) -> Any:
    return build_request(data_uri=[str(p) for p in files], cache_store="/tmp/unused.zarr", **fields)


def _source(files: list[Path]) -> xr.Dataset:
    with xr.open_mfdataset([str(p) for p in files], engine="h5netcdf") as ds:
        return ds.load()


def _index(target_ds: xr.Dataset, dim: str) -> np.ndarray:
    return np.asarray(target_ds[f"{INDEX_PREFIX}{dim}"].values)


def test_indexed_source_numbers_every_dimension_and_names_each_variable(
    era5_files: list[Path],
) -> None:
    req = _request(era5_files, variables={"t2m": {}})
    ds = indexed_source(req, open_source(req))
    assert list(ds.data_vars) == ["t2m"]
    for dim, n in {"time": 60, "latitude": 73, "longitude": 144}.items():
        np.testing.assert_array_equal(_index(ds, dim), np.arange(n))
        assert ds[f"{INDEX_PREFIX}{dim}"].dims == (dim,)
    assert ds["t2m"].attrs[SOURCE_ATTR] == "t2m"


def test_indexed_source_refuses_a_variable_the_source_lacks(era5_files: list[Path]) -> None:
    req = _request(era5_files, variables={"sp": {}})
    with pytest.raises(RequestError, match=r"variables=\['sp'\]: are not variables") as info:
        indexed_source(req, open_source(req))
    assert info.value.parameter == "variables"


def test_index_coordinates_follow_selections_flips_and_renames(era5_files: list[Path]) -> None:
    """After the transforms, each target position still says which source index it holds."""
    req = _request(
        era5_files,
        preprocessors=[
            {"type": "isel", "time": [3, 40]},
            {"type": "reverse", "dim": "latitude"},
            {"type": "rename", "latitude": "lat"},
        ],
    )
    target = build_target(req)
    ds = target.dataset
    assert dict(ds.sizes) == {"time": 37, "lat": 73, "longitude": 144}
    np.testing.assert_array_equal(_index(ds, "time"), np.arange(3, 40))
    np.testing.assert_array_equal(_index(ds, "latitude"), np.arange(72, -1, -1))
    assert ds[f"{INDEX_PREFIX}latitude"].dims == ("lat",)
    # The planner's view: per target index, the source chunk holding it (chunks of 6 steps,
    # 40 + 33 latitudes).
    [t2m] = [a for a in target.array_inputs() if a.name == "t2m"]
    axes = {axis.dim: axis for axis in t2m.axes}
    np.testing.assert_array_equal(axes["time"].chunk_of, np.arange(3, 40) // 6)
    np.testing.assert_array_equal(axes["time"].chunk_len, [6] * 10)
    np.testing.assert_array_equal(axes["lat"].chunk_of, (np.arange(72, -1, -1) >= 40).astype(int))
    np.testing.assert_array_equal(axes["lat"].chunk_len, [40, 33])
    # The template holds the transformed values, without the bookkeeping.
    template = target.template()
    assert not [c for c in template.coords if str(c).startswith(INDEX_PREFIX)]
    assert all(SOURCE_ATTR not in v.attrs for v in template.data_vars.values())
    expected = _source(era5_files).isel(time=slice(3, 40)).isel(latitude=slice(None, None, -1))
    np.testing.assert_array_equal(template["t2m"].values, expected["t2m"].values)
    np.testing.assert_array_equal(template["lat"].values, expected["latitude"].values)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ("auto", {"time": 6, "latitude": 40, "longitude": 72}),  # the source's chunking
        ({"time": 12}, {"time": 12, "latitude": 40, "longitude": 72}),  # others kept
        ({"latitude": -1, "time": 100}, {"time": 60, "latitude": 73, "longitude": 72}),
    ],
)
def test_target_chunks(era5_files: list[Path], chunks: Any, expected: dict[str, int]) -> None:
    target = build_target(_request(era5_files, chunks=chunks))
    assert target.chunks == {"t2m": expected, "d2m": expected}
    assert target.shards is None
    assert target.sources == {"t2m": "t2m", "d2m": "d2m"}


def test_target_chunks_refuse_a_dimension_the_target_lacks(era5_files: list[Path]) -> None:
    with pytest.raises(RequestError, match=r"chunks\['level'\]=4: names no dimension"):
        build_target(_request(era5_files, chunks={"level": 4}))


def test_shards_are_whole_multiples_of_the_chunks(era5_files: list[Path]) -> None:
    fields = {"chunks": {"time": 12, "latitude": -1}, "zarr_format": 3}
    target = build_target(_request(era5_files, shards={"time": 24, "latitude": -1}, **fields))
    assert target.shards == {
        v: {"time": 24, "latitude": 73, "longitude": 72} for v in ("t2m", "d2m")
    }
    with pytest.raises(RequestError, match=r"shards\['time'\]=18: must be a multiple") as info:
        build_target(_request(era5_files, shards={"time": 18}, **fields))
    assert info.value.fix == "Use 24"


def test_per_variable_transforms_must_leave_one_grid(era5_files: list[Path]) -> None:
    variables = {"t2m": [{"type": "isel", "time": [0, 12]}], "d2m": {}}
    with pytest.raises(RequestError, match="different coordinates") as info:
        build_target(_request(era5_files, variables=variables))
    assert info.value.parameter == "variables"
    same = {"t2m": [{"type": "isel", "time": [0, 12]}], "d2m": [{"type": "isel", "time": [0, 12]}]}
    target = build_target(_request(era5_files, variables=same, add_attrs={"project": "x"}))
    assert target.dataset.sizes["time"] == 12 and target.dataset.attrs["project"] == "x"
    np.testing.assert_array_equal(_index(target.dataset, "time"), np.arange(12))


def test_cached_target_is_opened_once_and_again_when_a_file_changes(
    era5_files: list[Path], tmp_path: Path
) -> None:
    files = [Path(shutil.copy2(p, tmp_path / p.name)) for p in era5_files]
    req = _request(files)
    request_json = req.model_dump_json()
    first = cached_target(request_json)
    assert cached_target(request_json) is first
    state = source_state(req)
    st = files[-1].stat()
    os.utime(files[-1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_state(req) != state
    reopened = cached_target(request_json)
    assert reopened is not first
    assert cached_target(request_json) is reopened
