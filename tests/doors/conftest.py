"""Fixtures of the doors' tests: the wheel built from this checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout (``uv build --wheel``), built once per session."""
    out = tmp_path_factory.mktemp("dist")
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    proc = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("zarr_parallel-*.whl")
    return built
