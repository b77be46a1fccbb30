"""What every contender's output must hold, and the checks the suite makes of each output.

The reference is the source after the case's selection, read by xarray; an output is equal
when every variable has the reference's dtype, shape and CRC32 of its values.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _checksums(ds: Any, variables: Sequence[str]) -> dict[str, Any]:
    """Per variable: dtype, shape and the CRC32 of its values in C order (by time blocks)."""
    out = {}
    for name in variables:
        if name not in ds.data_vars:
            out[name] = None
            continue
        var = ds[name]
        crc = 0
        step = 48
        for t in range(0, var.sizes["time"], step):
            block = var.isel(time=slice(t, t + step)).values
            crc = zlib.crc32(block.tobytes(), crc)
        out[name] = [str(var.dtype), list(var.shape), f"{crc:08x}"]
    return out


def reference(case: dict[str, Any]) -> dict[str, Any]:
    """What every output must hold: the source after the case's selection, read by xarray."""
    import xarray as xr

    ds = xr.open_mfdataset(case["files"], engine="h5netcdf", chunks={})
    box = case.get("box") or {}
    if box:
        ds = ds.isel({d: slice(*v) for d, v in box.items()})
    return _checksums(ds, case["variables"])


def output_checksums(store: str, variables: Sequence[str]) -> dict[str, Any]:
    """The same checksums of an output store."""
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=None)
    return _checksums(ds, variables)


def count_files(store: str) -> int:
    """Files of an output store (chunks and metadata; zarr-parallel's manifest excluded)."""
    root = Path(store).resolve()
    if not root.exists():
        return 0
    return sum(1 for p in root.rglob("*") if p.is_file() and ".zarr-parallel" not in p.parts)


def store_bytes(store: str) -> int:
    """Bytes of an output store's files (chunks and metadata; zarr-parallel's manifest excluded)."""
    root = Path(store).resolve()
    if not root.exists():
        return 0
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and ".zarr-parallel" not in p.parts
    )


def remove_store(store: str) -> None:
    """Remove an output and what zarr-parallel keeps beside it (versions, lock)."""
    path = Path(store)
    for extra in (Path(f"{store}.versions"), Path(f"{store}.lock"), path):
        if extra.is_symlink() or extra.is_file():
            extra.unlink()
        elif extra.is_dir():
            shutil.rmtree(extra, ignore_errors=True)


def _difference(expected: dict[str, Any], got: dict[str, Any]) -> str:
    parts = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            parts.append(f"{name} missing")
        elif have[:2] != want[:2]:
            parts.append(f"{name} is {have[0]}{have[1]}, expected {want[0]}{want[1]}")
        elif have != want:
            parts.append(f"{name} values differ")
    return "; ".join(parts)


def output_codec(store: str, variable: str) -> str:
    """The codec one output array's metadata names, in the request's ``compression`` forms where
    it has one (``zstd``, ``blosc:lz4:5``, ``none``...), else the codec's own name and settings."""
    import zarr

    codecs = zarr.open_array(str(Path(store).resolve()), path=variable, mode="r").compressors
    if not codecs:
        return "none"
    codec = codecs[0]
    # Zarr v3: {name, configuration}; v2: numcodecs' flat {id, ...}.
    meta = codec.to_dict() if hasattr(codec, "to_dict") else codec.get_config()
    config = meta.get("configuration", meta)
    name = str(meta.get("name", meta.get("id", type(codec).__name__))).removeprefix("numcodecs.")
    if name == "blosc":
        return f"blosc:{config.get('cname')}:{config.get('clevel')}"
    level = config.get("level")
    return name if level is None or (name == "zstd" and level == 0) else f"{name}:{level}"


def check_output(store: str, variables: Sequence[str], expected: dict[str, Any]) -> dict[str, Any]:
    """The output's file count, size and codec, whether it equals ``expected`` and, if not, how
    it differs."""
    checked: dict[str, Any] = {"files": count_files(store), "target_bytes": store_bytes(store)}
    try:
        checked["codec"] = output_codec(store, variables[0])
    except Exception as e:  # a store the contender left unreadable is reported below
        checked["codec"] = f"unknown ({type(e).__name__})"
    try:
        got = output_checksums(store, variables)
        checked["equal"] = got == expected
        if not checked["equal"]:
            checked["note"] = _difference(expected, got)
    except Exception as e:  # an unreadable output is a finding to report, not a crash
        checked["equal"] = False
        checked["note"] = f"output unreadable: {type(e).__name__}: {e}"[:200]
    return checked
