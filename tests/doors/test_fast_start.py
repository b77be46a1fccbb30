"""A default ad hoc run starts like a script (docs/design.md §2b): real command runs, real files.

- ``deploy_mode`` defaults to ``auto`` and the summary says what it chose and why;
- the summary's wall time is the command's, broken down into phases that add up to it;
- a cache found up to date is answered before any flow run, and a changed source still runs;
- without ``PREFECT_API_URL`` the command starts its temporary API itself and stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import xarray as xr
import yaml

from tests.core_support import assert_cache_equals_files, changed_env, temporary_servers
from zarr_parallel.api import ZarrParallelAssembler
from zarr_parallel.run.phases import PHASES


def _request(tmp_path: Path, files: list[Path]) -> Path:
    request = tmp_path / "request.yaml"
    request.write_text(
        yaml.safe_dump(
            {
                "data_uri": [str(p) for p in files],
                "cache_store": str(tmp_path / "cache.zarr"),
                "chunks": {"time": 6, "latitude": 73, "longitude": 144},
                "memory_limit": "1GB",
            }
        )
    )
    return request


def _run(
    request: Path, env: dict[str, str] | None = None, imports: list[str] | None = None
) -> tuple[str, float]:
    """``python -m flows.cache run REQUEST``: its stdout and its wall time seen from outside;
    ``imports`` gets the modules it imported (``-X importtime``)."""
    t0 = time.time()
    flags = ["-X", "importtime"] if imports is not None else []
    proc = subprocess.run(
        [sys.executable, *flags, "-m", "flows.cache", "run", str(request)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    if imports is not None:
        imports += [
            line.rsplit("|", 1)[1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        ]
    return proc.stdout, elapsed


def _phases(stdout: str) -> tuple[float, dict[str, float]]:
    m = re.search(r"wall time\s+([\d.]+) s \(([^)]*)\)", stdout)
    assert m, stdout
    parts = dict(p.rsplit(" ", 1) for p in m.group(2).split(", "))
    return float(m.group(1)), {k: float(v) for k, v in parts.items()}


def test_auto_default_up_to_date_answer_and_a_changed_source(
    tmp_path: Path, era5_factory: Any
) -> None:
    files = []
    for p in era5_factory(n_files=2, steps_per_file=12, chunks=(6, 73, 144), seed=21):
        shutil.copy(p, tmp_path / p.name)
        files.append(tmp_path / p.name)
    request = _request(tmp_path, files)

    out, elapsed = _run(request)
    assert "zarr-parallel: done" in out
    # auto chose series for a small plan on this machine, and said why.
    assert re.search(r"deploy mode\s+series \(auto: .+\)", out), out
    wall, phases = _phases(out)
    # The command's wall time, from its process's start: not the flow's alone.
    assert wall <= elapsed + 0.5
    assert wall >= 0.7 * elapsed, (wall, elapsed)
    assert set(phases) <= set(PHASES) and {"start-up", "planning", "data"} <= set(phases)
    assert abs(sum(phases.values()) - wall) <= 0.1 * len(phases) + 0.05
    assert_cache_equals_files(tmp_path / "cache.zarr", files)

    imported: list[str] = []
    out, _ = _run(request, imports=imported)
    assert "zarr-parallel: up to date" in out
    # Answered without Prefect or distributed: the imports a plan needs, no more.
    assert "xarray" in imported and "prefect" not in imported and "distributed" not in imported
    assert "flow run            none: the cache was found up to date before it" in out
    wall, phases = _phases(out)
    assert "data" not in phases

    # A changed source is never answered up to date: the flow runs and writes the new values.
    with xr.open_dataset(files[1], engine="h5netcdf") as ds:
        changed = ds.load()
    changed["t2m"] = changed["t2m"] + 1
    changed.to_netcdf(files[1], engine="h5netcdf")
    out, _ = _run(request)
    assert "zarr-parallel: done" in out and "flow run" not in out
    assert_cache_equals_files(tmp_path / "cache.zarr", files)


def test_without_an_api_the_command_starts_its_own_and_stops_it(
    tmp_path: Path, era5_factory: Any
) -> None:
    files = era5_factory(n_files=2, steps_per_file=12, chunks=(6, 73, 144), seed=22)
    request = _request(tmp_path, files)
    home = tmp_path / "prefect-home"
    env = changed_env(PREFECT_API_URL=None, PREFECT_HOME=str(home))
    out, _ = _run(request, env)
    assert "zarr-parallel: done" in out
    assert_cache_equals_files(tmp_path / "cache.zarr", files)
    # The flow ran against the command's temporary API (its database is in this home) ...
    assert (home / "prefect.db").exists()
    # ... which did not outlive the command.
    assert temporary_servers(home) == []


def test_the_python_api_reports_the_choice_and_the_phases(
    tmp_path: Path, era5_factory: Any
) -> None:
    files = era5_factory(n_files=2, steps_per_file=12, chunks=(6, 73, 144), seed=23)
    zp = ZarrParallelAssembler([str(p) for p in files], chunks={"time": 6})
    result = zp.cache(str(tmp_path / "cache.zarr"), memory_limit="1GB")
    summary = result.summary
    assert summary["deploy_mode"] == "series" and summary["deploy_mode_reason"]
    assert summary["flow_run"] is True
    assert list(result.phases) == list(PHASES)
    assert abs(sum(result.phases.values()) - summary["seconds"]) < 0.05
    again = zp.cache(str(tmp_path / "cache.zarr"), memory_limit="1GB")
    assert again.status == "up to date" and again.summary["flow_run"] is False
    assert again.phases["data"] == 0.0
    assert os.path.realpath(again.path) == os.path.realpath(result.path)
