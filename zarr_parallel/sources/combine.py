"""Checks and fixes when several files are joined along one dimension.

xarray decodes each file's times on its own, so files that encode time with different units
combine into one correct ``datetime64`` axis. What needs care is what the cache stores: one
time encoding that represents every step exactly (:func:`harmonise_time_encoding`), chosen the
same way whatever files follow, so a later run over more files keeps the encoding. Files on
different calendars, and duplicated or backward steps along the joining dimension, are refused
before anything is written, naming the files (:func:`check_calendars`, :func:`check_steps`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.request import open_options
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import is_remote
from zarr_parallel.request.secrets import redact_text, redact_url
from zarr_parallel.sources.remote import describe_failure, readable_file

#: CF calendars that agree on every date a ``datetime64`` can hold after 1582.
_STANDARD = {"standard", "gregorian", "proleptic_gregorian"}
#: Time units from coarsest to finest, with their length in nanoseconds.
_UNITS = (
    ("days", 86_400 * 10**9),
    ("hours", 3_600 * 10**9),
    ("minutes", 60 * 10**9),
    ("seconds", 10**9),
    ("milliseconds", 10**6),
    ("microseconds", 10**3),
    ("nanoseconds", 1),
)
_UNIT_ALIASES = {
    "day": "days",
    "d": "days",
    "hour": "hours",
    "hr": "hours",
    "h": "hours",
    "minute": "minutes",
    "min": "minutes",
    "second": "seconds",
    "sec": "seconds",
    "s": "seconds",
    "millisecond": "milliseconds",
    "ms": "milliseconds",
    "microsecond": "microseconds",
    "us": "microseconds",
    "nanosecond": "nanoseconds",
    "ns": "nanoseconds",
}


def _name(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def _calendar(var: xr.DataArray) -> str | None:
    """The calendar a decoded time variable came from, or None if it is not a time."""
    if np.issubdtype(var.dtype, np.datetime64):
        cal = str(var.encoding.get("calendar", "standard")).lower()
        return "standard" if cal in _STANDARD else cal
    if var.dtype == object and var.size:
        first = var.values.ravel()[0]
        found = getattr(first, "calendar", None)
        if found is not None:
            return "standard" if str(found).lower() in _STANDARD else str(found).lower()
    return None


def check_calendars(parts: Sequence[xr.Dataset], files: Sequence[str], dim: str) -> None:
    """Refuse files whose times along ``dim`` use calendars that do not agree.

    ``standard``, ``gregorian`` and ``proleptic_gregorian`` agree (xarray decodes them to the
    same ``datetime64`` values); ``noleap``, ``360_day``... do not agree with them or each other.
    """
    if dim not in parts[0].coords:
        return
    found: dict[str, list[str]] = {}
    for part, path in zip(parts, files, strict=True):
        cal = _calendar(part[dim]) if dim in part.coords else None
        found.setdefault(cal or "not a time", []).append(_name(path))
    if len(found) > 1:
        listing = "; ".join(f"{cal}: {', '.join(names[:3])}" for cal, names in found.items())
        raise RequestError(
            "data_uri",
            [names[0] for names in found.values()],
            f"files encode {dim!r} on different calendars ({listing}), so their steps cannot be "
            "put on one time axis",
            "Cache files of one calendar together (or convert the others first)",
        )


def check_steps(
    ds: xr.Dataset, dim: str, files: Sequence[str], file_lengths: Sequence[int]
) -> None:
    """Refuse duplicated or non-increasing steps along the joining dimension ``dim``.

    Raises
    ------
    RequestError
        Naming the step and the file(s) holding it.
    """
    if dim not in ds.coords or ds[dim].ndim != 1 or ds.sizes[dim] < 2:
        return
    labels = ds[dim].values
    try:
        ok = labels[1:] > labels[:-1]
    except TypeError:  # labels that do not compare: nothing to check
        return
    if bool(np.all(ok)):
        return
    bad = int(np.flatnonzero(~np.asarray(ok))[0]) + 1
    offsets = np.cumsum([0, *file_lengths])

    def file_at(i: int) -> str:
        return _name(files[int(np.searchsorted(offsets, i, side="right") - 1)])

    prev, here = labels[bad - 1], labels[bad]
    first_file, second_file = file_at(bad - 1), file_at(bad)
    where = (
        f"in {first_file}" if first_file == second_file else f"in {first_file} and {second_file}"
    )
    if np.any(labels[:bad] == here):
        earlier = file_at(int(np.flatnonzero(labels[:bad] == here)[0]))
        where = f"in {earlier} and {second_file}" if earlier != second_file else f"in {earlier}"
        problem = f"the step {dim}={label_text(here)} appears twice ({where})"
    else:
        problem = (
            f"steps along {dim!r} go backwards: {label_text(here)} follows {label_text(prev)} "
            f"({where})"
        )
    involved = sorted({first_file, second_file})
    raise RequestError(
        "data_uri",
        involved,
        f"{problem}; a cache must hold each step once, in order",
        "Remove the overlapping or duplicated file from data_uri, or fix the file(s)",
    )


def label_text(label: Any) -> str:
    """A step's label as a user reads it (a timestamp for times)."""
    if isinstance(label, np.datetime64):
        return str(pd.Timestamp(label))
    return str(label)


def _parse_units(units: str) -> tuple[str, pd.Timestamp] | None:
    unit, sep, ref = units.partition(" since ")
    unit = unit.strip().lower()
    unit = _UNIT_ALIASES.get(unit, unit)
    if not sep or unit not in dict(_UNITS):
        return None
    try:
        stamp = pd.Timestamp(ref.strip())
    except (ValueError, TypeError):
        return None
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert(None)
    return unit, stamp


def _exact(values: np.ndarray, ref: pd.Timestamp, unit: str) -> bool:
    deltas = (values - np.datetime64(ref.to_datetime64(), "ns")).astype("timedelta64[ns]")
    return bool(np.all(deltas.astype(np.int64) % dict(_UNITS)[unit] == 0))


def time_encoding(values: np.ndarray, first: dict[str, Any]) -> dict[str, Any]:
    """A time encoding that stores every value of ``values`` exactly.

    The first file's units when they do; otherwise the coarsest unit that does, counted from the
    first file's reference date (or the first step), as 64-bit integers.

    >>> v = np.array(["2020-01-01T00", "2020-01-01T01", "2020-01-01T01:30"], "datetime64[ns]")
    >>> time_encoding(v, {"units": "hours since 2020-01-01", "dtype": np.dtype("int64")})["units"]
    'minutes since 2020-01-01 00:00:00'
    """
    values = np.asarray(values).astype("datetime64[ns]")
    parsed = _parse_units(str(first.get("units", "")))
    enc = {k: v for k, v in first.items() if k not in ("units", "dtype")}
    if parsed and _exact(values, parsed[1], parsed[0]):
        unit, ref = parsed
        out = {**enc, "units": first["units"]}
        dtype = np.dtype(first.get("dtype", "int64"))
        out["dtype"] = dtype if np.issubdtype(dtype, np.integer) else np.dtype("int64")
        return out
    ref = parsed[1] if parsed else pd.Timestamp(values.min())
    unit = next((u for u, _ in _UNITS if _exact(values, ref, u)), "nanoseconds")
    return {**enc, "units": f"{unit} since {ref:%Y-%m-%d %H:%M:%S}", "dtype": np.dtype("int64")}


def harmonise_time_encoding(ds: xr.Dataset, parts: Sequence[xr.Dataset], dim: str) -> xr.Dataset:
    """Give every time variable along ``dim`` one encoding that stores all its steps exactly.

    When all files share one encoding (units, calendar, dtype) it is kept as it is, so a
    multi-file cache stores time as a single-file cache would.
    """
    for name, var in ds.variables.items():
        if dim not in var.dims or not np.issubdtype(var.dtype, np.datetime64):
            continue
        encs = [
            (p[name].encoding.get("units"), p[name].encoding.get("calendar"))
            for p in parts
            if name in p.variables
        ]
        first = dict(parts[0][name].encoding) if name in parts[0].variables else {}
        if len(set(encs)) <= 1 and first.get("units"):
            dtypes = {str(p[name].encoding.get("dtype")) for p in parts if name in p.variables}
            if len(dtypes) <= 1:
                continue
        var.encoding = time_encoding(var.values, first)
    return ds


# ---------------------------------------------------------------------------------------------
# Opening several netCDF files as one dataset


#: Datasets read through Python file objects (remote netCDF), closed at exit: HDF5 files left
#: to the interpreter's final teardown outlive their file objects and crash it.
_FILE_OBJECT_DATASETS: list[xr.Dataset] = []


def _close_file_object_datasets() -> None:
    while _FILE_OBJECT_DATASETS:
        with contextlib.suppress(Exception):
            _FILE_OBJECT_DATASETS.pop().close()


def _open_nc(uri: str, req: CacheRequest, opts: dict[str, Any]) -> xr.Dataset:
    ds = xr.open_dataset(readable_file(uri, req), **opts)
    if is_remote(uri):
        if not _FILE_OBJECT_DATASETS:
            atexit.register(_close_file_object_datasets)
        _FILE_OBJECT_DATASETS.append(ds)
    return ds


def open_parts(uris: Sequence[str], engine: str, req: CacheRequest) -> list[xr.Dataset]:
    """Open each netCDF file lazily (read-only), naming the file that cannot be opened."""
    opts = {"engine": engine, "chunks": {}, **open_options.read_only(engine, req.open_options)}
    if len(uris) == 1:
        return [_open_nc(uris[0], req, opts)]
    parts = []
    for uri in uris:
        try:
            parts.append(_open_nc(uri, req, opts))
        except Exception as e:
            raise RequestError(
                "data_uri",
                redact_url(uri),
                redact_text(f"could not be opened ({describe_failure(e)}: {e})"),
                "Remove or replace the damaged file (for a URL: check it exists and may be read)",
            ) from e
    return parts


def join_parts(
    parts: Sequence[xr.Dataset], uris: Sequence[str], dim: str | None = None
) -> tuple[xr.Dataset, list[str], str | None, list[int]]:
    """Join files holding the same variables along the one dimension where they differ.

    Returns the dataset, the files in order, the joining dimension (``dim`` when given) and
    each file's length along it (None and ``[]`` for a single file).
    """
    if len(parts) == 1:
        return parts[0], [uris[0]], None, []
    concat_dim = dim or find_concat_dim(parts, uris)
    check_calendars(parts, uris, concat_dim)
    order = sorted(range(len(parts)), key=lambda i: first_label(parts[i], concat_dim))
    parts = [parts[i] for i in order]
    files = [uris[i] for i in order]
    try:
        ds = xr.concat(
            parts,
            dim=concat_dim,
            data_vars="minimal",
            coords="minimal",
            compat="override",
            join="exact",
            combine_attrs="override",
        )
    except ValueError as e:
        raise RequestError(
            "data_uri",
            [os.path.basename(f) for f in files],
            f"files do not combine along {concat_dim!r} ({e})",
            "Use files that share the same grid and variables",
        ) from e
    lengths = [int(p.sizes[concat_dim]) for p in parts]
    check_steps(ds, concat_dim, files, lengths)
    ds = harmonise_time_encoding(ds, parts, concat_dim)
    return ds, files, concat_dim, lengths


def first_label(ds: xr.Dataset, dim: str) -> Any:
    """The first label of ``ds`` along ``dim`` (0 without a coordinate): files sort by it."""
    return ds[dim].values[0] if dim in ds.coords else 0


def find_concat_dim(parts: Sequence[xr.Dataset], uris: Sequence[str]) -> str:
    """The dimension along which the first two files differ.

    Raises
    ------
    RequestError
        When they do not differ along any dimension.
    """
    first, second = parts[0], parts[1]
    for dim in first.dims:
        if dim in first.coords and dim in second.coords:
            a, b = first[dim].values, second[dim].values
            if a.shape != b.shape or not np.array_equal(a, b):
                return str(dim)
    for dim in first.dims:
        if first.sizes[dim] != second.sizes.get(dim):
            return str(dim)
    raise RequestError(
        "data_uri",
        [os.path.basename(u) for u in uris[:2]],
        "files do not differ along any dimension, so they cannot be joined",
        "Pass the files of one dataset split along time (or another dimension)",
    )
