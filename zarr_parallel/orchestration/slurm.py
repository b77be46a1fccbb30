"""SLURM: the dask-jobqueue ``SLURMCluster`` configuration of a run; what SLURM says of its jobs.

The SLURM backend is configuration of dask-jobqueue (:func:`slurm_cluster_kwargs`), not a
subclass or a hand-written sbatch script. While the flow watches its cluster
(:meth:`zarr_parallel.orchestration.cluster.ClusterHandle.check`) it asks ``squeue`` which worker
jobs still live (:func:`squeue_states`) and reads from a job's log why SLURM ended it
(:func:`slurm_end_reason`).
"""

from __future__ import annotations

import getpass
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zarr_parallel.orchestration.runners import worker_environment
from zarr_parallel.planning.sizing import WorkerSizing, slurm_duration
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.store.disk_names import manifest_dir
from zarr_parallel.units import format_bytes

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_MEM_RE = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")


def is_loopback(url: str | None) -> bool:
    """True when ``url`` points at this machine only."""
    return bool(url) and (urlparse(str(url)).hostname or "") in _LOOPBACK


def log_directory(req: CacheRequest, version: Path) -> Path:
    """Where SLURM job scripts write their output: ``slurm.log_directory`` or the manifest's."""
    if req.slurm.log_directory:
        return Path(req.slurm.log_directory).expanduser()
    return manifest_dir(version) / "slurm-logs"


def slurm_cluster_kwargs(
    req: CacheRequest, sizing: WorkerSizing, api_url: str | None, logs: Path
) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for this run.

    One worker process per SLURM job, one thread, ``--mem`` from the plan's largest job,
    ``--time`` from ``worker_timeout``, workers retiring before the walltime, the environment
    in the job script's prologue, and the site's partition, account, QOS, directives and
    prologue from the request's ``slurm:`` block.
    """
    s = req.slurm
    # A SLURM job has the cores it asked for (--cpus-per-task), whatever the node has.
    env = worker_environment(req, api_url, s.cores)
    prologue = [*s.prologue, *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))]
    directives = [*([f"--qos={s.qos}"] if s.qos else []), *s.directives]
    mem_mib = -(-sizing.memory // 2**20)
    scheduler_options: dict[str, Any] = {"allowed_failures": 0, "dashboard_address": None}
    if s.interface:
        scheduler_options["interface"] = s.interface
    return {
        "cores": s.cores,
        "processes": 1,
        "memory": str(sizing.memory),
        # dask-jobqueue rounds --mem up to whole GiB above 1 GiB; ask for what was derived.
        "job_mem": f"{mem_mib}M",
        "walltime": slurm_duration(sizing.walltime),
        "queue": s.partition,
        "account": s.account,
        "job_extra_directives": directives,
        "job_script_prologue": prologue,
        "interface": s.interface,
        "log_directory": str(logs),
        "job_name": "zarr-parallel",
        "python": sys.executable,
        # The job process lives beside the worker; a nanny would only add memory to the job.
        "nanny": False,
        # A worker whose flow is gone stops, and so does its SLURM job.
        "death_timeout": 60,
        "worker_extra_args": [
            "--lifetime",
            f"{int(sizing.lifetime)}s",
            "--lifetime-stagger",
            "10s",
        ],
        "scheduler_options": scheduler_options,
    }


@dataclass(frozen=True)
class EndReason:
    """Why SLURM ended a worker job: ``kind`` is memory, walltime or cancelled."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


def slurm_end_reason(logs: Path, job_id: str) -> EndReason | None:
    """What SLURM wrote about the end of job ``job_id`` in its log."""
    text = ""
    for path in logs.glob(f"*-{job_id}.err"):
        try:
            text += path.read_text(errors="replace")
        except OSError:
            continue
    if not text:
        return None
    m = _MEM_RE.search(text)
    if m or "Exceeded job memory limit" in text:
        used = f" ({format_bytes(int(m.group(1)))} > {format_bytes(int(m.group(2)))})" if m else ""
        return EndReason(
            "memory",
            f"SLURM job {job_id} was killed by SLURM for exceeding its memory limit{used}: "
            "the job used more than its estimate; raise memory_limit or report the request",
        )
    if "DUE TO TIME LIMIT" in text:
        return EndReason("walltime", f"SLURM job {job_id} was killed by SLURM at its walltime")
    if "CANCELLED" in text:
        return EndReason(
            "cancelled", f"SLURM job {job_id} was cancelled (scancel, preemption or node failure)"
        )
    return None


def squeue_states(job_ids: set[str]) -> dict[str, str]:
    """State of each of ``job_ids`` still known to ``squeue`` (PENDING, RUNNING...)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        # squeue unreachable: assume the jobs live rather than replace them blindly.
        return dict.fromkeys(job_ids, "UNKNOWN")
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in job_ids:
            states[parts[0]] = parts[1]
    return states
