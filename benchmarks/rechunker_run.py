"""Run rechunker on a benchmark case, inside its own virtualenv (stdlib + its deps only).

``python rechunker_run.py CASE_JSON STORE`` prints ``RESULT {json}``. rechunker 0.5.4 needs
zarr < 3, so it cannot run in the project's environment: :mod:`benchmarks.rechunker_env` makes a
virtualenv for it. It reads the same files through xarray (``open_mfdataset`` with the source's
chunks), plans with ``max_mem`` = the case's memory limit, writes its intermediate to a Zarr v2
store beside the target and executes with its dask executor (dask's threaded scheduler, one
thread per core). Bytes read and written are ``rchar``/``wchar`` of ``/proc/self/io`` (one
process: the threaded scheduler starts none), counted after the imports; the page cache is hot,
so these are the bytes asked of the files, not of the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def io() -> tuple[int, int]:
    """``rchar`` and ``wchar`` of this process (``/proc/self/io``; 0 where there is none).

    Not ``zarr_parallel.run.job.rchar``: this script runs in rechunker's own virtualenv.
    """
    values = {"rchar": 0, "wchar": 0}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in values:
                    values[key] = int(value)
    except OSError:
        pass
    return values["rchar"], values["wchar"]


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM, which an exec does not carry over)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_bytes(text: str) -> int:
    """``"1GB"`` → 10⁹ (decimal and binary units, as the case gives them)."""
    s = text.strip().upper().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * UNITS[unit])
    return int(float(s))


def compressor(spec: str) -> Any:
    """The numcodecs codec of a request's ``compression`` form: ``zstd[:level]``,
    ``blosc[:<cname>[:<level>]]`` (byte shuffle, as zarr-parallel writes it), ``zlib[:level]``,
    ``gzip[:level]`` or ``none``, with zarr-parallel's default levels (planning/compression.py)."""
    import numcodecs

    name, *rest = spec.split(":")
    if name == "none":
        return None
    if name == "blosc":
        cname = rest[0] if rest else "lz4"
        level = int(rest[1]) if len(rest) > 1 else 5
        return numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
    codecs = {"zstd": (numcodecs.Zstd, 0), "zlib": (numcodecs.Zlib, 1), "gzip": (numcodecs.GZip, 5)}
    if name not in codecs:
        raise ValueError(f"output_codec {spec!r}: use zstd, blosc, zlib, gzip or none")
    codec, default = codecs[name]
    return codec(level=int(rest[0]) if rest else default)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_source(case: dict[str, Any]) -> Any:
    """The case's files as one dataset, dask-chunked as the source is stored."""
    import xarray as xr

    dims = ("time", "latitude", "longitude")
    chunks = dict(zip(dims, case["source_chunks"], strict=True))
    ds = xr.open_mfdataset(
        case["files"], engine="h5netcdf", chunks=chunks, combine="by_coords", parallel=False
    )
    box = case.get("box") or {}
    if box:
        ds = ds.isel({d: slice(*v) for d, v in box.items()})
    ds = ds[case["variables"]]
    keep = ("dtype", "units", "calendar")
    for var in ds.variables.values():
        var.encoding = {k: v for k, v in var.encoding.items() if k in keep}
    return ds


def run(case: dict[str, Any], store: str) -> dict[str, Any]:
    """Plan and execute the rechunk; the figures."""
    import dask
    import rechunker
    import xarray  # noqa: F401  (imported before counting: module files are not source reads)
    import zarr

    temp = Path(f"{store}.rechunker-intermediate")
    shutil.rmtree(temp, ignore_errors=True)
    max_mem = case.get("memory_limit", "2GB")
    r0, w0 = io()
    t0 = time.perf_counter()
    ds = open_source(case)
    target = {
        d: (ds.sizes[d] if c == -1 else min(c, ds.sizes[d])) for d, c in case["chunks"].items()
    }
    target_chunks = {name: target for name in ds.data_vars}
    for name in ds.coords:
        target_chunks[name] = {d: ds.sizes[d] for d in ds[name].dims}
    codec = {"compressor": compressor(case.get("output_codec") or "zstd")}
    plan = rechunker.rechunk(
        ds,
        target_chunks,
        parse_bytes(max_mem),
        store,
        # The data variables get the codec every contender writes (rechunker's zarr 2 default
        # is Blosc lz4). rechunker encodes its intermediate with a dataset's target options too.
        target_options={name: codec for name in ds.data_vars},
        temp_store=str(temp),
        executor="dask",
    )
    t1 = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=case["cores"]):
        plan.execute()
    zarr.consolidate_metadata(store)
    t2 = time.perf_counter()
    r1, w1 = io()
    intermediate = folder_bytes(temp) if temp.exists() else 0
    shutil.rmtree(temp, ignore_errors=True)
    return {
        "e2e_s": t2 - t0,
        "data_s": t2 - t1,
        "read_bytes": r1 - r0,
        "io": {"rchar": r1 - r0, "wchar": w1 - w0},
        "intermediate_bytes": intermediate,
        "worker_peaks": [[peak_rss(), max_mem]],
        "note": f"rechunker {rechunker.__version__}, zarr {zarr.__version__}, dask executor",
    }


def main() -> None:
    """Run rechunker on the case and print the measurements as ``RESULT {json}``."""
    case_json, store = sys.argv[1:3]
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    try:
        out = {**run(json.loads(case_json), store), "ok": True}
    except Exception as e:  # recorded as rechunker's failure, with its reason
        import traceback

        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    out["max_process_rss"] = peak_rss()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
