"""Unit tests of store/zarr_io.py: aligned region writes, finalising, checksums."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_parallel.errors import RunFailed
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir
from zarr_parallel.store.manifest import is_complete
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.store.zarr_io import (
    array_checksum,
    crc32,
    finalise,
    initialise_store,
    write_region,
    write_values,
)

SHAPE = (5, 4)  # time x x; chunks of 2 steps: the last chunk is an edge chunk of one step


def _initialised(path: Path, encoding: dict[str, dict[str, Any]] | None = None) -> Path:
    """A store as initialisation leaves it: metadata only, made by xarray from dask zeros."""
    lazy = da.zeros(SHAPE, chunks=(2, 4), dtype="f4")
    ds = xr.Dataset({"t": (("time", "x"), lazy), "p": (("time", "x"), lazy)})
    enc = {"t": {"chunks": (2, 4)}, "p": {"chunks": (2, 4), "_FillValue": -9999.0}}
    ds.to_zarr(path, mode="w-", compute=False, consolidated=False, encoding=encoding or enc)
    return path


def _values() -> np.ndarray:
    return np.arange(20, dtype="f4").reshape(SHAPE) + 0.5


def test_write_values_writes_exactly_its_region(tmp_path: Path) -> None:
    version = _initialised(tmp_path / "v")
    values = _values()
    write_values(version, "t", values[2:4], ("time", "x"), {"time": slice(2, 4)})
    write_values(version, "t", values[4:], ("time", "x"), {"time": slice(4, 5)})  # edge chunk
    stored = zarr.open_array(version, path="t", mode="r")[:]
    np.testing.assert_array_equal(stored[2:], values[2:])
    assert np.isnan(stored[:2]).all()  # not these jobs' region: still the fill value


@pytest.mark.parametrize("start", [1, 3])
def test_unaligned_regions_are_refused(tmp_path: Path, start: int) -> None:
    version = _initialised(tmp_path / "v")
    region = {"time": slice(start, start + 2)}
    with pytest.raises(RunFailed, match=r"t\[time \d:\d\]: not aligned to the chunk length 2"):
        write_values(version, "t", _values()[start : start + 2], ("time", "x"), region)
    data = xr.DataArray(_values()[region["time"]], dims=("time", "x"))
    with pytest.raises(RunFailed, match="not aligned"):
        write_region(version, "t", data, region)
    assert zarr.open_array(version, path="t", mode="r").nchunks_initialized == 0


def test_nan_goes_through_the_cf_encoding_where_the_fill_value_is_not_nan(tmp_path: Path) -> None:
    version = _initialised(tmp_path / "v")
    values = _values()[:2].copy()
    values[0, 0] = np.nan
    write_values(version, "p", values, ("time", "x"), {"time": slice(0, 2)})
    raw = zarr.open_array(version, path="p", mode="r")[:2]
    assert raw[0, 0] == -9999.0  # stored as the fill value, as xarray would store it
    decoded = xr.open_zarr(version, consolidated=False)["p"].values[:2]
    np.testing.assert_array_equal(decoded, values)


def test_write_values_into_shards(tmp_path: Path) -> None:
    enc = {
        "t": {"chunks": (1, 2), "shards": (2, 4)},
        "p": {"chunks": (1, 2), "shards": (2, 4)},
    }
    version = _initialised(tmp_path / "v", enc)
    values = _values()
    with pytest.raises(RunFailed, match="chunk length 2"):  # aligned to chunks, not to shards
        write_values(version, "t", values[1:3], ("time", "x"), {"time": slice(1, 3)})
    write_values(version, "t", values, ("time", "x"), {})
    np.testing.assert_array_equal(zarr.open_array(version, path="t", mode="r")[:], values)


def test_finalise_consolidates_and_marks_complete(tmp_path: Path) -> None:
    version = _initialised(tmp_path / "v")
    manifest_dir(version).mkdir()
    assert not is_complete(version)
    finalise(version, {"jobs": 3})
    assert is_complete(version)
    summary = json.loads((manifest_dir(version) / "complete.json").read_text())
    assert summary["jobs"] == 3 and summary["time"] > 0
    assert set(xr.open_zarr(version, consolidated=True).data_vars) == {"t", "p"}


def test_initialise_leaves_a_foreign_version_alone(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    version = paths.version(1, "f" * 12)
    manifest_dir(version).mkdir(parents=True)
    (manifest_dir(version) / OWNER_FILE).write_text(json.dumps({"cache_path": "/elsewhere"}))
    plan = {"cache_path": paths.canonical, "fingerprint": "f" * 12}
    with pytest.raises(RunFailed, match="is not a version of"):
        initialise_store(None, version, None, plan)  # type: ignore[arg-type]
    assert (manifest_dir(version) / OWNER_FILE).exists()


def test_checksums_are_zlib_crc32_of_the_array_bytes() -> None:
    values = np.arange(12, dtype="i4").reshape(3, 4)
    assert array_checksum(values) == f"{zlib.crc32(values.tobytes()):08x}"
    # A view of other memory layout gives the checksum of its own values, in C order.
    assert array_checksum(values.T) == f"{zlib.crc32(values.T.copy().tobytes()):08x}"
    assert crc32(b"world", crc32(b"hello ")) == zlib.crc32(b"hello world")
