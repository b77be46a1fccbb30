"""``zarr-parallel recache`` starts like ``run`` (docs/design.md §2b): real commands, real files.

- a cache that is up to date is answered before any flow run, without importing Prefect, with
  the re-cache flow's own decision and the command's wall time broken into phases;
- without ``PREFECT_API_URL`` the command starts its temporary API itself (first, while it
  plans) and stops it; an append runs the re-cache flow against it, with the phases of its run;
- with a lock file at the cache the flow runs (its lock decides), as for ``run``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from tests.core_support import changed_env, open_cache, temporary_servers
from zarr_parallel.run.phases import PHASES
from zarr_parallel.run.verify import location_snapshot
from zarr_parallel.store.lock import cache_lock
from zarr_parallel.store.paths import CachePaths


def _request(tmp_path: Path, src: Path) -> Path:
    request = tmp_path / "request.yaml"
    request.write_text(
        yaml.safe_dump(
            {
                "data_uri": str(src / "*.nc"),
                "cache_store": str(tmp_path / "cache.zarr"),
                "chunks": {"time": 6, "latitude": 73, "longitude": 144},
                "memory_limit": "1GB",
                "deploy_mode": "series",
            }
        )
    )
    return request


def _source(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(exist_ok=True)
    for f in files:
        shutil.copy2(f, folder / f.name)
    return folder


def _command(
    module: str, *args: str, env: dict[str, str] | None = None, imports: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS``; ``imports`` gets the modules it imported (``-X importtime``)."""
    flags = ["-X", "importtime"] if imports is not None else []
    proc = subprocess.run(
        [sys.executable, *flags, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if imports is not None:
        imports += [
            line.rsplit("|", 1)[1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        ]
    return proc


def _phases(stdout: str) -> tuple[float, dict[str, float]]:
    m = re.search(r"wall time\s+([\d.]+) s \(([^)]*)\)", stdout)
    assert m, stdout
    parts = dict(p.rsplit(" ", 1) for p in m.group(2).split(", "))
    return float(m.group(1)), {k: float(v) for k, v in parts.items()}


def _same(cache: Path, src: Path) -> None:
    with xr.open_mfdataset(sorted(src.glob("*.nc")), engine="h5netcdf") as expected:
        got = open_cache(cache)
        np.testing.assert_array_equal(got.time.values, expected.time.values)
        for name in ("t2m", "d2m"):
            assert got[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(got[name].values, expected[name].values)


def _files(era5_factory: Any) -> list[Path]:
    return list(era5_factory(n_files=3, steps_per_file=12, chunks=(6, 73, 144), seed=41))


def _cached(tmp_path: Path, era5_factory: Any) -> Path:
    """The request of a cache of three files, made by ``flows.cache run``."""
    request = _request(tmp_path, _source(tmp_path / "src", _files(era5_factory)))
    made = _command("flows.cache", "run", str(request))
    assert made.returncode == 0, made.stderr[-3000:]
    return request


def test_an_unchanged_cache_is_answered_before_any_flow_run(
    tmp_path: Path, era5_factory: Any
) -> None:
    request = _cached(tmp_path, era5_factory)
    snapshot = location_snapshot(tmp_path / "cache.zarr")

    imported: list[str] = []
    proc = _command("flows.recache", str(request), imports=imported)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "zarr-parallel: up to date" in out
    assert "flow run            none: the cache was found up to date before it" in out
    # The re-cache flow's own decision, from the same full plan.
    assert re.search(r"re-cache\s+up_to_date: the request and the source are unchanged", out), out
    # Answered without Prefect or distributed: the imports a plan needs, no more.
    assert "xarray" in imported and "prefect" not in imported and "distributed" not in imported
    wall, phases = _phases(out)
    assert set(phases) <= set(PHASES) and {"start-up", "planning"} <= set(phases)
    assert "data" not in phases
    assert abs(sum(phases.values()) - wall) <= 0.1 * len(phases) + 0.05
    # A check says the same, from the same answer.
    check = _command("flows.recache", str(request), "--check")
    assert check.returncode == 0, check.stderr[-3000:]
    assert "flow run            none" in check.stdout and "re-cache            up_to_date" in (
        check.stdout
    )
    assert location_snapshot(tmp_path / "cache.zarr") == snapshot


def test_without_an_api_an_append_runs_against_the_commands_own(
    tmp_path: Path, era5_factory: Any
) -> None:
    files = _files(era5_factory)
    src = _source(tmp_path / "src", files[:2])
    request = _request(tmp_path, src)
    made = _command("flows.cache", "run", str(request))
    assert made.returncode == 0, made.stderr[-3000:]
    _source(src, files[2:])  # the source grows by a file

    home = tmp_path / "prefect-home"
    env = changed_env(PREFECT_API_URL=None, PREFECT_HOME=str(home))
    t0 = time.time()
    proc = _command("zarr_parallel.cli", "recache", str(request), env=env)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "zarr-parallel: appended" in out and "flow run            none" not in out
    assert re.search(r"re-cache\s+append: ", out), out
    _same(tmp_path / "cache.zarr", src)
    # The command's wall time, from its process's start, broken into the run's phases.
    wall, phases = _phases(out)
    assert 0.7 * elapsed <= wall <= elapsed + 0.5, (wall, elapsed)
    assert {"start-up", "planning", "initialise", "data"} <= set(phases)
    assert abs(sum(phases.values()) - wall) <= 0.1 * len(phases) + 0.05
    # The flow ran against the command's temporary API (its database is in this home) ...
    assert (home / "prefect.db").exists()
    # ... which did not outlive the command.
    assert temporary_servers(home) == []
    assert len(CachePaths(tmp_path / "cache.zarr").all_versions()) == 2


def test_with_a_lock_file_the_flow_runs_and_its_lock_decides(
    tmp_path: Path, era5_factory: Any
) -> None:
    request = _cached(tmp_path, era5_factory)
    paths = CachePaths(tmp_path / "cache.zarr")
    with cache_lock(paths.lock):  # another run (this process) holds the cache
        proc = _command("flows.recache", str(request))
    # Not answered before the flow: the flow's lock refused the run.
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "held by a running process" in proc.stderr, proc.stderr[-3000:]
    assert "flow run            none" not in proc.stdout
