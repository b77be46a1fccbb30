"""ERA5-like benchmark datasets, generated once and cached under ``benchmarks/data/`` (git-ignored).

0.25° grid (721 × 1440), hourly float32, two variables (``t2m``, ``d2m``), one netCDF4 file per day,
in two HDF5 layouts: ``archive`` (one step × full grid per chunk, as the archive ships) and
``tiled`` (24 × 91 × 180). Compressed with zlib level 1 + shuffle, or uncompressed. Values are a
smooth field plus noise rounded to 0.01 K, so they compress about as well as real fields do.

``python -m benchmarks.datasets --size quick`` makes (or finds) the default datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
NLAT, NLON = 721, 1440
VARIABLES = ("t2m", "d2m")
#: Files of 24 hourly steps: quick ~1.2 GB, full ~4.2 GB, month (31 days, the map → time
#: series headline) ~6.2 GB uncompressed (two float32 variables); tiny (tests): 2 days, 73 × 144.
SIZES = {"tiny": 2, "smoke": 2, "quick": 6, "medium": 10, "full": 21, "month": 31}
#: Grids other than the 0.25° one, by size: the tests' tiny dataset.
GRIDS = {"tiny": (73, 144)}
LAYOUTS = {"archive": (1, NLAT, NLON), "tiled": (24, 91, 180)}
COMPRESSIONS = ("zlib", "none")
STEPS_PER_FILE = 24


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark source: size, HDF5 layout and compression."""

    size: str
    layout: str
    compression: str

    @property
    def name(self) -> str:
        """Folder name under ``benchmarks/data``."""
        return f"{self.size}-{self.layout}-{self.compression}"

    @property
    def n_files(self) -> int:
        """Daily files."""
        return SIZES[self.size]

    @property
    def steps(self) -> int:
        """Hourly steps in all files."""
        return self.n_files * STEPS_PER_FILE

    @property
    def grid(self) -> tuple[int, int]:
        """Latitudes and longitudes."""
        return GRIDS.get(self.size, (NLAT, NLON))

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the data variables."""
        return self.steps * self.grid[0] * self.grid[1] * 4 * len(VARIABLES)

    @property
    def chunks(self) -> tuple[int, int, int]:
        """HDF5 chunk shape (clamped to the grid)."""
        t, y, x = LAYOUTS[self.layout]
        return t, min(y, self.grid[0]), min(x, self.grid[1])


def _write_file(args: tuple[str, int, str, tuple[int, int, int], tuple[int, int]]) -> str:
    import pandas as pd
    import xarray as xr

    path, day, compression, chunks, (nlat, nlon) = args
    rng = np.random.default_rng(day)
    lat = np.linspace(90, -90, nlat)
    lon = np.linspace(0, 360, nlon, endpoint=False)
    time = pd.date_range("2020-01-01", periods=STEPS_PER_FILE, freq="h") + pd.Timedelta(days=day)
    hours = np.arange(STEPS_PER_FILE) + 24 * day
    smooth = (
        20 * np.cos(np.deg2rad(lat))[:, None]
        + 3 * np.sin(np.deg2rad(lon) * 2)[None, :] * np.cos(np.deg2rad(lat))[:, None]
    ).astype("float32")
    data_vars = {}
    for j, name in enumerate(VARIABLES):
        values = np.empty((STEPS_PER_FILE, nlat, nlon), dtype="float32")
        for t in range(STEPS_PER_FILE):
            diurnal = np.float32(2 * math.sin(2 * math.pi * hours[t] / 24))
            noise = rng.standard_normal((nlat, nlon), dtype=np.float32) * np.float32(0.5)
            values[t] = np.round(260 + 10 * j + smooth + diurnal + noise, 2)
        data_vars[name] = (
            ("time", "latitude", "longitude"),
            values,
            {"units": "K", "long_name": f"{name} (synthetic)"},
        )
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", time),
            "latitude": ("latitude", lat, {"units": "degrees_north"}),
            "longitude": ("longitude", lon, {"units": "degrees_east"}),
        },
        attrs={"Conventions": "CF-1.6", "source": "zarr-parallel benchmark ERA5-like data"},
    )
    encoding: dict[str, dict[str, Any]] = {}
    for name in VARIABLES:
        enc: dict[str, Any] = {"chunksizes": chunks}
        if compression == "zlib":
            enc.update(zlib=True, complevel=1, shuffle=True)
        encoding[name] = enc
    encoding["time"] = {"units": "hours since 2020-01-01 00:00:00", "dtype": "int64"}
    tmp = f"{path}.tmp"
    ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    os.replace(tmp, path)
    return path


def ensure_dataset(spec: DatasetSpec, root: Path = DATA, workers: int | None = None) -> list[Path]:
    """The files of ``spec``, generated on first use (in a process pool) and cached."""
    folder = root / spec.name
    marker = folder / "dataset.json"
    files = [folder / f"era5_like_{d:03d}.nc" for d in range(spec.n_files)]
    if marker.exists() and all(f.exists() for f in files):
        return files
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    jobs = [(str(f), d, spec.compression, spec.chunks, spec.grid) for d, f in enumerate(files)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_write_file, jobs))
    marker.write_text(json.dumps({**asdict(spec), "bytes": spec.nbytes}))
    return files


def ensure_kerchunk(spec: DatasetSpec, files: Sequence[Path]) -> Path:
    """A combined kerchunk reference JSON of the files (what zarr-parallel 0.5 reads)."""
    out = files[0].parent / "references.json"
    # The reference names the files by absolute path: a dataset folder that was moved needs a
    # new one (0.5.0 then failed reading every chunk).
    if out.exists() and str(files[0]) in out.read_text():
        return out
    from kerchunk.combine import MultiZarrToZarr
    from kerchunk.hdf import SingleHdf5ToZarr

    singles = []
    for f in files:
        with open(f, "rb") as fh:
            singles.append(SingleHdf5ToZarr(fh, str(f), inline_threshold=0).translate())
    combined = MultiZarrToZarr(
        singles, concat_dims=["time"], identical_dims=["latitude", "longitude"]
    ).translate()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(combined))
    os.replace(tmp, out)
    return out


def stored_bytes_needed(
    files: Sequence[Path], variables: Sequence[str], box: Mapping[str, tuple[int, int]]
) -> int:
    """Stored bytes of the chunks holding the elements of ``box`` (each counted once).

    ``box`` maps source dimensions ``time``/``latitude``/``longitude`` to ``[start, stop)``
    in source index space (time across all files). A reader that reads each of these chunks
    once has a measured read amplification of 1.00.
    """
    from zarr_parallel.sources.hdf5_chunks import h5_storage

    total = 0
    offset = 0
    dims = ("time", "latitude", "longitude")
    for f in files:
        first = h5_storage(str(f), variables[0])
        n = first.shape[0]
        for name in variables:
            st = h5_storage(str(f), name)
            chunks = st.chunks or st.shape
            for origin, (_, size, _) in st.index.items():
                inside = True
                for d, o in enumerate(origin):
                    lo, hi = box.get(dims[d], (0, 10**12))
                    base = offset if d == 0 else 0
                    if base + o + chunks[d] <= lo or base + o >= hi:
                        inside = False
                if inside:
                    total += size
            if st.contiguous is not None:
                total += st.contiguous[1]
        offset += n
    return total


def main(argv: Sequence[str] | None = None) -> None:
    """Make (or find) datasets and print their folders."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.datasets", description=main.__doc__)
    p.add_argument("--size", default="quick", choices=sorted(SIZES))
    p.add_argument("--layout", default="archive", choices=sorted(LAYOUTS))
    p.add_argument("--compression", default="zlib", choices=COMPRESSIONS)
    args = p.parse_args(argv)
    spec = DatasetSpec(args.size, args.layout, args.compression)
    files = ensure_dataset(spec)
    print(f"{spec.name}: {len(files)} files, {spec.nbytes / 1e9:.2f} GB in {files[0].parent}")


if __name__ == "__main__":
    main()
