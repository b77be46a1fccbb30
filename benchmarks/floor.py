"""The floor: read every needed source chunk once, encode, write, in a process pool, no planning.

What the machine can do on its cores for the same bytes without any planning layer: each worker
process takes whole target chunk rows (one block of ``time``), reads the HDF5 chunks holding them
with h5py ``read_direct_chunk`` (no HDF5 filter pipeline), inflates them with libdeflate,
un-shuffles them (the project's word-wise ``hdf5_chunks.unshuffle``, so the floor is no slower there
than the product), and writes the block with zarr (whose codec pipeline encodes chunks in
threads). Every contender is expressed as a fraction of this throughput.

Only the benchmark's sources are handled (float32, zlib + shuffle or none, ``time`` split across
files, a box selection); it is a measuring stick, not a product.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import deflate
import h5py
import numpy as np

from zarr_parallel.run.job import high_water_mark
from zarr_parallel.sources.hdf5_chunks import unshuffle

DIMS = ("time", "latitude", "longitude")


def _read_block(
    files: Sequence[str], starts: Sequence[int], name: str, box: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, int]:
    """The values of ``name`` in the source-index ``box`` (time across files); bytes read."""
    shape = tuple(b - a for a, b in box)
    out = np.empty(shape, dtype="float32")
    nread = 0
    (t0, t1), (y0, y1), (x0, x1) = box
    for f_idx, path in enumerate(files):
        fa, fb = starts[f_idx], starts[f_idx + 1]
        if fb <= t0 or fa >= t1:
            continue
        with h5py.File(path, "r") as h5:
            dset = h5[name]
            chunks = dset.chunks or dset.shape
            filters = dset.compression, dset.shuffle
            lt0, lt1 = max(t0, fa) - fa, min(t1, fb) - fa
            for ct in range(lt0 // chunks[0] * chunks[0], lt1, chunks[0]):
                for cy in range(y0 // chunks[1] * chunks[1], y1, chunks[1]):
                    for cx in range(x0 // chunks[2] * chunks[2], x1, chunks[2]):
                        if dset.chunks is None:
                            chunk = dset[...]
                            nread += chunk.nbytes
                        else:
                            _mask, raw = dset.id.read_direct_chunk((ct, cy, cx))
                            nread += len(raw)
                            n = math.prod(chunks) * 4
                            data = deflate.zlib_decompress(raw, n) if filters[0] else raw
                            if filters[1]:
                                data = unshuffle(data, 4)
                            chunk = np.frombuffer(data, "float32").reshape(chunks)
                        # Intersection of the chunk with the box, in both coordinate systems.
                        ta, tb = max(ct, lt0), min(ct + chunks[0], lt1)
                        ya, yb = max(cy, y0), min(cy + chunks[1], y1)
                        xa, xb = max(cx, x0), min(cx + chunks[2], x1)
                        out[ta + fa - t0 : tb + fa - t0, ya - y0 : yb - y0, xa - x0 : xb - x0] = (
                            chunk[ta - ct : tb - ct, ya - cy : yb - cy, xa - cx : xb - cx]
                        )
    return out, nread


def _work(args: tuple[Any, ...]) -> tuple[int, int, int]:
    import zarr

    store, files, starts, name, box, t_out = args
    before = _rchar()
    values, counted = _read_block(files, starts, name, box)
    # Measured like every contender (/proc/self/io); the chunk sizes counted are the floor.
    nread = max(counted, _rchar() - before)
    arr = zarr.open_array(store, path=name, mode="r+")
    arr[t_out : t_out + values.shape[0]] = values
    rss = _maxrss()
    return nread, values.nbytes, rss


def _maxrss() -> int:
    import resource

    # VmHWM: ru_maxrss would carry the parent's resident size over a fork or an exec.
    return high_water_mark() or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rchar() -> int:
    # Not zarr_parallel.run.job.rchar: the floor's pool processes must not import the project.
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _file_starts(files: Sequence[str], name: str) -> list[int]:
    starts = [0]
    for f in files:
        with h5py.File(f, "r") as h5:
            starts.append(starts[-1] + int(h5[name].shape[0]))
    return starts


def run_floor(
    files: Sequence[str],
    store: str,
    chunks: Mapping[str, int],
    box: Mapping[str, tuple[int, int]] | None = None,
    variables: Sequence[str] = ("t2m", "d2m"),
    processes: int | None = None,
) -> dict[str, Any]:
    """Copy ``box`` of ``variables`` from ``files`` into a new Zarr v3 store at ``store``.

    Returns bytes read from the source (counted per chunk), bytes written and the largest worker
    peak RSS.
    """
    import zarr

    starts = _file_starts(files, variables[0])
    with h5py.File(files[0], "r") as h5:
        full = {"time": starts[-1], "latitude": h5[variables[0]].shape[1]}
        full["longitude"] = h5[variables[0]].shape[2]
    sel = {d: (box or {}).get(d, (0, full[d])) for d in DIMS}
    shape = tuple(sel[d][1] - sel[d][0] for d in DIMS)
    asked = {d: (shape[i] if chunks.get(d, -1) == -1 else chunks[d]) for i, d in enumerate(DIMS)}
    chunk = tuple(min(shape[i], asked[d]) for i, d in enumerate(DIMS))
    group = zarr.open_group(store, mode="w", zarr_format=3)
    for name in variables:
        group.create_array(
            name,
            shape=shape,
            chunks=chunk,
            dtype="float32",
            fill_value=np.nan,
            dimension_names=DIMS,
            config={"write_empty_chunks": True},
        )
    work = []
    for name in variables:
        for t in range(0, shape[0], chunk[0]):
            t_src = sel["time"][0] + t
            b = [(t_src, min(t_src + chunk[0], sel["time"][1])), sel["latitude"], sel["longitude"]]
            work.append((store, list(files), starts, name, b, t))
    with ProcessPoolExecutor(processes or os.cpu_count() or 1) as pool:
        results = list(pool.map(_work, work))
    return {
        "read_bytes": sum(r[0] for r in results),
        "bytes": sum(r[1] for r in results),
        "worker_peak_rss": max(r[2] for r in results),
        "processes": processes or os.cpu_count() or 1,
    }
