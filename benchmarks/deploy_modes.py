"""Deploy modes compared: series vs a local dask cluster vs SLURM, on ERA5-like data.

    python benchmarks/deploy_modes.py                      # 8 files × 24 h × 721 × 1440, 2 vars
    python benchmarks/deploy_modes.py --files 4 --modes series,dask_distributed

The source (netCDF4, HDF5 chunks of one step × full grid, zlib level 1 + shuffle, as ERA5
ships) is made once under ``benchmarks/data/`` (git-ignored). The target is
``{time: 48, latitude: 180, longitude: 360}`` in Zarr v3 (zstd). For each mode it prints:

- wall time end to end (Prefect flow, planning, cluster start, writes, publish) and MB/s of
  array data written, speed-up against series;
- the data phase: from the first write job's start to the last one's end;
- orchestration overhead: the share of the wall time during which no write job was running
  (planning, cluster and SLURM job start-up, task submission, publish);
- per worker: the peak resident memory of the worker process and of its job process, against
  the worker's memory limit (in series mode: the peak of this process, which ran the jobs).

A Prefect API is needed: ``PREFECT_API_URL`` if set, else a temporary server started before the
first timed run (its start-up is not counted). The SLURM mode needs a running SLURM
(``scripts/slurm-local.sh start``) and is skipped, with a note, without one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zarr_parallel.run.job import high_water_mark

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
TARGET_CHUNKS = {"time": 48, "latitude": 180, "longitude": 360}


def make_source(files: int, steps: int) -> list[Path]:
    """The ERA5-like source, made once and reused."""
    from zarr_parallel.examples import make_era5_like

    folder = DATA / f"era5_721x1440_{files}x{steps}"
    paths = sorted(folder.glob("era5_like_*.nc"))
    if len(paths) == files and (folder / "complete").exists():
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    paths = make_era5_like(folder, n_files=files, steps_per_file=steps, nlat=721, nlon=1440)
    (folder / "complete").write_text("")
    print(f"made {files} files in {time.perf_counter() - t0:.0f} s: {folder}", file=sys.stderr)
    return paths


def slurm_available() -> bool:
    """True when the local SLURM answers."""
    script = ROOT / "scripts" / "slurm-local.sh"
    return subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0


def ensure_prefect_api() -> None:
    """Start the temporary Prefect API now (when no PREFECT_API_URL), outside the timings."""
    from prefect.client.orchestration import get_client

    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    print(f"Prefect API ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def run_mode(mode: str, paths: list[Path], workers: int, out: Path) -> dict[str, Any]:
    """One timed run; returns its figures."""
    from zarr_parallel import CacheResult, ZarrParallelAssembler

    zp = ZarrParallelAssembler([str(p) for p in paths], chunks=TARGET_CHUNKS)
    store = out / f"{mode}.zarr"
    t0 = time.perf_counter()
    t0_wall = time.time()
    result = zp.cache(
        cache_store=str(store),
        deploy_mode=mode,
        simultaneous_worker_limit=workers,
        memory_limit="2GB",
        recommend_changes="proceed",
    )
    wall = time.perf_counter() - t0
    assert isinstance(result, CacheResult)
    jobs = result.summary["job_results"]  # this run's jobs, with attempts and workers
    intervals = sorted((j["started"], j["finished"]) for j in jobs)
    busy = _union(intervals)
    per_worker: dict[str, dict[str, Any]] = {}
    for j in jobs:
        w = j.get("worker", {})
        key = f"{w.get('host')}:{w.get('pid')}" + (
            f" (SLURM job {w['slurm_job_id']})" if w.get("slurm_job_id") else ""
        )
        row = per_worker.setdefault(key, {"jobs": 0, "worker_rss": 0, "job_process_rss": 0})
        row["jobs"] += 1
        row["worker_rss"] = max(row["worker_rss"], int(w.get("rss", 0)))
        row["job_process_rss"] = max(
            row["job_process_rss"], int(j.get("job_process", {}).get("max_rss", 0))
        )
    if mode == "series":
        # Jobs ran in this process: its peak resident memory so far (series runs first).
        peak = high_water_mark()
        for row in per_worker.values():
            row["worker_rss"], row["job_process_rss"] = peak, 0
    figures = {
        "mode": mode,
        "wall_s": wall,
        "bytes": result.summary["bytes_written"],
        "jobs": result.summary["jobs"],
        "tasks": result.summary.get("write_tasks"),
        "workers": result.summary.get("workers"),
        "worker_memory": result.summary.get("worker_memory"),
        "cluster_ready_s": result.summary.get("cluster_ready_seconds"),
        "data_phase_s": (intervals[-1][1] - intervals[0][0]) if intervals else 0.0,
        "first_job_after_s": (intervals[0][0] - t0_wall) if intervals else 0.0,
        "busy_s": busy,
        "job_seconds": sum(j["finished"] - j["started"] for j in jobs),
        "largest_estimate": max((j["estimated_memory"] for j in jobs), default=0),
        "largest_peak": max((j["peak_memory"] for j in jobs), default=0),
        "per_worker": per_worker,
    }
    shutil.rmtree(store.with_name(store.name + ".versions"), ignore_errors=True)
    store.unlink(missing_ok=True)
    return figures


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in intervals:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def report(runs: list[dict[str, Any]]) -> str:
    """The figures as text."""
    from zarr_parallel.units import format_bytes

    series = next((r for r in runs if r["mode"] == "series"), None)
    lines = [
        "mode              wall s   MB/s  speed-up  data phase s  overhead  jobs/tasks/workers",
    ]
    for r in runs:
        mbps = r["bytes"] / 1e6 / r["wall_s"]
        speedup = f"{series['wall_s'] / r['wall_s']:.2f}x" if series else "-"
        overhead = 1 - r["busy_s"] / r["wall_s"]
        lines.append(
            f"{r['mode']:<16} {r['wall_s']:7.1f} {mbps:6.0f} {speedup:>9} "
            f"{r['data_phase_s']:13.1f} {overhead:8.0%}  {r['jobs']}/{r['tasks']}/{r['workers']}"
        )
    lines.append("")
    lines.append("orchestration: first job starts after / cluster ready / busy (any job running)")
    for r in runs:
        lines.append(
            f"  {r['mode']:<16} {r['first_job_after_s']:6.1f} s / "
            f"{r['cluster_ready_s'] or 0:5.1f} s / {r['busy_s']:6.1f} s of {r['wall_s']:.1f} s"
        )
    lines.append("")
    lines.append("peak memory per worker (worker process + job process) against its limit")
    for r in runs:
        limit = r["worker_memory"] or 0
        lines.append(
            f"  {r['mode']}: limit {format_bytes(limit)}; largest job estimate "
            f"{format_bytes(r['largest_estimate'])}, largest measured job peak "
            f"{format_bytes(r['largest_peak'])}"
        )
        for key, w in sorted(r["per_worker"].items()):
            total = w["job_process_rss"] + w["worker_rss"]
            lines.append(
                f"    {key:<34} {w['jobs']:3d} jobs  worker {format_bytes(w['worker_rss']):>10}"
                f"  job process {format_bytes(w['job_process_rss']):>10}  total "
                f"{format_bytes(total):>10} ({total / limit:.0%} of limit)"
                if limit
                else f"    {key}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="series,dask_distributed,slurm", help="series first")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    paths = make_source(args.files, args.steps)
    size = sum(p.stat().st_size for p in paths)
    print(f"source: {len(paths)} files, {size / 1e9:.2f} GB on disk", file=sys.stderr)
    ensure_prefect_api()
    runs = []
    with tempfile.TemporaryDirectory(dir=DATA, prefix="out-") as tmp:
        for mode in args.modes.split(","):
            if mode.lower() == "slurm" and not slurm_available():
                print("SLURM is not running: skipped (scripts/slurm-local.sh start)")
                continue
            print(f"running {mode}...", file=sys.stderr)
            runs.append(run_mode(mode, paths, args.workers, Path(tmp)))
    text = report(runs)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
