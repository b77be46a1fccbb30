"""Tiled caches: plan figures, write time and measured peak memory against the estimates.

``python benchmarks/bench_tiling.py [--nlat 721 --nlon 1440 --tile 64 --memory 2GB ...]`` makes an
ERA5-like source (once, in ``--folder``), then plans and writes a tiled cache in this process (no
Prefect, series) and prints the figures. Nothing is asserted: the numbers are for reading.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from zarr_parallel.examples import make_era5_like
from zarr_parallel.request.model import build_request
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.steps import initialise, prepare
from zarr_parallel.units import format_bytes


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--folder", default="/tmp/zp-bench-tiling")
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--nlat", type=int, default=721)
    p.add_argument("--nlon", type=int, default=1440)
    p.add_argument(
        "--source-chunks",
        default="archive",
        help="'archive' (one step x full grid) or t,lat,lon, e.g. 6,100,100",
    )
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--edge", default="pad")
    p.add_argument("--time-chunk", type=int, default=24)
    p.add_argument("--memory", default="2GB")
    args = p.parse_args(argv)

    chunks = (
        None
        if args.source_chunks == "archive"
        else tuple(int(c) for c in args.source_chunks.split(","))
    )
    folder = Path(args.folder)
    src = folder / f"src-{args.files}x{args.steps}-{args.nlat}x{args.nlon}-{args.source_chunks}"
    files = sorted(src.glob("*.nc"))
    if len(files) != args.files:
        shutil.rmtree(src, ignore_errors=True)
        files = make_era5_like(
            src,
            n_files=args.files,
            steps_per_file=args.steps,
            nlat=args.nlat,
            nlon=args.nlon,
            chunks=chunks,  # type: ignore[arg-type]
            variables=("t2m",),
        )
    out = folder / "tiled.zarr"
    for old in (out, folder / "tiled.zarr.versions"):
        if old.is_symlink():
            old.unlink()
        shutil.rmtree(old, ignore_errors=True)
    req = build_request(
        data_uri=[str(f) for f in files],
        chunks={"time": args.time_chunk},
        tiles={"latitude": args.tile, "longitude": args.tile, "edge": args.edge},
        cache_store=str(out),
        memory_limit=args.memory,
        recommend_changes="proceed",
    )
    t0 = time.perf_counter()
    prepared = prepare(req)
    initialise(prepared)
    t1 = time.perf_counter()
    records = [run_job(prepared.request_json, str(prepared.version), j) for j in prepared.todo]
    t2 = time.perf_counter()
    finish(prepared, records, time.time())
    plan = prepared.plan
    written = sum(r["bytes"] for r in records)
    print(
        f"source {args.files} files x {args.steps} steps x {args.nlat} x {args.nlon} "
        f"({args.source_chunks} chunks); tiles {args.tile} x {args.tile} ({args.edge}), "
        f"time chunk {args.time_chunk}, memory_limit {args.memory}"
    )
    print(
        f"plan: {len(plan.jobs)} jobs, read amplification {plan.read_amplification:.2f}, "
        f"{format_bytes(plan.read_bytes)} read, largest job estimate "
        f"{format_bytes(plan.max_job_memory)} of {format_bytes(plan.memory_budget)}"
    )
    print(f"plan + initialise: {t1 - t0:.1f} s; write: {t2 - t1:.1f} s")
    print(f"written {format_bytes(written)} ({written / max(t2 - t1, 1e-9) / 1e6:.0f} MB/s)")
    ratios = [r["peak_memory"] / r["estimated_memory"] for r in records]
    worst = max(records, key=lambda r: r["peak_memory"])
    print(
        f"peak memory: largest {format_bytes(worst['peak_memory'])} (estimate "
        f"{format_bytes(worst['estimated_memory'])}); peak/estimate max {max(ratios):.2f}, "
        f"without the first job {max(ratios[1:], default=float('nan')):.2f}"
    )


if __name__ == "__main__":
    main()
