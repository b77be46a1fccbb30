"""SLURM: the dask-jobqueue ``SLURMCluster`` configuration of a run; what SLURM says of its jobs.

The SLURM backend is configuration of dask-jobqueue (:func:`slurm_cluster_kwargs`), not a
subclass or a hand-written sbatch script. While the flow watches its cluster
(:meth:`zarr_parallel.orchestration.cluster.ClusterHandle.check`) it asks ``squeue`` which worker
jobs still live (:func:`squeue_states`) and reads from a job's log why SLURM ended it
(:func:`slurm_end_reason`).
"""

from __future__ import annotations

import getpass
import logging
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dask.config
from dask_jobqueue.slurm import SLURMJob

from zarr_parallel.orchestration.runners import worker_environment
from zarr_parallel.planning.sizing import WorkerSizing, slurm_duration
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.store.disk_names import manifest_dir
from zarr_parallel.units import format_bytes

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_MEM_RE = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")

logger = logging.getLogger(__name__)

#: sbatch's short options and their long names, so ``-p x`` and ``--partition=x`` are one key.
_SBATCH_LONG = {
    "-A": "--account",
    "-a": "--array",
    "-C": "--constraint",
    "-c": "--cpus-per-task",
    "-D": "--chdir",
    "-d": "--dependency",
    "-e": "--error",
    "-G": "--gpus",
    "-J": "--job-name",
    "-L": "--licenses",
    "-M": "--clusters",
    "-N": "--nodes",
    "-n": "--ntasks",
    "-o": "--output",
    "-p": "--partition",
    "-q": "--qos",
    "-t": "--time",
    "-w": "--nodelist",
    "-x": "--exclude",
}
#: sbatch refuses more than one of these: they are one setting, the job's memory.
_MEMORY_KEYS = {"--mem-per-cpu": "--mem", "--mem-per-gpu": "--mem"}


def is_loopback(url: str | None) -> bool:
    """True when ``url`` points at this machine only."""
    return bool(url) and (urlparse(str(url)).hostname or "") in _LOOPBACK


def log_directory(req: CacheRequest, version: Path) -> Path:
    """Where SLURM job scripts write their output: ``slurm.log_directory`` or the manifest's."""
    if req.slurm.log_directory:
        return Path(req.slurm.log_directory).expanduser()
    return manifest_dir(version) / "slurm-logs"


def directive_key(directive: str) -> str:
    """The sbatch option a directive sets, in its long form.

    >>> directive_key("-p short"), directive_key("--partition=long"), directive_key("-pshort")
    ('--partition', '--partition', '--partition')
    >>> directive_key("--mem-per-cpu=2G"), directive_key("#SBATCH --exclusive")
    ('--mem', '--exclusive')
    """
    words = directive.strip().removeprefix("#SBATCH").split()
    first = words[0].split("=", 1)[0] if words else ""
    if len(first) > 2 and first[0] == "-" and first[1] != "-":
        first = first[:2]  # "-pshort": sbatch's short options take their value attached too
    key = _SBATCH_LONG.get(first, first)
    return _MEMORY_KEYS.get(key, key)


def _option_groups(args: list[str]) -> list[tuple[str, list[str]]]:
    """Split worker arguments into (option, its words): ``--lifetime 1h`` is one group."""
    groups: list[tuple[str, list[str]]] = []
    for word in args:
        if word.startswith("-") or not groups:
            groups.append((word.split("=", 1)[0], [word]))
        else:
            groups[-1][1].append(word)
    return groups


def merge_worker_args(site: list[str], ours: list[str]) -> list[str]:
    """The site's worker arguments, less the options ours set, then ours.

    >>> merge_worker_args(["--lifetime", "1h", "--resources", "GPU=1"], ["--lifetime", "600s"])
    ['--resources', 'GPU=1', '--lifetime', '600s']
    """
    taken = {option for option, _ in _option_groups(ours)}
    kept = [w for option, words in _option_groups(site) if option not in taken for w in words]
    return [*kept, *ours]


def merge_directives(site: list[str], ours: list[str], generated: set[str]) -> list[str]:
    """The site's ``#SBATCH`` directives less those ours set (by sbatch option), then ours.

    ``generated`` are the options dask-jobqueue writes itself from this run's settings
    (``--mem``, ``--time``...): a site's line for one of them would override the plan's value,
    as sbatch takes the last of repeated options.

    >>> merge_directives(["--mem=64G", "-p big", "--exclusive"], ["--partition=small"], {"--mem"})
    ['--exclusive', '--partition=small']
    """
    taken = generated | {directive_key(d) for d in ours}
    return [*(d for d in site if directive_key(d) not in taken), *ours]


def site_setting(name: str, old_name: str) -> list[str]:
    """A list the site's dask-jobqueue configuration (``jobqueue.yaml``) sets for SLURM.

    dask-jobqueue reads its configuration only for options passed as None; this run passes
    its own lists, so it reads the site's here and merges them. ``old_name`` is the key
    dask-jobqueue still honours from before its 0.8 renames (``job-extra``, ``env-extra``...).
    """
    value = dask.config.get(f"jobqueue.slurm.{name}", None) or dask.config.get(
        f"jobqueue.slurm.{old_name}", None
    )
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _generated_directives(kwargs: dict[str, Any]) -> set[str]:
    """The sbatch options dask-jobqueue's SLURMJob writes from these keyword arguments."""
    keys = {"--job-name", "--ntasks", "--cpus-per-task", "--mem", "--time"}
    if kwargs.get("log_directory"):
        keys |= {"--error", "--output"}
    for name, key in (("queue", "--partition"), ("account", "--account")):
        if kwargs.get(name) or dask.config.get(f"jobqueue.slurm.{name}", None):
            keys.add(key)
    return keys


def slurm_cluster_kwargs(
    req: CacheRequest, sizing: WorkerSizing, api_url: str | None, logs: Path
) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for this run.

    One worker process per SLURM job, one thread, ``--mem`` from the plan's largest job,
    ``--time`` from ``worker_timeout``, workers retiring before the walltime, the environment
    in the job script's prologue, and the site's partition, account, QOS, directives and
    prologue from the request's ``slurm:`` block. The site's ``jobqueue.yaml`` lists
    (``job-extra-directives``, ``job-script-prologue``, ``worker-extra-args``) are merged in:
    the request's settings win per sbatch option or worker option, the site's other lines stay.
    """
    s = req.slurm
    # A SLURM job has the cores it asked for (--cpus-per-task), whatever the node has.
    env = worker_environment(req, api_url, s.cores)
    prologue = [*s.prologue, *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))]
    directives = [*([f"--qos={s.qos}"] if s.qos else []), *s.directives]
    mem_mib = -(-sizing.memory // 2**20)
    # No dashboard: the scheduler's HTTP server (health routes) takes a free loopback port, not
    # 8787, which another cluster on a shared login node may hold ("Port 8787 is already in use").
    scheduler_options: dict[str, Any] = {
        "allowed_failures": 0,
        "dashboard": False,
        "dashboard_address": "127.0.0.1:0",
    }
    if s.interface:
        scheduler_options["interface"] = s.interface
    worker_args = ["--lifetime", f"{int(sizing.lifetime)}s", "--lifetime-stagger", "10s"]
    kwargs: dict[str, Any] = {
        "cores": s.cores,
        "processes": 1,
        "memory": str(sizing.memory),
        # dask-jobqueue rounds --mem up to whole GiB above 1 GiB; ask for what was derived.
        "job_mem": f"{mem_mib}M",
        "walltime": slurm_duration(sizing.walltime),
        "queue": s.partition,
        "account": s.account,
        "interface": s.interface,
        "log_directory": str(logs),
        "job_name": "zarr-parallel",
        "python": sys.executable,
        # The job process lives beside the worker; a nanny would only add memory to the job.
        "nanny": False,
        # A worker whose flow is gone stops, and so does its SLURM job.
        "death_timeout": 60,
        "scheduler_options": scheduler_options,
    }
    site_directives = site_setting("job-extra-directives", "job-extra")
    kwargs["job_extra_directives"] = merge_directives(
        site_directives, directives, _generated_directives(kwargs)
    )
    # The site's lines first ("module load ..."), then the request's, then this run's exports.
    site_prologue = site_setting("job-script-prologue", "env-extra")
    kwargs["job_script_prologue"] = [*(p for p in site_prologue if p not in prologue), *prologue]
    kwargs["worker_extra_args"] = merge_worker_args(
        site_setting("worker-extra-args", "extra"), worker_args
    )
    dropped = [d for d in site_directives if d not in kwargs["job_extra_directives"]]
    if dropped:
        logger.info("site jobqueue.yaml directives replaced by this run's: %s", dropped)
    return kwargs


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


#: Seconds a run waits, once its SLURM cluster is closed, for ``squeue`` to drop its jobs.
SLURM_GONE_SECONDS = 30.0


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


def wait_until_gone(job_ids: set[str], timeout: float = SLURM_GONE_SECONDS) -> set[str]:
    """Wait until ``squeue`` lists none of ``job_ids``; the ids it still lists after ``timeout``.

    A cancelled job passes through COMPLETING while its processes stop: a run waits for its
    jobs to leave the queue before it returns, so none outlives it. An ``squeue`` that cannot
    be reached says nothing: then the run does not wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        states = squeue_states(job_ids)
        if "UNKNOWN" in states.values():
            return set()  # squeue unreachable: nothing is known to wait for
        if not states or time.monotonic() >= deadline:
            return set(states)
        time.sleep(0.5)


def slurm_job_script(
    kwargs: dict[str, Any], scheduler_address: str = "tcp://SCHEDULER:8786"
) -> str:
    """The job script ``SLURMCluster(**kwargs)`` would submit, built without starting a cluster.

    dask-jobqueue's ``SLURMJob`` writes it (with the site's ``jobqueue.yaml`` applied as a
    cluster would); the cluster-only options (``scheduler_options``) are left out.
    """
    job_kwargs = {k: v for k, v in kwargs.items() if k != "scheduler_options"}
    job_class: Any = SLURMJob  # dask-jobqueue is untyped
    job = job_class(scheduler=scheduler_address, name="dummy-name", **job_kwargs)
    return str(job.job_script())
