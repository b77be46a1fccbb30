"""rechunker's own virtualenv, made on demand with uv and kept for re-runs.

rechunker 0.5.4 requires zarr < 3 and the project runs zarr 3, so the contender runs
:mod:`benchmarks.rechunker_run` with the python of ``benchmarks/data/.rechunker-venv`` (git-ignored
with the data). It is made once from the package index and reused; when uv is missing or cannot
reach the index, the contender is a row saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.datasets import DATA

VENV = DATA / ".rechunker-venv"  # a dot-folder: no project module (tests/test_house.py)
#: What the contender needs: rechunker with zarr 2, reading netCDF4/HDF5 through xarray.
REQUIREMENTS = ("rechunker==0.5.4", "zarr<3", "xarray", "dask", "h5netcdf", "h5py")
#: The environment variable telling the contender process where that python is.
PYTHON_VARIABLE = "RECHUNKER_PYTHON"


def ensure_rechunker(venv: Path = VENV, timeout: float = 600) -> tuple[str | None, str]:
    """The python of rechunker's virtualenv (made now if needed), and what happened."""
    python = venv / "bin" / "python"
    marker = venv / "complete"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return str(python), "installed"
    uv = shutil.which("uv")
    if not uv:
        return None, "rechunker not run: uv is not installed (it makes rechunker's virtualenv)"
    shutil.rmtree(venv, ignore_errors=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    try:
        # The python of this environment (3.11): both sides read the files with the same version.
        subprocess.run(
            [uv, "venv", "-q", "-p", sys.executable, str(venv)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        subprocess.run(
            [uv, "pip", "install", "-q", *REQUIREMENTS],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(venv, ignore_errors=True)
        detail = (getattr(e, "stderr", "") or str(e)).strip()[-300:]
        return None, f"rechunker not run: its virtualenv did not install ({detail})"
    marker.write_text(wanted)
    return str(python), "installed now"
