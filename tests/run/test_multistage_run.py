"""A staged run of three stages end to end (docs/design.md §3.4, "Strategies"): maps → time series
through two intermediate Zarr stores, equal to the source (values and dtypes), the intermediates
gone after publish; and a resume after a kill in the middle stage.

Small real netCDF4 files (four days of hourly 91 × 180 maps, one HDF5 chunk per step) to
``{time: 96, latitude: 10, longitude: 10}`` with a 2 MB budget per job (``memory_reserve``): one
write chunk with the source chunks it touches needs 6 MB, so there is no direct plan, and a
single intermediate that keeps both of its stages within 2 MB would need chunks smaller than
the target's (38 kB), so the planner chains two. The xarray read path, whose memory model has no
fixed thread allowance (as in test_staged_run.py).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from core_support import cli_run
from tests.run.test_staged_run import assert_equal_to_source, assert_no_intermediate, fields
from zarr_parallel.api import run_request
from zarr_parallel.request.model import build_request
from zarr_parallel.run.plan_view import view_plan
from zarr_parallel.run.preflight import estimate_intermediate
from zarr_parallel.run.steps import make_plan
from zarr_parallel.store.manifest import iter_job_records, plan_record
from zarr_parallel.store.paths import CachePaths

SERIES = {"time": 96, "latitude": 10, "longitude": 10}
RESERVE = "298MB"  # of memory_limit 300MB: a 2 MB budget per job


@pytest.fixture(autouse=True)
def xarray_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")


@pytest.fixture(scope="module")
def maps(era5_factory: Any) -> list[Path]:
    """Four days of hourly maps, one HDF5 chunk per step (test_staged_run.py's files)."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None)


def three_stage_fields(files: list[Path], store: Path, **extra: Any) -> dict[str, Any]:
    return fields(files, store, SERIES, memory_reserve=RESERVE, **extra)


def test_three_stage_round_trip(maps: list[Path], tmp_path: Path) -> None:
    """Both intermediates under ``temp_store``: only the run's own subfolders are removed."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("not ours")
    store = tmp_path / "c.zarr"
    req = build_request(**three_stage_fields(maps, store, temp_store=str(scratch)))
    _, plan = make_plan(req)
    assert plan.strategy == "staged" and len(plan.stages) == 2, plan.strategy_reason
    assert "3 stages because" in plan.strategy_reason
    assert plan.read_amplification == 1.0
    # `plan` shows every stage.
    text = view_plan(req).text()
    assert all(f"stage {k}/3:" in text for k in (1, 2, 3)), text
    # Pre-flight counts both intermediate stores: every chunk file of each.
    space = estimate_intermediate(plan, 4096)
    files = [
        2 * math.prod(-(-n // c) for n, c in zip((96, 91, 180), dict(s.chunks)["t2m"], strict=True))
        for s in plan.stages
    ]
    assert space.chunk_files == sum(files) and space.data_bytes >= plan.intermediate_bytes
    result = run_request(req)
    assert result.summary["strategy"] == "staged"
    assert [s["stage"] for s in result.summary["stages"]] == [1, 2, 3]
    assert result.summary["jobs_run"] == len(plan.jobs)
    assert_equal_to_source(store, maps)
    assert_no_intermediate(store)
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]


def killed(fields_: dict[str, Any], folder: Path, fault: str) -> None:
    """Run the request through the command line until ``fault`` kills it."""
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(fields_))
    proc = cli_run(path, fault)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}: {err[-2000:]}"


def started(folder: Path) -> dict[int, float]:
    """When each job recorded in ``folder`` started (a job run again starts later)."""
    return {r["id"]: r["started"] for r in iter_job_records(folder)}


def test_kill_in_the_middle_stage_then_resume(maps: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    f = three_stage_fields(maps, store)
    _, plan = make_plan(build_request(**f))
    n1, n2 = (len(s.plan.jobs) for s in plan.stages)
    assert n2 >= 3
    # The second job of stage 2 (of 3) records, then the process is killed.
    killed(f, tmp_path, f"kill@job-recorded#{n1 + 2}")
    assert not store.exists()
    paths = CachePaths(store)
    (first,) = paths.versions.glob(".stage-1-*")
    (middle,) = paths.versions.glob(".stage-2-*")
    (version,) = paths.all_versions()
    # The middle store copies from the first (its plan lists the stores written before it).
    assert plan_record(middle)["intermediates"] == [str(first)]
    assert plan_record(version)["intermediates"] == [str(first), str(middle)]
    before = {folder: started(folder) for folder in (first, middle, version)}
    assert [len(before[p]) for p in (first, middle, version)] == [n1, 2, 0]
    # Resumed up to the publish: only the jobs not recorded ran, in every stage.
    killed(f, tmp_path, "kill@before-finalise")
    assert started(first) == before[first]
    resumed = started(middle)
    assert sorted(resumed) == list(range(n2))
    assert {i: resumed[i] for i in before[middle]} == before[middle]
    assert len(started(version)) == len(plan.jobs)
    result = run_request(build_request(**f))
    assert result.summary["resumed"]
    assert plan_record(store.resolve())["fingerprint"] == plan.fingerprint
    assert_equal_to_source(store, maps)
    assert_no_intermediate(store)
