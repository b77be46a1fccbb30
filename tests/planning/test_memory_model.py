"""The memory model is a promise (docs/design.md §5): a job's estimate is an upper bound of its real
peak.

Each case plans a real request, then runs one write job in a fresh Python process (as a worker
would) and compares the peak RSS increase the job measured (``write.measure_peak``) with the
planner's estimate. The grids are large enough (tens of MB per job) for the peak to stand well
above the noise of the interpreter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.planning.memory import (
    FAST_THREAD_BYTES,
    FAST_WRITE_COPIES,
    FAST_WRITE_COPIES_UNCOMPRESSED,
)
from zarr_parallel.request.model import build_request
from zarr_parallel.run.job import run_job, slab_slices
from zarr_parallel.run.stages import stage_request
from zarr_parallel.run.steps import initialise, prepare

_RUN_ONE_JOB = """
import json, sys
from zarr_parallel.run.job import run_job
record = run_job(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "True")
print(json.dumps(record))
"""


@pytest.fixture(scope="session")
def archive_grid(era5_factory: Any) -> list[Path]:
    """Two files of 48 steps, 181 × 360 (0.5°): HDF5 chunks of one step × full grid."""
    return era5_factory(n_files=2, steps_per_file=48, nlat=181, nlon=360)


@pytest.fixture(scope="session")
def block_grid(era5_factory: Any) -> list[Path]:
    """The same grid in HDF5 chunks of 24 steps × 91 × 180 rows and columns."""
    return era5_factory(n_files=2, steps_per_file=48, nlat=181, nlon=360, chunks=(24, 91, 180))


@pytest.fixture(scope="session")
def four_variable_grid(era5_factory: Any) -> list[Path]:
    """The archive layout with four variables."""
    return era5_factory(
        n_files=2, steps_per_file=48, nlat=181, nlon=360, variables=("t2m", "d2m", "u10", "v10")
    )


@pytest.fixture(scope="session")
def packed_grid(era5_factory: Any) -> list[Path]:
    """Packed int16 with scale_factor/add_offset (as ERA5 ships), decoded to float32."""
    return era5_factory(n_files=2, steps_per_file=48, nlat=181, nlon=360, packed=True)


@pytest.fixture(scope="session")
def whole_file_grid(era5_factory: Any) -> list[Path]:
    """The grid in one HDF5 chunk per file (48 steps × 181 × 360): each element-wise step then
    makes its temporaries a whole region at a time."""
    return era5_factory(n_files=2, steps_per_file=48, nlat=181, nlon=360, chunks=(48, None, None))


@pytest.fixture(scope="session")
def one_chunk_grid(era5_factory: Any) -> list[Path]:
    """One file of 96 steps in a single HDF5 chunk: a job's region is one source chunk."""
    return era5_factory(n_files=1, steps_per_file=96, nlat=181, nlon=360, chunks=(96, None, None))


@pytest.fixture(scope="session")
def packed_whole_file_grid(era5_factory: Any) -> list[Path]:
    """Packed int16 in one HDF5 chunk per file."""
    return era5_factory(
        n_files=2, steps_per_file=48, nlat=181, nlon=360, chunks=(48, None, None), packed=True
    )


CASES = {
    # Aligned: each job reads exactly its region.
    "aligned": ("archive_grid", {"chunks": {"time": 48}}),
    # The same, uncompressed: the model counts fewer encoder buffers (FAST_WRITE_COPIES_...).
    "aligned-none": ("archive_grid", {"chunks": {"time": 48}, "compression": "none"}),
    # A selection starting and ending inside 24-step chunks: whole chunks are decompressed for
    # part of them, and target chunks (16 steps) that cut the source chunks.
    "cut-chunks": (
        "block_grid",
        {
            "preprocessors": [
                {"type": "isel", "time": [5, 77]},
                {"type": "reverse", "dim": "latitude"},
            ],
            "chunks": {"time": 16, "latitude": 60, "longitude": 120},
            "recommend_changes": "proceed",
        },
    ),
    # int16 on disk, float32 in memory: the decoded copy counts.
    "packed": ("packed_grid", {"chunks": {"time": 24}}),
    # Four variables one after another, a fill value to encode, and statistics gathered:
    # what the first variables freed must not pile up under the last one.
    "four-variables-stats": (
        "four_variable_grid",
        {
            "chunks": {"time": 48},
            "variables": {"u10": [{"type": "encoding", "_FillValue": -9999.0}]}
            | {v: {} for v in ("t2m", "d2m", "v10")},
            "generate_stats": True,
        },
    ),
}

#: Element-wise chains (docs/design.md §5): each step makes a new array of the region's chunks
#: (``where`` a boolean mask too). Rounding to 4 decimals keeps the noise's mantissas (the
#: output barely compresses); to whole numbers in a narrow clip it compresses well.
_WHERE = {"type": "where", "cond": {"op": ">", "value": 262.0}}
_INCOMPRESSIBLE_CHAIN = [
    _WHERE,
    {"type": "fillna", "value": 0},
    {"type": "clip", "min": 200.0, "max": 320.0},
    {"type": "round", "decimals": 4},
]
_FLOAT32 = {"type": "astype", "dtype": "float32"}
_COMPRESSIBLE_CHAIN = [
    _WHERE,
    {"type": "fillna", "value": 0},
    {"type": "clip", "min": 285.0, "max": 290.0},
    {"type": "round"},
]
CASES |= {
    "elementwise-incompressible": (
        "archive_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": _INCOMPRESSIBLE_CHAIN}},
    ),
    "elementwise-compressible": (
        "archive_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": _COMPRESSIBLE_CHAIN}},
    ),
    # int16 on disk, decoded (to float64: the scale factor is a double) and cast to float32,
    # then the chain (packing dropped: the values changed).
    "elementwise-packed": (
        "packed_grid",
        {"chunks": {"time": 24}, "variables": {"t2m": [_FLOAT32, *_INCOMPRESSIBLE_CHAIN]}},
    ),
    "elementwise-packed-compressible": (
        "packed_grid",
        {"chunks": {"time": 24}, "variables": {"t2m": [_FLOAT32, *_COMPRESSIBLE_CHAIN]}},
    ),
    # One source chunk per job region: the chain's temporaries are whole regions.
    "elementwise-whole-chunks": (
        "whole_file_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": _INCOMPRESSIBLE_CHAIN}},
    ),
    "elementwise-whole-chunks-compressible": (
        "whole_file_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": _COMPRESSIBLE_CHAIN}},
    ),
    "elementwise-one-chunk": (
        "one_chunk_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": _INCOMPRESSIBLE_CHAIN}},
    ),
    # Two masks and their conjunction at once, and statistics of the result gathered.
    "elementwise-one-chunk-two-conditions-stats": (
        "one_chunk_grid",
        {
            "chunks": {"time": 48},
            "variables": {
                "t2m": [
                    {
                        "type": "where",
                        "cond": [{"op": ">", "value": 262.0}, {"op": "<", "value": 300.0}],
                        "other": -1.0,
                    },
                    *_INCOMPRESSIBLE_CHAIN,
                    {"type": "abs"},
                ]
            },
            "generate_stats": True,
        },
    ),
    "elementwise-packed-whole-chunks": (
        "packed_whole_file_grid",
        {"chunks": {"time": 48}, "variables": {"t2m": [_FLOAT32, *_INCOMPRESSIBLE_CHAIN]}},
    ),
    # Cut chunks: the transforms run on whole decompressed source chunks, not just the region.
    "elementwise-cut-chunks": (
        "block_grid",
        {
            "preprocessors": [{"type": "isel", "time": [5, 77]}],
            "chunks": {"time": 16, "latitude": 60, "longitude": 120},
            "variables": {"t2m": _INCOMPRESSIBLE_CHAIN},
            "recommend_changes": "proceed",
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_bounds_measured_peak(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture, fields = CASES[case]
    files: list[Path] = request.getfixturevalue(fixture)
    req = build_request(
        data_uri=[str(p) for p in files],
        cache_store=str(tmp_path / "m.zarr"),
        deploy_mode="series",
        memory_limit="2GB",
        **fields,
    )
    prepared = prepare(req)
    initialise(prepared)
    # The largest job: where the estimate is tightest.
    job = max(prepared.plan.jobs, key=lambda j: j.memory)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_ONE_JOB,
            prepared.request_json,
            str(prepared.version),
            str(job.id),
            str(req.generate_stats),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        # As in a worker's job process: the job measures the kernel's exact peak (VmHWM).
        env={**os.environ, "ZARR_PARALLEL_JOB_PROCESS": "1"},
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    peak, estimate = record["peak_memory"], record["estimated_memory"]
    region_bytes = job.write_bytes // len(job.variables)  # one variable's region, decoded
    # The fast path streams it in slabs, and reads the next only once this one is written when
    # the cores have no idle time (run/overlap.py): at least its largest slab is held at once.
    dim, start, stop = job.region[0]
    slabs = slab_slices(slice(start, stop), int(fields["chunks"][dim]))
    slab_bytes = region_bytes * max(s.stop - s.start for s in slabs) // (stop - start)
    print(
        f"{case}: estimate {estimate / 1e6:.1f} MB, measured peak {peak / 1e6:.1f} MB "
        f"(estimate / peak {estimate / peak:.2f})"
    )
    # The measurement is real: the job held at least a slab of one variable at once.
    assert peak >= 0.9 * slab_bytes, (peak, slab_bytes, region_bytes)
    # The promise: the estimate is an upper bound of the real peak.
    assert peak <= estimate, f"{case}: measured {peak} B above the estimate {estimate} B"


_WRITE_ONE_THREAD = """
import json, sys
import numpy as np, zarr
from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.store import zarr_io as store
from zarr_parallel.store.codecs import zarr_compressors
from zarr_parallel.run.job import high_water_mark, release_freed_memory, reset_high_water_mark

def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))

release_freed_memory()
shape = (48, 270, 360)  # a whole chunk, then an edge chunk of 90 rows
codec = zarr_compressors(parse_compression(sys.argv[2], "compression"), 3)
arr = zarr.create_array(
    sys.argv[1], shape=shape, chunks=(48, 180, 360), dtype="f4", compressors=codec
)
arr = arr.with_config({"write_empty_chunks": True})
region = {d: slice(0, n) for d, n in zip("tyx", shape)}
# Random floats: the data does not compress, so each compressed buffer is a whole chunk.
values = np.random.default_rng(0).random(shape, dtype=np.float32)
store._write_chunkwise(arr, region, values, 1)  # the thread's arena settles
peaks = []
for _ in range(3):  # the allocator may hand a pass pages the previous one freed: keep the most
    release_freed_memory()
    base = rss()
    assert reset_high_water_mark()
    store._write_chunkwise(arr, region, values, 1)
    peaks.append(high_water_mark() - base)
print(json.dumps(max(peaks)))
"""


@pytest.mark.parametrize("codec", ["zstd", "none", "gzip:5"])
def test_a_writing_thread_holds_what_the_model_counts(tmp_path: Path, codec: str) -> None:
    """One encoding thread holds at most the chunks the model counts for its codec.

    Compressing: a contiguous copy, its compressed result and the previous chunk's compressed
    bytes pending write (FAST_WRITE_COPIES); uncompressed, its copy and zarr's padded edge chunk
    (FAST_WRITE_COPIES_UNCOMPRESSED). The thread reuses one buffer for whole chunks; zarr pads
    an edge chunk into a buffer of its own, so a thread that kept its reused buffer meanwhile
    would hold one more. The model also counts FAST_THREAD_BYTES per thread (arena, stack).
    """
    out = subprocess.run(
        [sys.executable, "-c", _WRITE_ONE_THREAD, str(tmp_path / "w.zarr"), codec],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    chunk_bytes = 48 * 180 * 360 * 4
    counted = (
        FAST_WRITE_COPIES
        if parse_compression(codec, "compression").compresses
        else FAST_WRITE_COPIES_UNCOMPRESSED
    )
    print(f"one writing thread, {codec}: {peak / chunk_bytes:.2f} chunks held at the peak")
    assert peak >= 0.9 * chunk_bytes  # real: a whole chunk was copied and encoded
    assert peak <= counted * chunk_bytes + FAST_THREAD_BYTES


def _measured_job(request_json: str, version: str, job_id: int, stats: bool) -> dict[str, Any]:
    """Run one job in a fresh job process (as a worker would); its record."""
    out = subprocess.run(
        [sys.executable, "-c", _RUN_ONE_JOB, request_json, version, str(job_id), str(stats)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "ZARR_PARALLEL_JOB_PROCESS": "1"},
    )
    record: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return record


def test_staged_copy_job_with_checksums_stays_under_its_estimate(
    packed_grid: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged plan's last-stage job copies packed int16 out of the intermediate, decodes it
    piece by piece for its checksum and statistics, and stays under the estimate the planner
    made for it (docs/design.md §5): the decoding adds no copy of the region."""
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")  # staged within a 80 MB budget
    req = build_request(
        data_uri=[str(p) for p in packed_grid],
        cache_store=str(tmp_path / "m.zarr"),
        deploy_mode="series",
        memory_limit="2GB",
        memory_reserve="1920MB",
        chunks={"time": 96, "latitude": 10, "longitude": 10},
        keep_packing=True,
        generate_stats=True,
        recommend_changes="proceed",
    )
    prepared = prepare(req)
    assert prepared.plan.strategy == "staged"
    initialise(prepared)
    stage = prepared.plan.stages[0]
    stage_json = stage_request(prepared.request, stage).model_dump_json()
    for first in stage.plan.jobs:
        run_job(stage_json, prepared.intermediates[0], first.id)
    job = max(prepared.plan.jobs, key=lambda j: j.memory)
    record = _measured_job(prepared.request_json, str(prepared.version), job.id, True)
    assert set(record["checksums"]) == set(job.variables) == set(record["stats"])
    peak, estimate = record["peak_memory"], record["estimated_memory"]
    stored = math.prod(b - a for _, a, b in job.region) * 2  # one variable's int16 region
    print(f"staged copy: estimate {estimate / 1e6:.1f} MB, measured peak {peak / 1e6:.1f} MB")
    assert peak >= 0.9 * stored, (peak, stored)  # real: the region was held
    assert peak <= estimate, f"measured {peak} B above the estimate {estimate} B"
