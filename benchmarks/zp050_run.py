"""Run zarr-parallel 0.5.0 on a benchmark case, inside its own virtualenv (stdlib + its deps only).

``python zp050_run.py MODE CASE_JSON STORE`` prints ``RESULT {json}``. 0.5.0 reads a kerchunk
reference (its default engine), so the case carries one made from the same files. Its
``recommend_changes`` asks with ``input()``: stdin is closed, so it is run with
``recommend_changes=False`` (proceed as asked), as every other contender is.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def rchar() -> int:
    """Bytes this process has read (``/proc/self/io``).

    Not ``zarr_parallel.run.job.rchar``: this script runs in 0.5.0's own virtualenv.
    """
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    """Run 0.5.0's ``cache`` in the given mode and print the measurements."""
    mode, case_json, store = sys.argv[1:4]
    case = json.loads(case_json)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    import xarray as xr

    from zarr_parallel.assembler import ZarrParallelAssembler

    # 0.5.0 needs a label selection naming every dimension (its region arithmetic looks each
    # one up; without one it fails comparing datetimes with integers): the case's index box as
    # inclusive labels, which selects exactly the same elements.
    box = case.get("box") or {}
    native = xr.open_dataset(case["kerchunk"], engine="kerchunk")
    sel: dict[str, list[object]] = {}
    for dim in ("time", "latitude", "longitude"):
        start, stop = box.get(dim, [0, native.sizes[dim]])
        values = native[dim].values
        first, last = values[start], values[stop - 1]
        if dim == "time":
            sel[dim] = [str(first)[:19], str(last)[:19]]
        else:
            sel[dim] = [float(first), float(last)]
    pre = [{"type": "sel", **sel}]
    chunks = {d: c for d, c in case["chunks"].items() if c != -1}
    t0 = time.perf_counter()
    r0 = rchar()
    zp = ZarrParallelAssembler(case["kerchunk"], preprocessors=pre, chunks=chunks)
    kwargs = {}
    if mode != "series":
        kwargs = {"simultaneous_worker_limit": case["cores"], "num_jobs": case["cores"]}
    try:
        zp.cache(store, deploy_mode=mode, recommend_changes=False, memory_limit="2GB", **kwargs)
    except Exception as e:  # recorded as this mode's failure, with its reason
        print("RESULT " + json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}))
        return
    e2e = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "e2e_s": e2e,
        # 0.5.0 has no separable data phase: its planning is a few milliseconds of the run.
        "data_s": e2e,
        "read_bytes": rchar() - r0 if mode == "series" else None,
        "max_process_rss": own,
        "ok": True,
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
