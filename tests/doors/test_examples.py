"""The examples of the Python and command-line doors run as a user runs them, and their caches
equal the source (the deployment door's example runs against a real server in
tests/doors/test_deployments.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from core_support import changed_env, open_cache

PROJECT = Path(__file__).resolve().parents[2]
#: What both examples select and how they rename (examples/python_api.py, quickstart.yaml).
NAMES = {"t2m": "t2m", "dew": "d2m"}


def _env() -> dict[str, str]:
    # The examples call `zarr-parallel` and `python` as a user's shell finds them.
    bin_dir = str(Path(sys.executable).parent)
    return changed_env(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def _assert_equals_source(cache: Path, data: Path, stop: str) -> None:
    source = xr.open_mfdataset(sorted(data.glob("era5_like_*.nc")), engine="h5netcdf")
    expected = source.sel(time=slice("2020-01-01T00:00", stop)).load()
    cached = open_cache(cache)
    assert sorted(cached.data_vars) == sorted(NAMES)
    for name, source_name in NAMES.items():
        assert cached[name].dtype == expected[source_name].dtype
        np.testing.assert_array_equal(cached[name].values, expected[source_name].values)
    np.testing.assert_array_equal(cached["time"].values, expected["time"].values)


def test_python_api_example(tmp_path: Path) -> None:
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    done = subprocess.run(
        [
            sys.executable,
            PROJECT / "examples" / "python_api.py",
            "--data",
            data,
            "--cache",
            cache_dir,
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "equal the source" in done.stdout
    _assert_equals_source(cache_dir / "era5_like_python_api.zarr", data, "2020-01-02T23:00")


def test_cli_example(tmp_path: Path) -> None:
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    done = subprocess.run(
        ["bash", str(PROJECT / "examples" / "cli.sh")],
        env=_env() | {"DATA_DIR": str(data), "CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    steps = ["== plan", "== run\n", "== run again", "== verify", "== re-cache"]
    assert [step in out for step in steps] == [True] * len(steps), out
    assert "zarr-parallel: done" in out
    assert out.count("zarr-parallel: up to date") >= 2, out
    assert not (tmp_path / "example-cache").exists()
    _assert_equals_source(cache_dir / "era5_like_cli.zarr", data, "2020-01-03T23:00")
