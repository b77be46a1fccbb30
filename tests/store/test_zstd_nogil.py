"""zarr's ``zstd`` codec compressing through libzstd without the GIL (store/zstd_nogil.py,
docs/design.md §8): the same frames numcodecs decodes (level, checksum flag), the same array
metadata, selected in every process that writes a version, off with ``ZARR_PARALLEL_NOGIL_ZSTD=0``,
and a staged run through it gives a cache equal to the source that zarr's own codec reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_parallel.api import run_request
from zarr_parallel.request.model import build_request
from zarr_parallel.store import zarr_io  # noqa: F401  (importing it selects the codec)
from zarr_parallel.store.zstd_nogil import LIBZSTD, NoGilZstdCodec, use_nogil_zstd

# CI's machine has libzstd (Debian's libzstd1, a dependency of its Python): there every test here
# runs, and fails without it; elsewhere a machine without it skips them.
pytestmark = pytest.mark.skipif(
    LIBZSTD is None and os.environ.get("CI", "").lower() != "true",
    reason="no libzstd on this machine",
)

#: zarr's own implementation, to read what the new one wrote as any other reader would.
ZARRS_ZSTD = "zarr.codecs.zstd.ZstdCodec"


def field(shape: tuple[int, ...] = (96, 30, 30)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (280 + np.cumsum(rng.normal(0, 0.01, shape), axis=0)).round(2).astype("float32")


@pytest.mark.parametrize("level", [0, 1, 5])
@pytest.mark.parametrize("checksum", [False, True])
def test_frames_decode_with_numcodecs(level: int, checksum: bool) -> None:
    values = field()
    codec = NoGilZstdCodec(level=level, checksum=checksum)._zstd_codec
    assert not isinstance(codec, numcodecs.Zstd)
    frame = np.asarray(codec.encode(values)).tobytes()
    assert frame[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    # Frame header descriptor, bit 2: the content checksum flag, as asked.
    assert bool(frame[4] & 0x04) == checksum
    ours = numcodecs.Zstd(level=level, checksum=checksum)
    back = np.frombuffer(ours.decode(frame), dtype="float32").reshape(values.shape)
    np.testing.assert_array_equal(back, values)
    # The same compression as numcodecs' encoder at that level (within a few per cent: the two
    # libzstd builds may differ in version).
    assert len(frame) <= 1.05 * len(ours.encode(values))


def test_opened_arrays_write_through_it_and_keep_zarrs_metadata(tmp_path: Path) -> None:
    assert use_nogil_zstd()
    values = field()
    zarr.create_array(tmp_path / "a.zarr", shape=values.shape, chunks=(96, 10, 10), dtype="f4")
    arr = zarr.open_array(tmp_path / "a.zarr", mode="r+")
    assert isinstance(arr.compressors[0], NoGilZstdCodec)
    arr[:] = values
    meta = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    assert meta["codecs"][-1] == {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
    with zarr.config.set({"codecs.zstd": ZARRS_ZSTD}):
        plain = zarr.open_array(tmp_path / "a.zarr", mode="r")
        assert type(plain.compressors[0]).__name__ == "ZstdCodec"
        got = plain[:]
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got, values)


def codec_class(env: dict[str, str]) -> str:
    code = (
        "from zarr_parallel.store import zarr_io\n"
        "from zarr.registry import get_codec_class\n"
        "print(get_codec_class('zstd').__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_selected_where_versions_are_written_and_off_by_environment() -> None:
    assert codec_class({}) == "NoGilZstdCodec"
    assert codec_class({"ZARR_PARALLEL_NOGIL_ZSTD": "0"}) == "ZstdCodec"


def test_a_staged_run_through_it_equals_the_source(
    era5_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The staged run of tests/run/test_staged_run.py (map -> time series, series mode): its
    # last stage writes the default zstd target through the new codec.
    files = era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None)
    req = build_request(
        data_uri=[str(p) for p in files],
        cache_store=str(tmp_path / "c.zarr"),
        chunks={"time": 96, "latitude": 8, "longitude": 8},
        deploy_mode="series",
        memory_limit="300MB",
        memory_reserve="290MB",
        recommend_changes="proceed",
        retries=0,
    )
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")  # the xarray path: staged at this size
    result = run_request(req)
    assert result.summary["strategy"] == "staged"
    with zarr.config.set({"codecs.zstd": ZARRS_ZSTD}):
        got = xr.open_zarr(tmp_path / "c.zarr").load()
    with xr.open_mfdataset(files) as src:
        want = src.load()
    for name in ("t2m", "d2m"):
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name].values, want[name].values)
