"""Chunk files decoded and encoded without zarr's per-chunk machinery (store/raw_chunks.py):
the values and files are exactly zarr's."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, GzipCodec

from zarr_parallel.store import zarr_io
from zarr_parallel.store.intermediate import INTERMEDIATE_BLOCKSIZE
from zarr_parallel.store.raw_chunks import (
    ChunkReleased,
    chunk_writer,
    direct_layout,
    read_region,
    release_chunks,
)
from zarr_parallel.store.zarr_io import write_values, write_values_raw

SHAPE = (23, 17, 11)
CHUNKS = (5, 17, 4)
DIMS = ("time", "latitude", "longitude")


def _values(dtype: str = "f4", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(SHAPE) * 100).astype(dtype)
    if values.dtype.kind == "f":
        values[3, 2:9, 1] = np.nan
    return values


def _intermediate(path: Path, values: np.ndarray, written: np.ndarray | None = None) -> Any:
    """An array laid out as a staged plan's intermediate, written where ``written`` is True."""
    blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=INTERMEDIATE_BLOCKSIZE)
    arr = zarr.create_array(
        path,
        shape=values.shape,
        chunks=CHUNKS,
        dtype=values.dtype,
        compressors=[blosc],
        fill_value=np.nan,
    )
    if written is None:
        arr[...] = values
    else:
        for corner in np.argwhere(written):
            box = tuple(
                slice(int(i) * c, (int(i) + 1) * c) for i, c in zip(corner, CHUNKS, strict=True)
            )
            arr[box] = values[box]
    return zarr.open_array(path, mode="r")


boxes = st.tuples(*(st.tuples(st.integers(0, n - 1), st.integers(1, n)) for n in SHAPE)).map(
    lambda pairs: tuple(slice(min(a, b - 1), b) for a, b in pairs)
)


@settings(max_examples=40, deadline=None)
@given(box=boxes)
def test_a_region_read_from_the_chunk_files_equals_zarrs(box: tuple[slice, ...]) -> None:
    """Any box, cutting chunks or not, with the edge chunks the array's shape leaves."""
    arr = zarr.open_array(_SHARED["path"], mode="r")
    assert direct_layout(arr)
    with read_region(arr, box) as got:
        np.testing.assert_array_equal(got, arr[box])


_SHARED: dict[str, Any] = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_intermediate(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("raw") / "inter.zarr"
    _intermediate(path, _values())
    _SHARED["path"] = path


def test_a_chunk_never_written_reads_as_the_fill_value(tmp_path: Path) -> None:
    values = _values()
    grid = tuple(-(-n // c) for n, c in zip(SHAPE, CHUNKS, strict=True))
    written = np.ones(grid, dtype=bool)
    written[1, 0, 2] = False
    arr = _intermediate(tmp_path / "i.zarr", values, written)
    assert not (tmp_path / "i.zarr" / "c" / "1" / "0" / "2").exists()
    with read_region(arr, (slice(0, 23), slice(0, 17), slice(0, 11))) as got:
        np.testing.assert_array_equal(got, arr[...])
        assert np.isnan(got[5:10, :, 8:11]).all()


def test_other_layouts_are_read_through_zarr(tmp_path: Path) -> None:
    """The target's own zstd layout, sharded arrays and v2 are not the intermediate's."""
    values = _values()
    for name, extra in (("zstd", {}), ("sharded", {"shards": (10, 17, 8)})):
        arr = zarr.create_array(tmp_path / name, shape=SHAPE, chunks=CHUNKS, dtype="f4", **extra)
        arr[...] = values
        assert not direct_layout(arr)
        with read_region(arr, (slice(2, 9), slice(0, 17), slice(3, 10))) as got:
            np.testing.assert_array_equal(got, values[2:9, :, 3:10])
    v2 = zarr.create_array(tmp_path / "v2", shape=SHAPE, chunks=CHUNKS, dtype="f4", zarr_format=2)
    assert not direct_layout(v2)


CODECS = {
    "zstd": lambda: zarr.codecs.ZstdCodec(),
    "zstd:5, checksum": lambda: zarr.codecs.ZstdCodec(level=5, checksum=True),
    "intermediate": lambda: BloscCodec(
        cname="zstd", clevel=1, shuffle="shuffle", blocksize=INTERMEDIATE_BLOCKSIZE
    ),
    "blosc:lz4:5": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}


@pytest.mark.parametrize("dtype", ["f4", "f8", "i2", "u1"])
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("durable", [False, True])
def test_chunks_written_directly_are_zarrs_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, codec: str, durable: bool
) -> None:
    """Whole and edge chunks, a region not starting at the origin: byte for byte the files
    zarr writes for the same values, and no temporary file left behind."""
    values = _values(dtype, seed=1)
    stores = {}
    for how in ("direct", "zarr"):
        path = tmp_path / how
        zarr.create_array(
            path,
            shape=SHAPE,
            chunks=CHUNKS,
            dtype=dtype,
            compressors=[CODECS[codec]()],
            dimension_names=DIMS,
        )
        arr = zarr.open_array(path, mode="r+")
        assert chunk_writer(arr) is not None
        if how == "zarr":
            monkeypatch.setattr(zarr_io, "chunk_writer", lambda arr, durable=False: None)
        region = {"time": slice(5, 23), "latitude": slice(0, 17), "longitude": slice(4, 11)}
        part = values[5:, :, 4:]
        if durable:
            write_values_raw(tmp_path, how, part, DIMS, region)
        else:
            write_values(tmp_path, how, part, DIMS, region)
        stores[how] = path
        monkeypatch.undo()
    files = {
        how: {p.relative_to(path): p.read_bytes() for p in (path / "c").rglob("*") if p.is_file()}
        for how, path in stores.items()
    }
    assert files["direct"] == files["zarr"]
    assert len(files["direct"]) == 4 * 2  # time chunks 1..4, longitude chunks 1..2, edges too
    assert not list(tmp_path.rglob("*.partial"))
    got = zarr.open_array(stores["direct"], mode="r")[5:, :, 4:]
    np.testing.assert_array_equal(got, values[5:, :, 4:])


def test_other_layouts_are_written_by_zarr(tmp_path: Path) -> None:
    """Shards, big-endian values, and codecs of neither kind."""
    sharded = zarr.create_array(
        tmp_path / "s", shape=SHAPE, chunks=CHUNKS, dtype="f4", shards=(10, 17, 8)
    )
    big = zarr.create_array(
        tmp_path / "e",
        shape=SHAPE,
        chunks=CHUNKS,
        dtype="f4",
        serializer=zarr.codecs.BytesCodec(endian="big"),
    )
    gzip = zarr.create_array(
        tmp_path / "g", shape=SHAPE, chunks=CHUNKS, dtype="f4", compressors=[GzipCodec()]
    )
    plain = zarr.create_array(
        tmp_path / "n", shape=SHAPE, chunks=CHUNKS, dtype="f4", compressors=None
    )
    for arr in (sharded, big, gzip, plain):
        assert chunk_writer(arr) is None


def _sizes(arr: Any) -> dict[tuple[int, ...], int]:
    folder = Path(arr.store_path.store.root) / arr.store_path.path
    grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks, strict=True)]
    return {
        c: (folder / arr.metadata.encode_chunk_key(c)).stat().st_size
        for c in itertools.product(*grid)
    }


@settings(max_examples=30, deadline=None)
@given(box=boxes)
def test_release_empties_exactly_the_chunks_wholly_inside_the_box(box: tuple[slice, ...]) -> None:
    """Brute force: a chunk (clipped to the array) inside the box is emptied, any other kept,
    and every kept chunk still reads as before."""
    values = _values()
    with tempfile.TemporaryDirectory() as tmp:
        arr = _intermediate(Path(tmp) / "inter.zarr", values)
        emptied = release_chunks(arr, box)
        inside = set()
        for coords, size in _sizes(arr).items():
            lo = [i * c for i, c in zip(coords, CHUNKS, strict=True)]
            hi = [min((i + 1) * c, n) for i, c, n in zip(coords, CHUNKS, SHAPE, strict=True)]
            within = all(s.start <= a and b <= s.stop for a, b, s in zip(lo, hi, box, strict=True))
            assert (size == 0) == within, coords
            if within:
                inside.add(coords)
            else:
                whole = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                with read_region(arr, whole) as got:
                    np.testing.assert_array_equal(got, values[whole])
        assert emptied == len(inside)


def test_a_released_chunk_is_refused_not_read_as_fill(tmp_path: Path) -> None:
    """A late duplicate of a recorded job fails before using anything of its region."""
    arr = _intermediate(tmp_path / "inter.zarr", _values())
    assert release_chunks(arr, (slice(0, 5), slice(0, 17), slice(0, 4))) == 1
    box = (slice(0, 10), slice(0, 17), slice(0, 8))
    with (
        pytest.raises(ChunkReleased, match="released after the job that read it"),
        read_region(arr, box),
    ):
        pass  # pragma: no cover - refused before


def test_release_leaves_other_layouts_alone(tmp_path: Path) -> None:
    arr = zarr.create_array(
        tmp_path / "g.zarr", shape=SHAPE, chunks=CHUNKS, dtype="f4", compressors=[GzipCodec()]
    )
    arr[...] = _values()
    assert release_chunks(arr, (slice(0, 23), slice(0, 17), slice(0, 11))) == 0
    assert 0 not in _sizes(arr).values()
