"""Helpers shared by the core tests (round trips, CLI, runs frozen at a fault point)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import xarray as xr

from zarr_parallel.store.provenance import PREFIX as PROVENANCE


def series_fields(files: list[Path], store: Path, **extra: Any) -> dict[str, Any]:
    """The request fields of a small series-mode run of ``files`` into ``store`` (4 jobs);
    ``extra`` fields (``chunks`` among them) are added or override."""
    return {
        "data_uri": [str(p) for p in files],
        "cache_store": str(store),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 4,
        **extra,
    }


def changed_env(**changes: str | None) -> dict[str, str]:
    """This process's environment with ``changes`` (None removes a variable), for a subprocess."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def open_cache(path: Path) -> xr.Dataset:
    """A cache, loaded, without its provenance attributes (those are tested in test_sources_*)."""
    cache = xr.open_zarr(path).load()
    cache.attrs = {k: v for k, v in cache.attrs.items() if not k.startswith(PROVENANCE)}
    return cache


def assert_cache_equals_files(
    cache: Path, files: list[Path], names: tuple[str, ...] = ("t2m", "d2m")
) -> None:
    """The cache's variables ``names`` equal the netCDF ``files`` joined, values and dtypes."""
    import numpy as np

    with xr.open_mfdataset(files, engine="h5netcdf") as src:
        got = open_cache(cache)
        for name in names:
            assert got[name].dtype == src[name].dtype
            np.testing.assert_array_equal(got[name].values, src[name].values)


def cli_run(
    request: Path,
    fault: str | None = None,
    command: str = "run",
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``python -m flows.cache COMMAND REQUEST`` in a subprocess, in ``env`` (default this
    process's environment) with ``ZARR_PARALLEL_FAULT=fault``."""
    env = dict(os.environ if env is None else env)
    if fault:
        env["ZARR_PARALLEL_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cache", command, str(request)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_result(
    request: Path,
    timeout: float = 600,
    command: str = "run",
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """A :func:`cli_run` of ``request`` waited for: its exit code, stdout and stderr.

    Killed, and ``subprocess.TimeoutExpired`` raised, if it has not ended after ``timeout`` s.
    """
    proc = cli_run(request, command=command, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextmanager
def frozen_run(request: Path, point: str) -> Iterator[subprocess.Popen[str]]:
    """A CLI run of ``request`` stopped (SIGSTOP) at the fault point ``point``, e.g.
    ``job-recorded#1``; yields it stopped (SIGCONT resumes it) and kills it on the way out."""
    proc = cli_run(request, f"stop@{point}")
    try:
        deadline = time.time() + 300
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, f"the run never reached {point}"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()


def temporary_servers(home: Path) -> list[psutil.Process]:
    """The temporary Prefect API servers (uvicorn) running with ``PREFECT_HOME=home``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "uvicorn" in " ".join(proc.info["cmdline"] or []) and (
                proc.environ().get("PREFECT_HOME") == str(home)
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found
