"""A site's ``jobqueue.yaml`` and the request's ``slurm:`` block make one SLURM job script.

dask-jobqueue reads its configuration only for options passed as None; the run passes its own
lists, so :func:`slurm_cluster_kwargs` merges the site's. Job scripts are built by dask-jobqueue's
``SLURMJob`` without starting a cluster (no SLURM needed), as dask-jobqueue's own tests read
``job_script()`` text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed import Scheduler

from core_support import changed_env
from zarr_parallel.orchestration.runners import worker_sizing
from zarr_parallel.orchestration.slurm import (
    directive_key,
    merge_directives,
    slurm_cluster_kwargs,
    slurm_job_script,
)
from zarr_parallel.request.model import build_request

SITE = {
    "job-extra-directives": ["--mem=64G", "-p bigmem", "--exclusive", "--gres=gpu:1"],
    "job-script-prologue": ["module load site-python", "source /etc/site-env.sh"],
    "worker-extra-args": ["--lifetime", "4h", "--resources", "GPU=1"],
}


def _script(tmp_path: Path, **slurm: Any) -> list[str]:
    req = build_request(
        data_uri=__file__,
        cache_store=str(tmp_path / "c.zarr"),
        deploy_mode="SLURM",
        memory_limit="4GB",
        worker_timeout="20:00",
        simultaneous_worker_limit=3,
        slurm=slurm,
    )
    sizing = worker_sizing(req, max_job_estimate=1_000_000_000, jobs=10)
    kwargs = slurm_cluster_kwargs(req, sizing, "http://prefect.example:4200/api", tmp_path)
    return slurm_job_script(kwargs).splitlines()


def test_site_settings_are_kept_and_the_request_wins_per_directive(tmp_path: Path) -> None:
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in SITE.items()}):
        lines = _script(
            tmp_path, partition="compute", directives=["--constraint=intel"], prologue=["ml x"]
        )
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    # The plan's memory and the request's partition win over the site's lines for them.
    assert "#SBATCH --mem=1532M" in sbatch and "#SBATCH --mem=64G" not in sbatch
    assert "#SBATCH -p compute" in sbatch and "#SBATCH -p bigmem" not in sbatch
    # The site's other lines stay, beside the request's.
    assert "#SBATCH --exclusive" in sbatch and "#SBATCH --gres=gpu:1" in sbatch
    assert "#SBATCH --constraint=intel" in sbatch
    # The site's prologue runs first, then the request's, then the run's environment.
    assert lines.index("module load site-python") < lines.index("ml x")
    assert lines.index("source /etc/site-env.sh") < lines.index("ml x")
    assert lines.index("ml x") < lines.index(
        "export PREFECT_API_URL=http://prefect.example:4200/api"
    )
    # Worker arguments: the run's --lifetime (retire before the walltime), the site's others.
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "--resources GPU=1" in worker and "--lifetime 4980s" in worker
    assert "4h" not in worker


def test_without_a_request_partition_the_site_partition_stays(tmp_path: Path) -> None:
    with dask.config.set({"jobqueue.slurm.job-extra-directives": ["-p bigmem", "-A site"]}):
        lines = _script(tmp_path, account="mine")
    assert "#SBATCH -p bigmem" in lines
    assert "#SBATCH -A mine" in lines and "#SBATCH -A site" not in lines


def test_no_site_configuration_changes_nothing(tmp_path: Path) -> None:
    lines = _script(tmp_path, directives=["--constraint=intel"])
    extra = lines[lines.index("#SBATCH -t 1:25:00") + 1 :]
    assert extra[0] == "#SBATCH --constraint=intel"
    assert not any(line.startswith("#SBATCH") for line in extra[1:])


def test_a_jobqueue_yaml_in_dask_config_is_read(tmp_path: Path) -> None:
    """The site file as users write it, found through ``DASK_CONFIG`` by a fresh process."""
    config = tmp_path / "dask"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(
        textwrap.dedent(
            """\
            jobqueue:
              slurm:
                job-extra-directives: ["--mem-per-cpu=8G", "--reservation=climate"]
                job-script-prologue: ["module load site-python"]
                job-directives-skip: ["-n 1"]
            """
        )
    )
    code = textwrap.dedent(
        f"""\
        import json, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from pathlib import Path
        from test_slurm_site import _script
        print(json.dumps(_script(Path({str(tmp_path)!r}))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=changed_env(DASK_CONFIG=str(config)),
        timeout=120,
        check=True,
    ).stdout
    lines = json.loads(out.splitlines()[-1])
    assert "#SBATCH --reservation=climate" in lines
    # --mem-per-cpu and --mem are one setting for sbatch: the plan's --mem wins.
    assert "#SBATCH --mem=1532M" in lines and "#SBATCH --mem-per-cpu=8G" not in lines
    assert "module load site-python" in lines
    # Settings the run never passes (here job-directives-skip) still come from the site.
    assert "#SBATCH -n 1" not in lines


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("-p short", "--partition"),
        ("--partition=short", "--partition"),
        ("--partition short", "--partition"),
        ("-pshort", "--partition"),
        ("-t 1-00", "--time"),
        ("--mem=4G", "--mem"),
        ("--mem-per-cpu=2G", "--mem"),
        ("--exclusive", "--exclusive"),
        ("#SBATCH --qos=high", "--qos"),
        ("--gres=gpu:2", "--gres"),
    ],
)
def test_directive_keys(directive: str, key: str) -> None:
    assert directive_key(directive) == key


def test_merge_keeps_order_and_drops_only_what_ours_set() -> None:
    site = ["--exclusive", "-q low", "--gres=gpu:1", "--qos=other"]
    assert merge_directives(site, ["--qos=high"], set()) == [
        "--exclusive",
        "--gres=gpu:1",
        "--qos=high",
    ]


def test_the_slurm_scheduler_takes_no_dashboard_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SLURM cluster's scheduler (on a login node other users share) listens on a free
    loopback port for its HTTP routes, not on 8787: no "Port 8787 is already in use"."""
    req = build_request(
        data_uri=__file__, cache_store=str(tmp_path / "c.zarr"), deploy_mode="SLURM"
    )
    sizing = worker_sizing(req, max_job_estimate=10**8, jobs=2)
    options = slurm_cluster_kwargs(req, sizing, None, tmp_path)["scheduler_options"]
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 8787))
        held.listen()
    except OSError:
        pass  # already taken by someone else: just as good

    async def start() -> int:
        async with Scheduler(**options, port=0, host="127.0.0.1") as scheduler:
            return int(scheduler.http_server.port)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with caplog.at_level(logging.WARNING, logger="distributed"):
                port = asyncio.run(start())
    finally:
        held.close()
    assert port != 8787
    said = caplog.text + "".join(str(w.message) for w in caught)
    assert "already in use" not in said


def test_a_run_does_not_wait_on_an_squeue_it_cannot_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``squeue`` on the PATH (a machine that cannot ask SLURM): nothing to wait for, no wait.
    With a reachable ``squeue`` the SLURM tests check that no job outlives its run."""
    from zarr_parallel.orchestration.slurm import wait_until_gone

    monkeypatch.setenv("PATH", "")
    assert wait_until_gone({"12345"}, timeout=60) == set()
    assert wait_until_gone(set(), timeout=60) == set()
