"""Compare a cache's chunks with the source, region by region, and pick the regions to compare.

Used by :func:`~zarr_parallel.run.verify.verify_cache`: every chunk (``full``), a seeded sample of
chunks (``sample``), or each job's region with the CRC32 its writer recorded.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.planning.jobs import Job
from zarr_parallel.run.verify_report import Problem, ProblemList, Region
from zarr_parallel.sources.target import Target
from zarr_parallel.store.zarr_io import array_checksum


def coords_region(
    dims: Sequence[str], shape: Sequence[int], grid: Sequence[int], coords: Sequence[int]
) -> Region:
    return tuple(
        (d, int(c) * g, min(int(c) * g + g, s))
        for d, s, g, c in zip(dims, shape, grid, coords, strict=True)
    )


def values_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and values, NaN equal to NaN where both are floating point."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def job_blocks(
    jobs: Iterable[Job], name: str, records: Mapping[int, Mapping[str, Any]]
) -> Iterator[tuple[Region, str | None]]:
    """Each job's region of ``name`` with the CRC32 its writer recorded (if any)."""
    for job in jobs:
        if name not in job.variables:
            continue
        rec = records.get(job.id, {})
        checksum = (rec.get("checksums") or {}).get(name)
        yield job.region, (checksum if isinstance(checksum, str) else None)


def chunk_regions(
    dims: Sequence[str], shape: Sequence[int], grid: Sequence[int]
) -> Iterator[Region]:
    for coords in np.ndindex(*(math.ceil(s / g) for s, g in zip(shape, grid, strict=True))):
        yield coords_region(dims, shape, grid, coords)


def sample_regions(
    dims: Sequence[str], shape: Sequence[int], grid: Sequence[int], k: int, seed: int, name: str
) -> list[Region]:
    counts = [math.ceil(s / g) for s, g in zip(shape, grid, strict=True)]
    n = math.prod(counts)
    # One stream per variable, the same for the same seed and name.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    picked = sorted(rng.choice(n, size=min(k, n), replace=False).tolist()) if n else []
    return [coords_region(dims, shape, grid, np.unravel_index(i, counts)) for i in picked]


def compare_region(
    cache: xr.Dataset,
    target: Target,
    name: str,
    region: Region,
    checksum: str | None,
    grid_info: tuple[Sequence[str], Sequence[int]],
    out: ProblemList,
) -> int:
    """Compare one region of ``name`` with the source; returns the chunks it covered."""
    dims, grid = grid_info
    var_dims = cache[name].dims
    sel = {d: slice(a, b) for d, a, b in region if d in var_dims}
    chunks = _chunks_in(region, dims, grid)
    try:
        got = np.asarray(cache[name].isel(sel).values)
    except Exception:
        if len(chunks) > 1:
            # Find which chunks cannot be read; compare the others one by one.
            return sum(compare_region(cache, target, name, c, None, grid_info, out) for c in chunks)
        out.add(Problem("unreadable", "the chunk cannot be read or decoded", name, region))
        return 1
    want_var = target.dataset[name]
    want = np.asarray(target.clean(want_var.isel(sel).to_dataset())[name].values)
    if checksum is not None and array_checksum(got) != checksum:
        out.add(
            Problem(
                "checksum", "differs from the CRC32 its job recorded when it wrote it", name, region
            )
        )
    bad = _unequal(got, want)
    if bad.any():
        starts = [a for _, a, _ in region]
        for chunk in chunks if len(chunks) > 1 else [region]:
            local = tuple(
                slice(a - base, b - base) for (_, a, b), base in zip(chunk, starts, strict=True)
            )
            count = int(bad[local].sum())
            if not count:
                continue
            first = tuple(
                int(s.start + i[0]) for s, i in zip(local, np.nonzero(bad[local]), strict=True)
            )
            where = {str(d): base + i for d, base, i in zip(var_dims, starts, first, strict=True)}
            out.add(
                Problem(
                    "values",
                    f"{count} of {bad[local].size} values differ from the source (first at "
                    f"{where}: cache {got[first]}, source {want[first]})",
                    name,
                    chunk,
                )
            )
    return len(chunks)


def _chunks_in(region: Region, dims: Sequence[str], grid: Sequence[int]) -> list[Region]:
    """The chunk regions inside a chunk-aligned region."""
    size = dict(zip(dims, grid, strict=True))
    axes = []
    for d, a, b in region:
        g = size[d]
        axes.append([(d, s, min(s + g, b)) for s in range(a, b, g)])
    out: list[Region] = []
    for combo in np.ndindex(*(len(a) for a in axes)):
        out.append(tuple(axes[i][c] for i, c in enumerate(combo)))
    return out


def _unequal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise "differs", with NaN equal to NaN and NaT to NaT."""
    if a.shape != b.shape:
        return np.ones(a.shape, dtype=bool)
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return np.asarray(~((a == b) | (np.isnan(a) & np.isnan(b))))
    if a.dtype.kind in "mM" and b.dtype.kind in "mM":
        return np.asarray(~((a == b) | (np.isnat(a) & np.isnat(b))))
    return np.asarray(a != b)
