"""The plan report: the SLURM job script ``plan`` prints (dask-jobqueue's ``SLURMJob``, no
cluster started) and the plan picture a run publishes in the Prefect UI (read back through the
Prefect API).

Here the artifact's content is checked through the API; test_plan_picture_ui.py looks at the
same artifact in the Prefect UI with headless Chromium.
"""

from __future__ import annotations

import base64
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import yaml
from prefect.artifacts import Artifact

from core_support import open_cache
from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.orchestration.command import main
from zarr_parallel.orchestration.plan_report import describe_plan
from zarr_parallel.orchestration.runners import worker_sizing
from zarr_parallel.orchestration.slurm import log_directory
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.planning.sizing import slurm_duration
from zarr_parallel.request.model import build_request

SVG = "{http://www.w3.org/2000/svg}"
FIELDS: dict[str, Any] = {"chunks": {"time": 12, "latitude": 40, "longitude": 72}}
SLURM: dict[str, Any] = {
    "deploy_mode": "SLURM",
    "memory_limit": "2GB",
    "worker_timeout": "45:00",
    "num_jobs": 6,
    "simultaneous_worker_limit": 2,
    "slurm": {"partition": "debug", "account": "climate", "directives": ["--constraint=ssd"]},
}


def test_slurm_job_script_has_the_derived_memory_and_walltime(
    era5_files: list[Path], tmp_path: Path
) -> None:
    req = build_request(
        data_uri=[str(f) for f in era5_files],
        cache_store=str(tmp_path / "c.zarr"),
        variables={"t2m": {}},
        **FIELDS,
        **SLURM,
    )
    view = describe_plan(req)
    script = view.slurm_script
    assert script is not None and script.startswith("#!/usr/bin/env bash")
    sizing = worker_sizing(view.request, view.plan.max_job_memory, len(view.prepared.todo))
    # --mem: the largest job's estimate plus margin, within the memory limit (MiB, rounded up).
    mem = re.search(r"^#SBATCH --mem=(\d+)M$", script, re.M)
    assert mem is not None and int(mem.group(1)) == -(-sizing.memory // 2**20)
    assert view.plan.max_job_memory < sizing.memory <= req.memory_bytes
    # -t: the jobs one worker runs, each within worker_timeout, plus the margin.
    walltime = re.search(r"^#SBATCH -t (\S+)$", script, re.M)
    assert walltime is not None and walltime.group(1) == slurm_duration(sizing.walltime)
    jobs_per_worker = -(-len(view.plan.jobs) // 2)
    assert sizing.walltime >= jobs_per_worker * 45 * 60
    for line in ("#SBATCH -p debug", "#SBATCH -A climate", "#SBATCH --constraint=ssd"):
        assert line in script
    assert "--lifetime" in script and "--no-nanny" in script
    assert "export PREFECT_SERVER_EPHEMERAL_ENABLED=false" in script
    logs = log_directory(view.request, view.prepared.version)
    assert f"#SBATCH -e {logs}/" in script
    assert not logs.exists() and not (tmp_path / "c.zarr").exists(), "planning writes nothing"
    assert not list(tmp_path.iterdir())


def test_plan_command_prints_the_job_script(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = os.path.relpath(era5_files[0].parent, tmp_path)
    req = tmp_path / "request.yaml"
    fields = {"data_uri": f"{rel}/era5_like_*.nc", "cache_dir": "out", **FIELDS, **SLURM}
    req.write_text(yaml.safe_dump(fields))
    assert main(["plan", str(req)]) == 0
    out = capsys.readouterr().out
    assert "workers:             up to 2 at once (slurm)" in out
    assert "#!/usr/bin/env bash" in out and "#SBATCH --mem=" in out
    assert "dask_worker tcp://SCHEDULER-ADDRESS:PORT" in out
    assert not (tmp_path / "out").exists()
    # Other modes submit no job script.
    assert main(["plan", str(req), "--set", "deploy_mode=series"]) == 0
    assert "#SBATCH" not in capsys.readouterr().out


def test_run_publishes_the_plan_picture_inline(era5_files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    result = ZarrParallelAssembler(
        [str(f) for f in era5_files], variables={"t2m": {}}, **FIELDS
    ).cache(str(store), deploy_mode="series", num_jobs=4)
    jobs = result.summary["jobs"]
    art = Artifact.get(artifact_key("zp-plan-picture", store))
    assert art is not None and art.type == "markdown"
    md = str(art.data)
    assert md.startswith("# Plan of t2m")
    data = re.search(r'<img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"/>', md)
    assert data is not None
    svg = ET.fromstring(base64.b64decode(data.group(1)))
    drawn = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "job"]
    assert len(drawn) == 3 * jobs  # one per job in each of the three panels
    assert f"- jobs: {jobs}\n" in md and "- source chunks: 40\n" in md
    # The run itself: values and dtypes as the source's.
    cache = open_cache(store)
    with xr.open_mfdataset(era5_files, engine="h5netcdf", combine="by_coords") as src:
        expected = src[["t2m"]].load()
    xr.testing.assert_equal(cache["t2m"], expected["t2m"])
    assert cache["t2m"].dtype == expected["t2m"].dtype
