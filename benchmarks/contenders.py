"""Every contender of the benchmark, run one at a time in a fresh process by the suite.

``python -m benchmarks.contenders NAME CASE_JSON STORE`` runs contender ``NAME`` on the case and
prints one JSON line of measurements (``RESULT {...}``). Figures measured here, inside the
contender's process: end-to-end and data-phase seconds, bytes read from the source (``rchar`` of
/proc/<pid>/io, summed over the processes that read), peak RSS per worker process, and for
zarr-parallel each job's estimated and measured peak memory. The suite adds CPU time, output
file counts and equality with the reference.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.rechunker_env import PYTHON_VARIABLE as RECHUNKER_PYTHON
from benchmarks.stage_watch import StageWatcher
from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.run.job import high_water_mark, rchar
from zarr_parallel.store.codecs import zarr_compressors

#: The environment of a contender's process, each only where not set: quiet logs, no phoning
#: home. Set by :func:`main` (the contender's own process), never on import: the test suite
#: imports this module, and its later subprocesses would inherit a Prefect that logs warnings
#: only. A temporary Prefect API starts per run (part of end to end): the suite gives it time on
#: a loaded machine in the environment this process starts with (suite.contender_environment).
CONTENDER_ENVIRONMENT = {
    "DASK_LOGGING__DISTRIBUTED": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}

#: zarr-parallel 0.5.0's venv python (set by the suite).
ZP050_PYTHON = "ZP050_PYTHON"
#: The memory limit of a case that names none (the map → time-series case names its own).
MEMORY_LIMIT = "2GB"
#: Phase names of the start-up breakdown a summary may carry (docs/design.md; absent on older code).
PHASES = ("start-up", "planning", "initialise", "data", "finish", "teardown")


def process_io() -> dict[str, int]:
    """``rchar`` and ``wchar`` of this process (``/proc/self/io``).

    The kernel adds a child's counts to its parent's when the parent reaps it, so a difference
    taken after a run covers the processes the run started and ended (dask workers, job
    processes) as well, including what they read importing their modules. The page cache is hot
    (the suite reads every file before), so these are bytes asked of files, not of the disk.
    """
    values = {"rchar": 0, "wchar": 0}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in values:
                values[key] = int(value)
    except OSError:
        pass
    return values


def _io_since(before: dict[str, int]) -> dict[str, int]:
    now = process_io()
    return {k: now[k] - before[k] for k in before}


def _memory_limit(case: dict[str, Any]) -> str:
    return str(case.get("memory_limit") or MEMORY_LIMIT)


def find_phases(summary: Any) -> dict[str, float] | None:
    """The start-up breakdown of a summary (a mapping naming phases of :data:`PHASES` with
    seconds), wherever the summary keeps it; None when it has none."""
    if isinstance(summary, dict):
        found = {
            k: float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and (k in PHASES or k.startswith("data ("))
        }
        if len(found) >= 2:
            return found
        for value in summary.values():
            inner = find_phases(value)
            if inner:
                return inner
    return None


def plan_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What the summary says of the plan: strategy, read amplification and stages, when present."""
    out: dict[str, Any] = {"plan_read_amplification": summary.get("read_amplification")}
    for key in ("strategy", "strategy_reason", "deploy_mode", "deploy_mode_reason"):
        if summary.get(key) is not None:
            out[f"plan_{key}"] = summary[key]
    stages = summary.get("stages")
    if isinstance(stages, list):
        keep = ("jobs", "read_bytes", "write_bytes", "intermediate_chunks")
        out["plan_stages"] = [
            {k: s.get(k) for k in keep if k in s} for s in stages if isinstance(s, dict)
        ]
        # What every stage but the last writes is intermediate (the plan's figure).
        written = [s.get("write_bytes") for s in out["plan_stages"][:-1]]
        if written and all(isinstance(w, int) for w in written):
            out["intermediate_bytes_planned"] = sum(written)
    phases = find_phases(summary)
    if phases:
        out["phases"] = phases
    return out


def _maxrss() -> tuple[int, int]:
    # This process's own peak from the kernel's VmHWM, not ru_maxrss: Linux carries ru_maxrss
    # over an exec, so it would report at least the suite's resident size when it started us.
    own = high_water_mark() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return own, kids


def _output_codec(case: dict[str, Any]) -> str:
    """The codec every contender writes, in the request's ``compression`` forms (suite.py)."""
    return str(case.get("output_codec") or "zstd")


def _preprocessors(case: dict[str, Any]) -> list[dict[str, Any]]:
    box = case.get("box") or {}
    if not box:
        return []
    return [{"type": "isel", **{d: list(v) for d, v in box.items()}}]


# ---------------------------------------------------------------------------------------------
# zarr-parallel (this project)


def _zarr_parallel(mode: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def run(case: dict[str, Any], store: str) -> dict[str, Any]:
        # Imported before the clock starts, as the other contenders' libraries are.
        import zarr_parallel.orchestration.cache  # noqa: F401
        from zarr_parallel import ZarrParallelAssembler
        from zarr_parallel.store.manifest import iter_job_records

        options: dict[str, Any] = {}
        if mode not in ("series", "default"):
            options["simultaneous_worker_limit"] = case["cores"]
        if mode != "default":  # "default": the settings a user gets without naming a mode
            options["deploy_mode"] = mode
        limit = _memory_limit(case)
        options["compression"] = _output_codec(case)
        zp = ZarrParallelAssembler(
            case["files"], preprocessors=_preprocessors(case), chunks=case["chunks"]
        )
        r0 = rchar()
        io0 = process_io()
        t0 = time.perf_counter()
        with StageWatcher(store) as stages:  # a staged plan's intermediate records (#18)
            result: Any = zp.cache(
                cache_store=store, memory_limit=limit, recommend_changes="proceed", **options
            )
            e2e = time.perf_counter() - t0
        own_read = rchar() - r0
        tree_io = _io_since(io0)
        final = list(iter_job_records(Path(result.summary["version"])))
        records = stages.stage_records + final
        # What memory_limit bounds per worker: in series the flow process that ran the job
        # (its peak_rss); beside a dask or SLURM worker, the worker process (its RSS when the
        # task ended) plus the job process that ran the job (its peak_rss).
        workers = [
            (r["peak_rss"], int(r.get("worker", {}).get("rss", 0)) if "job_process" in r else 0)
            for r in result.summary.get("job_results", [])
        ] or [(r["peak_rss"], 0) for r in final]
        workers += [(r["peak_rss"], 0) for r in stages.stage_records]
        starts = [r["started"] for r in records]
        ends = [r["started"] + r["seconds"] for r in records]
        measured = [r.get("read_bytes") for r in records]
        pids = {r["pid"] for r in records}
        return {
            "e2e_s": e2e,
            "data_s": max(ends) - min(starts),
            # Jobs measure their own process's reads (/proc/self/io) while they run.
            "read_bytes": sum(m for m in measured if m is not None),
            "process_read_bytes": own_read,
            "jobs": len(records),
            "worker_processes": len(pids),
            "worker_peaks": [[job + worker, limit] for job, worker in workers],
            # Processes the contender's own rusage does not see (SLURM jobs, grandchildren).
            "largest_worker_process": max(max(pair) for pair in workers),
            "estimates": [[r["estimated_memory"], r["peak_memory"]] for r in records],
            "fast_read": sum(bool(r.get("fast_read")) for r in records),
            "io": tree_io,
            "summary_seconds": result.summary.get("seconds"),
            **plan_figures(result.summary),
            "stage_jobs": len(stages.stage_records),
            "stage_read_bytes": sum(r.get("read_bytes") or 0 for r in stages.stage_records),
            "intermediate_bytes": stages.intermediate_bytes,
        }

    return run


# ---------------------------------------------------------------------------------------------
# plain xarray + dask


def _open(case: dict[str, Any], chunks: dict[str, int]) -> Any:
    import xarray as xr

    ds = xr.open_mfdataset(
        case["files"], engine="h5netcdf", chunks=chunks, combine="by_coords", parallel=False
    )
    box = case.get("box") or {}
    if box:
        ds = ds.isel({d: slice(*v) for d, v in box.items()})
    return ds


def _target_chunks(case: dict[str, Any], ds: Any) -> dict[str, int]:
    return {d: (ds.sizes[d] if c == -1 else min(c, ds.sizes[d])) for d, c in case["chunks"].items()}


def _xarray(open_with: str, distributed: bool) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def run(case: dict[str, Any], store: str) -> dict[str, Any]:
        # Imported before counting, so module files read on import are not counted as source.
        import dask.array  # noqa: F401
        import h5netcdf  # noqa: F401
        import xarray  # noqa: F401
        import zarr  # noqa: F401

        client = None
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if distributed:
            from dask.distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=case["cores"], threads_per_worker=1)
            client = Client(cluster)
            base = sum(client.run(rchar).values())
        r0 = rchar()
        io0 = process_io()
        dims = ("time", "latitude", "longitude")
        src_chunks = dict(zip(dims, case["source_chunks"], strict=True))
        first = _open(case, src_chunks if open_with == "source" else {})
        target = {d: c for d, c in _target_chunks(case, first).items()}
        ds = first if open_with == "source" else _open(case, target)
        ds = ds.chunk(target)
        for v in ds.variables.values():
            v.encoding.pop("chunks", None)
            v.encoding.pop("preferred_chunks", None)
        codec = parse_compression(_output_codec(case), "output_codec")
        for v in ds.data_vars.values():
            v.encoding["compressors"] = zarr_compressors(codec, 3)
        delayed = ds.to_zarr(store, mode="w", zarr_format=3, compute=False, consolidated=True)
        t1 = time.perf_counter()
        delayed.compute()
        t2 = time.perf_counter()
        read = rchar() - r0
        extra["io"] = _io_since(io0)
        if client is not None:
            read += sum(client.run(rchar).values()) - base
            peaks = client.run(lambda: _maxrss()[0])
            extra["worker_peaks"] = [[p, "none"] for p in peaks.values()]
            client.close()
            cluster.close()
            extra["io"] = _io_since(io0)  # the workers, reaped now, included
        return {"e2e_s": t2 - t0, "data_s": t2 - t1, "read_bytes": read, **extra}

    return run


# ---------------------------------------------------------------------------------------------
# the floor


def _floor(case: dict[str, Any], store: str) -> dict[str, Any]:
    from benchmarks.floor import run_floor

    t0 = time.perf_counter()
    out = run_floor(case["files"], store, case["chunks"], case.get("box"), processes=case["cores"])
    e2e = time.perf_counter() - t0
    return {
        "e2e_s": e2e,
        "data_s": e2e,
        "read_bytes": out["read_bytes"],
        "worker_peaks": [[out["worker_peak_rss"], "none"]],
    }


# ---------------------------------------------------------------------------------------------
# zarr-parallel 0.5.0 (its own virtualenv, run as a subprocess of this process)


def _in_venv(variable: str, script: str, args: list[str], case: dict[str, Any]) -> dict[str, Any]:
    """Run ``script`` with the python named by environment ``variable``; its ``RESULT``."""
    import subprocess

    python = os.environ.get(variable)
    if not python:
        raise RuntimeError(f"not installed (no {variable}; the suite says why)")
    proc = subprocess.run(
        [python, str(Path(__file__).with_name(script)), *args],
        capture_output=True,
        text=True,
        timeout=case.get("timeout", 3600),
        stdin=subprocess.DEVNULL,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = dict(json.loads(line[7:]))
            if not result.get("ok"):
                raise RuntimeError(result.get("error", "failed"))
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(" | ".join(tail) or f"exit code {proc.returncode}")


def _rechunker(case: dict[str, Any], store: str) -> dict[str, Any]:
    # Its process reports its own figures: rchar/wchar after its imports, its peak RSS.
    result = _in_venv(RECHUNKER_PYTHON, "rechunker_run.py", [json.dumps(case), store], case)
    result["largest_worker_process"] = result.pop("max_process_rss", 0)
    return result


def _zp050(mode: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def run(case: dict[str, Any], store: str) -> dict[str, Any]:
        return _in_venv(ZP050_PYTHON, "zp050_run.py", [mode, json.dumps(case), store], case)

    return run


CONTENDERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "zarr-parallel series": _zarr_parallel("series"),
    # The same, run by the suite with PREFECT_API_URL set to a running server it started.
    "zarr-parallel series (Prefect server)": _zarr_parallel("series"),
    "zarr-parallel dask_distributed": _zarr_parallel("dask_distributed"),
    # The same with other threads per job process, set by the suite (suite.THREAD_VARIANTS).
    "zarr-parallel dask_distributed (1 reader, 2 encoders)": _zarr_parallel("dask_distributed"),
    "zarr-parallel dask_distributed (all cores, zarr's default pool)": _zarr_parallel(
        "dask_distributed"
    ),
    "zarr-parallel SLURM": _zarr_parallel("SLURM"),
    # No deploy_mode and no worker limit: what a user gets by default (#21).
    "zarr-parallel default": _zarr_parallel("default"),
    # The same, run by the suite with PREFECT_API_URL set to a running server it started.
    "zarr-parallel default (Prefect server)": _zarr_parallel("default"),
    "rechunker": _rechunker,
    "xarray+dask (source chunks)": _xarray("source", distributed=False),
    "xarray+dask distributed (source chunks)": _xarray("source", distributed=True),
    "xarray+dask (target chunks)": _xarray("target", distributed=False),
    "zarr-parallel 0.5.0 series": _zp050("series"),
    "zarr-parallel 0.5.0 dask_distributed": _zp050("dask_distributed"),
    "floor": _floor,
}


def main(argv: list[str]) -> int:
    """Run one contender and print its measurements as ``RESULT {json}``."""
    for variable, value in CONTENDER_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    name, case_json, store = argv
    case = json.loads(case_json)
    try:
        out = CONTENDERS[name](case, store)
        out["ok"] = True
    except BaseException as e:  # every failure is a result to record, with its reason
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()  # on stderr: the suite keeps its end (a crash of ours is visible)
    own, kids = _maxrss()
    out["max_process_rss"] = max(own, kids, int(out.pop("largest_worker_process", 0)))
    print("RESULT " + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
