"""Re-caching a grown source: copy-on-write append vs a full re-cache (figures printed).

    python benchmarks/recache_append.py [FOLDER] [--files 30] [--new 2] [--grid 181x360]

Makes ERA5-like files (24 hourly steps each, archive layout: one step x full grid per HDF5
chunk), caches all but the last ``--new`` files, adds them, and re-caches twice from that same
state: once as an append (the default decision) and once forced in full (``allow_append=False``).
Prints wall time in the flow, bytes written, chunk files written and reused by hard link, and the
disk space the versions take (hard-linked files counted once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from zarr_parallel.examples import make_era5_like
from zarr_parallel.orchestration.control import temporary_api_settings
from zarr_parallel.orchestration.recache import recache_flow
from zarr_parallel.request.model import build_request
from zarr_parallel.store.paths import CachePaths


def disk_usage(root: Path) -> int:
    """Bytes of the files under ``root``, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def main() -> None:
    """Run the comparison and print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", nargs="?")
    p.add_argument("--files", type=int, default=30)
    p.add_argument("--new", type=int, default=2)
    p.add_argument("--grid", default="181x360")
    args = p.parse_args()
    nlat, nlon = (int(x) for x in args.grid.split("x"))
    root = Path(args.folder or tempfile.mkdtemp(prefix="zp-recache-bench-"))
    data = root / "data"
    if not data.exists():
        make_era5_like(data, n_files=args.files, steps_per_file=24, nlat=nlat, nlon=nlon)
    files = sorted(data.glob("*.nc"))
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for f in files[: -args.new]:
        os.link(f, src / f.name)
    fields: dict[str, Any] = {
        "data_uri": str(src / "*.nc"),
        "chunks": {"time": 48, "latitude": 181, "longitude": 360},
        "deploy_mode": "series",
        "memory_limit": "2GB",
        "keep_versions": 3,
    }
    print(f"source: {len(files)} files x 24 steps x {nlat} x {nlon}, 2 float32 variables")
    with temporary_api_settings():
        for label, allow_append in (("append", True), ("full re-cache", False)):
            cache = root / f"cache-{'append' if allow_append else 'full'}.zarr"
            shutil.rmtree(cache.with_name(cache.name + ".versions"), ignore_errors=True)
            if cache.is_symlink():
                cache.unlink()
            for f in files[-args.new :]:
                (src / f.name).unlink(missing_ok=True)
            first = recache_flow(build_request(**fields, cache_store=str(cache)))
            for f in files[-args.new :]:
                os.link(f, src / f.name)
            t0 = time.perf_counter()
            s = recache_flow(
                build_request(**fields, cache_store=str(cache)), allow_append=allow_append
            )
            wall = time.perf_counter() - t0
            reused = s.get("reused_chunks", {})
            versions = CachePaths(cache).versions
            print(
                f"{label:14s} first cache {first['seconds']:6.1f} s | "
                f"re-cache {s['seconds']:6.1f} s in the flow ({wall:.1f} s with Prefect) | written "
                f"{s['bytes_written'] / 1e6:8.1f} MB | chunk files reused "
                f"{reused.get('linked', 0) + reused.get('copied', 0):5d} | both versions on disk "
                f"{disk_usage(versions) / 1e6:8.1f} MB | decision: {s['recache']['action']}"
            )


if __name__ == "__main__":
    main()
