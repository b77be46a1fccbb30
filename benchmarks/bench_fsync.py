"""What making job records durable costs: fsync of every chunk file a job wrote.

``python -m benchmarks.bench_fsync [--steps 48] [--folder /path/on/the/target/fs]``

Writes an ERA5-like source (full 721 × 1440 grid, ``--steps`` hourly steps, two float32 variables),
caches it in series mode with target chunks ``{time: 48, latitude: 180, longitude: 360}`` and
prints, per job, the write time and the time :func:`zarr_parallel.store.chunks.sync_job` took
to fsync the job's chunk files and folders before its record was written. Run it on the filesystem
the caches will live on: the figure is the cost of flushing the job's dirty pages, so it depends on
the disk, not on this package.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from zarr_parallel.examples import make_era5_like
from zarr_parallel.store import manifest as store


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--memory", default="1GB", help="memory_limit (sets the job size)")
    args = parser.parse_args()
    from zarr_parallel.request.model import build_request
    from zarr_parallel.run.finish import finish
    from zarr_parallel.run.job import run_job
    from zarr_parallel.run.steps import initialise, prepare

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        files = make_era5_like(
            Path(tmp) / "src", n_files=2, steps_per_file=args.steps // 2, nlat=721, nlon=1440
        )
        timings: list[tuple[int, float, int, int]] = []
        original = store.sync_job

        def timed(version: Path, record: Any) -> int:
            t0 = time.perf_counter()
            count = original(version, record)
            timings.append((int(record["id"]), time.perf_counter() - t0, count, record["bytes"]))
            return count

        store.sync_job = timed  # measure the real call in place
        try:
            # The pipeline steps directly (no Prefect): the figure is about the write path.
            req = build_request(
                data_uri=[str(f) for f in files],
                chunks={"time": 48, "latitude": 180, "longitude": 360},
                cache_store=str(Path(tmp) / "out.zarr"),
                deploy_mode="series",
                memory_limit=args.memory,
                recommend_changes="proceed",
            )
            t0 = time.perf_counter()
            prepared = prepare(req)
            initialise(prepared)
            results = [
                run_job(prepared.request_json, str(prepared.version), job_id)
                for job_id in prepared.todo
            ]
            finish(prepared, results, t0)
            total = time.perf_counter() - t0
        finally:
            store.sync_job = original
        print(f"filesystem of {tmp}; {len(timings)} jobs, run {total:.1f} s end to end")
        for job_id, seconds, count, written in timings:
            print(
                f"  job {job_id}: {written / 1e6:.0f} MB in {count} chunk files, "
                f"fsync {seconds * 1000:.0f} ms"
            )
        synced = sum(t[1] for t in timings)
        print(f"fsync total {synced:.2f} s = {100 * synced / total:.1f} % of the run")


if __name__ == "__main__":
    main()
