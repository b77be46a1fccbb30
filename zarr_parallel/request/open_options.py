"""The options a request may pass to xarray when it opens a source: reading options only.

A source is never the cache's to change, and ``plan`` promises to write nothing, yet xarray's
backends take options that write: ``mode='w'`` truncates a netCDF file (netCDF4) or empties a
Zarr store, ``format``/``clobber``/``persist``/``diskless`` belong to file creation. So the
request's ``open_options`` are checked against an allow-list of reading options per engine
(everything else is refused before anything is opened), and every open of a source says
``mode='r'`` itself, whatever the request says.

The lists follow the signatures of xarray's ``open_dataset`` and of its ``h5netcdf``, ``netcdf4``
and ``zarr`` backends (xarray 2026.9). Options the run sets itself (``engine``, ``chunks``,
``storage_options``, ``backend_kwargs``) are refused too: the planner depends on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.request.protocols import protocol_of
from zarr_parallel.request.secrets import redact


def _bool_or_per_variable(value: Any) -> bool:
    # xarray takes a bool, or a mapping of variable name to bool, for these decoders.
    if isinstance(value, bool) or value is None:
        return True
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
    )


def _names(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _optional_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


_Check = tuple[Callable[[Any], bool], str]

_PER_VARIABLE: _Check = (_bool_or_per_variable, "true/false, or {variable: true/false}")
#: Decoding options of ``xarray.open_dataset`` every engine takes, with what each may hold.
_COMMON: dict[str, _Check] = {
    "decode_cf": (_optional_bool, "true or false"),
    "mask_and_scale": _PER_VARIABLE,
    "decode_times": _PER_VARIABLE,
    "decode_timedelta": _PER_VARIABLE,
    "use_cftime": _PER_VARIABLE,
    "concat_characters": _PER_VARIABLE,
    "decode_coords": (
        lambda v: v is None or isinstance(v, bool) or v in ("coordinates", "all"),
        "true, false, 'coordinates' or 'all'",
    ),
    "drop_variables": (_names, "a variable name or a list of names"),
    "group": (lambda v: v is None or isinstance(v, str), "a group path such as 'era5/surface'"),
}
_ZARR: dict[str, _Check] = {
    "use_zarr_fill_value_as_mask": (_optional_bool, "true or false"),
    "zarr_format": (lambda v: v in (None, 2, 3), "2 or 3"),
}

#: Reading options per engine; anything else is refused.
ALLOWED: dict[str, dict[str, _Check]] = {
    "h5netcdf": {
        **_COMMON,
        "phony_dims": (lambda v: v in (None, "sort", "access"), "'sort' or 'access'"),
        "decode_vlen_strings": (_optional_bool, "true or false"),
    },
    "netcdf4": {**_COMMON, "auto_complex": (_optional_bool, "true or false")},
    "zarr": {**_COMMON, **_ZARR, "consolidated": (_optional_bool, "true, false or null")},
    # A kerchunk reference is read by the zarr backend with consolidated=False (the references
    # are the metadata): only the zarr reading options that do not contradict that.
    "kerchunk": {**_COMMON, **_ZARR},
}

#: Engines whose xarray backend takes a ``mode`` (the others only ever read).
_TAKES_MODE = ("netcdf4", "zarr", "kerchunk")


def detect_engine(data_uri: str | Sequence[str], engine: str | None = None) -> str:
    """``engine`` if given, else the engine ``data_uri`` needs: ``.json`` is a kerchunk
    reference, ``.zarr`` (or a folder holding Zarr metadata) a Zarr store, else netCDF/HDF5."""
    if engine:
        return engine
    uris = [data_uri] if isinstance(data_uri, str) else list(data_uri)
    first = uris[0].rstrip("/")
    if len(uris) == 1 and first.endswith(".json"):
        return "kerchunk"
    if len(uris) == 1 and (
        first.endswith(".zarr")
        or (
            protocol_of(first) == "file"
            and os.path.isdir(first)
            and any(os.path.exists(os.path.join(first, m)) for m in ("zarr.json", ".zgroup"))
        )
    ):
        return "zarr"
    return "h5netcdf"


def allowed_keys(engine: str | None) -> list[str]:
    """The ``open_options`` keys allowed for ``engine`` (any engine's when it is None)."""
    if engine is None:
        return sorted({k for table in ALLOWED.values() for k in table})
    return sorted(ALLOWED.get(engine, _COMMON))


def check_open_options(engine: str | None, options: Mapping[str, Any]) -> None:
    """Refuse any ``open_options`` key that is not a reading option of ``engine``.

    ``engine`` None (not yet detected from ``data_uri``) allows the keys some engine allows;
    the source is checked again with its detected engine when it is opened.

    Raises
    ------
    RequestError
        Naming the key, showing its value and listing the allowed keys.
    """
    table = ALLOWED.get(engine or "", {}) if engine else {}
    for key, value in options.items():
        name = f"open_options['{key}']"
        check = table.get(str(key)) if engine else _any_engine(str(key))
        if check is None:
            which = f"the {engine} engine" if engine else "any engine"
            raise RequestError(
                name,
                redact(value),
                f"is not a reading option of {which}; sources are only ever opened read-only "
                "and the run sets engine, chunks and storage options itself",
                f"Remove it; allowed open_options are {allowed_keys(engine)}",
            )
        accepts, meaning = check
        if not accepts(value):
            raise RequestError(name, redact(value), f"must be {meaning}", f"Use {meaning}")


def _any_engine(key: str) -> _Check | None:
    for table in ALLOWED.values():
        if key in table:
            return table[key]
    return None


def read_only(engine: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments to open a source with: the checked options and ``mode='r'``.

    The mode is set here, after the request's options, so that nothing can turn it into a
    writing mode, even a request that never went through validation.
    """
    check_open_options(engine, options)
    out = dict(options)
    if engine in _TAKES_MODE:
        out["mode"] = "r"
    return out
