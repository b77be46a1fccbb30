"""A staged plan's intermediate stores (docs/design.md §3.4): where they go, what may be removed,
which temp_store is accepted, and the checksum of a region copied out of them."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from zarr_parallel.errors import RequestError
from zarr_parallel.store.disk_names import OWNER_FILE, manifest_dir
from zarr_parallel.store.files import write_json_atomic
from zarr_parallel.store.intermediate import (
    DECODE_PIECE_MIN,
    check_temp_store,
    copy_region,
    decoded_checksum,
    release_region,
    remove_intermediates,
    stage_path,
    stale_intermediates,
)
from zarr_parallel.store.paths import CachePaths


def _made_by(folder: Path, paths: CachePaths) -> Path:
    folder.mkdir(parents=True)
    write_json_atomic(manifest_dir(folder) / OWNER_FILE, {"cache_path": paths.canonical})
    return folder


def test_only_intermediates_this_cache_made_are_removed(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    ours = _made_by(stage_path(paths, 1, "a" * 64), paths)
    other = _made_by(stage_path(paths, 1, "b" * 64), CachePaths(tmp_path / "other.zarr"))
    stray = paths.versions / ".stage-1-cccccccccccc"
    stray.mkdir()
    assert stale_intermediates(paths, []) == [ours]
    assert stale_intermediates(paths, [str(ours)]) == []
    assert remove_intermediates(paths, [str(ours), str(other), str(stray)]) == 1
    assert not ours.exists() and other.exists() and stray.exists()


def test_only_chunks_of_an_intermediate_this_cache_made_are_released(tmp_path: Path) -> None:
    """A recorded job empties the intermediate chunks it read, only where the intermediate's
    manifest names the cache of the version the job wrote."""
    paths = CachePaths(tmp_path / "c.zarr")
    version = _made_by(paths.versions / "1-abc", paths)
    region = {"t": slice(0, 4)}
    for owner, emptied in ((CachePaths(tmp_path / "other.zarr"), 0), (paths, 2)):
        inter = _made_by(tmp_path / f"inter-{emptied}", owner)
        arr = zarr.create_array(
            inter / "v", shape=(6, 3), chunks=(2, 3), dtype="f4", compressors=[BloscCodec()]
        )
        arr[...] = 1.0
        assert release_region(inter, version, ["v"], {"v": ["t", "y"]}, region) == emptied
        sizes = [p.stat().st_size for p in sorted((inter / "v" / "c").rglob("*")) if p.is_file()]
        assert [s == 0 for s in sizes] == [True] * emptied + [False] * (3 - emptied)


def test_temp_store_subfolder_only(tmp_path: Path) -> None:
    paths = CachePaths(tmp_path / "c.zarr")
    scratch = tmp_path / "scratch"
    inter = _made_by(stage_path(paths, 1, "a" * 64, str(scratch)), paths)
    assert inter.parent == scratch and inter.name == "c.zarr.stage-1-aaaaaaaaaaaa"
    (scratch / "someone-elses.dat").write_text("x")
    remove_intermediates(paths, [str(inter)])
    assert not inter.exists() and (scratch / "someone-elses.dat").exists()


def test_temp_store_inside_a_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(RequestError, match="temp_store"):
        check_temp_store(str(src / "scratch"), [str(src)])
    check_temp_store(str(tmp_path / "scratch"), [str(src / "a.nc")])
    assert (tmp_path / "scratch").is_dir()


def test_temp_store_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RequestError, match="cannot be written"):
        check_temp_store(str(blocker / "scratch"), [])


def _encoded_cases() -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Values and their CF encoding: what a copy job's checksum must decode as xarray does."""
    rng = np.random.default_rng(1)
    floats = (280 + rng.standard_normal((6, 5, 4))).astype("float32")
    with_nan = floats.copy()
    with_nan[0, 0, :2] = np.nan
    with_fill = floats.copy()
    with_fill[1, 2, 3] = -9999.0
    times = np.datetime64("2020-01-01T00") + np.arange(120).reshape(6, 5, 4).astype("m8[h]")
    return {
        "float-nan-fill": (with_nan, {}),
        "float-fill-value": (with_fill, {"_FillValue": -9999.0}),
        "packed-int16": (
            with_nan,
            {"dtype": "int16", "scale_factor": 0.002, "add_offset": 280.0, "_FillValue": -32767},
        ),
        "packed-double-scale": (
            floats.astype("float64"),
            {"dtype": "int16", "scale_factor": 0.01, "add_offset": 280.0},
        ),
        "plain-int": (np.arange(120, dtype="int16").reshape(6, 5, 4), {}),
        "uint8-fill": (
            (np.arange(120) % 256).astype("float32").reshape(6, 5, 4),
            {"dtype": "uint8", "_FillValue": 7},
        ),
        "float-missing-value": (with_fill.astype("float64"), {"missing_value": -9999.0}),
        "datetime": (times, {"units": "hours since 2020-01-01", "dtype": "int64"}),
        "timedelta": (times - times[0, 0, 0], {"units": "hours", "dtype": "int32"}),
    }


@pytest.mark.filterwarnings("ignore:saving variable")
@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("case", list(_encoded_cases()))
def test_copied_region_checksum_is_that_of_the_decoded_cache(
    tmp_path: Path, case: str, zarr_format: int
) -> None:
    """A copy job's checksum equals the CRC32 ``verify`` computes of the region read back from
    the version (``xr.open_zarr(..., decode_timedelta=True)``), for packed integers, fill values
    (NaN or not), missing values and times, without reading the region again."""
    values, enc = _encoded_cases()[case]
    ds = xr.Dataset({"v": (("t", "y", "x"), values)})
    encoding = {"v": {**enc, "chunks": (3, 5, 4)}}
    inter, version = tmp_path / "inter.zarr", tmp_path / "version.zarr"
    ds.to_zarr(inter, encoding=encoding, zarr_format=zarr_format, consolidated=False)
    # The version: the same template, every chunk still holding something else.
    blank = ds.copy(data={"v": np.zeros_like(values) if values.dtype.kind != "M" else values[::-1]})
    blank.to_zarr(version, encoding=encoding, zarr_format=zarr_format, consolidated=False)
    pieces: list[np.ndarray] = []
    region = {"t": slice(3, 6)}
    nbytes, checksum = copy_region(inter, version, "v", ["t", "y", "x"], region, pieces.append)
    got = xr.open_zarr(version, consolidated=False, chunks=None, decode_timedelta=True)
    want = np.ascontiguousarray(got["v"].isel(region).values)
    # verify's CRC32 (times as their 8-byte integers)
    assert checksum == f"{zlib.crc32(want.view('i8') if want.dtype.kind in 'mM' else want):08x}"
    assert nbytes == zarr.open_array(inter, path="v")[3:6].nbytes
    # The pieces inspected are the decoded region, in order.
    np.testing.assert_array_equal(np.concatenate(pieces), want.reshape(-1))
    # The stored values were copied as they are.
    np.testing.assert_array_equal(
        zarr.open_array(version, path="v")[3:6], zarr.open_array(inter, path="v")[3:6]
    )


def test_checksum_pieces_chain_to_the_whole_region() -> None:
    """Decoding in pieces (a region larger than one piece) gives the CRC32 of the whole."""
    values = np.arange(3 * DECODE_PIECE_MIN * 8 + 5, dtype="int16")
    stored = xr.Variable(("n",), values[:0], {"scale_factor": 0.5, "_FillValue": np.int16(3)})
    pieces: list[np.ndarray] = []
    checksum = decoded_checksum(values, stored, "v", pieces.append)
    assert len(pieces) > 1
    whole = xr.Variable(("n",), values, dict(stored.attrs))
    want = xr.decode_cf(xr.Dataset({"v": whole}))["v"].values
    assert checksum == f"{zlib.crc32(np.ascontiguousarray(want).data):08x}"
