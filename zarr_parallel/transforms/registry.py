"""The registry of named, declarative, pure data transforms.

Preprocessors and per-variable transforms arrive as data, ``{"type": NAME, **kwargs}``, from the
Python API, a request file or the Prefect UI. They are looked up here by name; nothing the user
writes is evaluated. Plug-ins add names through the ``zarr_parallel.transforms`` entry point group:
each entry point loads a callable ``fn(ds, ctx, **kwargs) -> xarray.Dataset``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    # Only annotations name xarray here: importing it costs ~0.4 s that a request's
    # validation (and the command's --help) need not pay.
    import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.compression import parse_compression
from zarr_parallel.transforms.elementwise import ELEMENTWISE, REFUSED_METHODS

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "zarr_parallel.transforms"


@dataclass(frozen=True)
class TransformContext:
    """Where a transform runs: ``variable`` is set for per-variable transforms.

    ``parameter`` names the request field for error messages, e.g. ``preprocessors[0]``.
    """

    parameter: str
    variable: str | None = None


Transform = Callable[..., "xr.Dataset"]
_BUILTIN: dict[str, Transform] = {}
_ALIASES = {"subset": "sel", "reverse_axis": "reverse", "tiled": "tiled"}
#: Encoding key set by the ``encoding`` transform when it asks for packing (see store).
PACKING_ASKED = "_zp_packing_asked"
#: Encoding key set by the ``encoding`` transform's ``compression`` (the store builds the codec).
COMPRESSION_ASKED = "_zp_compression"


def register(name: str) -> Callable[[Transform], Transform]:
    """Register a built-in transform under ``name``."""

    def deco(fn: Transform) -> Transform:
        _BUILTIN[name] = fn
        return fn

    return deco


@cache
def _plugins() -> dict[str, Transform]:
    found: dict[str, Transform] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as e:  # a broken plug-in must not break the built-ins
            logger.warning("could not load transform plug-in %s: %s", ep.name, e)
    return found


def known_transforms() -> list[str]:
    """Names accepted in ``{"type": NAME}``, built-in, aliases and plug-ins."""
    return sorted({*_BUILTIN, *(a for a in _ALIASES if a != "tiled"), *_plugins()})


def lookup(name: str, parameter: str) -> Transform:
    """The transform registered as ``name``; a :class:`RequestError` naming the known ones."""
    canonical = _ALIASES.get(name, name)
    if canonical in _BUILTIN:
        return _BUILTIN[canonical]
    plugins = _plugins()
    if name in plugins:
        return plugins[name]
    if name == "tiled":
        raise RequestError(
            parameter,
            name,
            "0.5's 'tiled' is the 'tiles' request option here; it is translated only as the "
            "last preprocessor (nothing may transform the tiles afterwards)",
            "Move it to the end of preprocessors, or remove it and set "
            "tiles={'latitude': 64, 'longitude': 64}",
        )
    why = REFUSED_METHODS.get(name)
    raise RequestError(
        parameter,
        name,
        f"is not a known transform (xarray's {name} {why})" if why else "is not a known transform",
        f"Use one of {known_transforms()}, or register a plug-in in the "
        f"'{ENTRY_POINT_GROUP}' entry point group",
    )


def validate_spec(spec: Any, parameter: str) -> dict[str, Any]:
    """Check one ``{"type": NAME, ...}`` entry and return a copy of it."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise RequestError(
            parameter,
            spec,
            "must be a mapping with a 'type' key",
            "Write e.g. {'type': 'sel', 'time': ['2020-01-01', '2020-01-31']}",
        )
    lookup(str(spec["type"]), f"{parameter}.type")
    out = dict(spec)
    if _ALIASES.get(str(spec["type"]), str(spec["type"])) == "encoding" and "compression" in out:
        # Checked now, before anything is opened, and kept in its canonical form: the request's
        # fingerprint sees one spelling per codec.
        out["compression"] = parse_compression(out["compression"], f"{parameter}.compression").text
    return out


def apply_transforms(
    ds: xr.Dataset, specs: Sequence[Mapping[str, Any]], parameter: str, variable: str | None = None
) -> xr.Dataset:
    """Apply ``specs`` in order; errors name the failing entry."""
    for i, spec in enumerate(specs):
        where = f"{parameter}[{i}]"
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        fn = lookup(str(spec["type"]), f"{where}.type")
        ctx = TransformContext(where, variable)
        try:
            ds = fn(ds, ctx, **kwargs)
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(
                where,
                dict(spec),
                f"failed: {type(e).__name__}: {e}",
                "Check the transform's arguments against the data's dimensions and coordinates",
            ) from e
    return ds


def _indexer(value: Any, positional: bool) -> Any:
    """Two items are a slice, three a slice with a step; anything else passes through."""
    if isinstance(value, list | tuple):
        if len(value) == 2:
            return slice(value[0], value[1])
        if len(value) == 3:
            return slice(value[0], value[1], value[2])
        return list(value)
    if isinstance(value, Mapping) and {"start", "stop"} & set(value):
        return slice(value.get("start"), value.get("stop"), value.get("step"))
    return value


def _check_dims(ds: xr.Dataset, names: Sequence[str], ctx: TransformContext) -> None:
    for d in names:
        if d not in ds.dims:
            raise RequestError(
                f"{ctx.parameter}.{d}",
                d,
                "is not a dimension of the data",
                f"Use one of {sorted(map(str, ds.dims))}",
            )


def _select(
    ds: xr.Dataset, ctx: TransformContext, indexers: Mapping[str, Any], positional: bool
) -> xr.Dataset:
    _check_dims(ds, list(indexers), ctx)
    out = ds
    for dim, raw in indexers.items():
        idx = _indexer(raw, positional)
        try:
            selected = out.isel({dim: idx}) if positional else out.sel({dim: idx})
        except KeyError as e:
            # xarray's text suggests a `method` keyword this transform does not take.
            detail = str(e).strip("\"'").split(". Try setting")[0]
            raise RequestError(
                f"{ctx.parameter}.{dim}",
                raw,
                f"selects labels not in the data ({detail})",
                f"Use labels within {_range_text(out, dim)}",
            ) from e
        if dim in selected.dims and selected.sizes[dim] == 0:
            hint = f"Use labels within {_range_text(out, dim)}"
            if isinstance(idx, slice) and not positional and dim in out.indexes:
                flipped = out.sel({dim: slice(idx.stop, idx.start, idx.step)})
                if flipped.sizes[dim] > 0:
                    hint = (
                        f"{dim} is stored in the other order; write the ends as "
                        f"[{idx.stop!r}, {idx.start!r}]"
                    )
            raise RequestError(
                f"{ctx.parameter}.{dim}", raw, "selects nothing (outside the data)", hint
            )
        out = selected
    return out


def _range_text(ds: xr.Dataset, dim: str) -> str:
    if dim not in ds.coords or ds.sizes[dim] == 0:
        return f"0..{ds.sizes.get(dim, 0) - 1}"
    values = ds[dim].values
    if np.issubdtype(values.dtype, np.datetime64):
        ends = np.datetime_as_string(values[[0, -1]], unit="s")
        return f"{ends[0]} .. {ends[1]}"
    return f"{values[0]} .. {values[-1]}"


@register("sel")
def _sel(ds: xr.Dataset, ctx: TransformContext, **indexers: Any) -> xr.Dataset:
    """Label selection; two-item lists are slices with inclusive ends."""
    return _select(ds, ctx, indexers, positional=False)


@register("isel")
def _isel(ds: xr.Dataset, ctx: TransformContext, **indexers: Any) -> xr.Dataset:
    """Positional selection; two-item lists are slices (stop exclusive)."""
    return _select(ds, ctx, indexers, positional=True)


def _drop(
    ds: xr.Dataset, ctx: TransformContext, labels: Mapping[str, Any], positional: bool
) -> xr.Dataset:
    """Drop the given labels (or positions) along each dimension; the rest keep their order."""
    labels = dict(labels.get("labels", labels))
    _check_dims(ds, list(labels), ctx)
    out = ds
    for dim, raw in labels.items():
        wanted = list(raw) if isinstance(raw, list | tuple) else [raw]
        try:
            # Through sel/isel, so labels are read as `sel` reads them (ISO dates on a time axis).
            found = out.isel({dim: wanted}) if positional else out.sel({dim: wanted})
        except (KeyError, IndexError) as e:
            raise RequestError(
                f"{ctx.parameter}.{dim}",
                raw,
                f"names {'positions' if positional else 'labels'} not in the data ({e})",
                f"Use {'positions' if positional else 'labels'} within {_range_text(out, dim)}",
            ) from e
        keep = np.ones(out.sizes[dim], dtype=bool)
        if positional:
            keep[np.asarray(wanted, dtype=np.int64)] = False
        else:
            keep &= ~np.isin(out.indexes[dim], found.indexes[dim])
        out = out.isel({dim: np.flatnonzero(keep)})
        if out.sizes[dim] == 0:
            raise RequestError(
                f"{ctx.parameter}.{dim}", raw, "drops every element", "Drop fewer labels"
            )
    return out


@register("drop_sel")
def _drop_sel(ds: xr.Dataset, ctx: TransformContext, **labels: Any) -> xr.Dataset:
    """Drop labels, e.g. ``{"type": "drop_sel", "time": ["2020-01-01T06:00"]}``."""
    return _drop(ds, ctx, labels, positional=False)


@register("drop_isel")
def _drop_isel(ds: xr.Dataset, ctx: TransformContext, **positions: Any) -> xr.Dataset:
    """Drop positions, e.g. ``{"type": "drop_isel", "time": [0, 1]}``."""
    return _drop(ds, ctx, positions, positional=True)


@register("rename")
def _rename(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Rename variables or dimensions: xarray's form or 0.5's ``{var_id, new_name}``."""
    if "var_id" in kwargs or "new_name" in kwargs:
        mapping: dict[str, str] = {kwargs["var_id"]: kwargs["new_name"]}
    elif "new_name_or_name_dict" in kwargs:
        value = kwargs.pop("new_name_or_name_dict")
        if isinstance(value, str):
            if ctx.variable is None:
                raise RequestError(
                    ctx.parameter,
                    value,
                    "a single new name only works per variable",
                    "Give a mapping {'old': 'new'}, or put it under variables",
                )
            mapping = {ctx.variable: value}
        else:
            mapping = dict(value)
        mapping.update(kwargs)
    else:
        mapping = dict(kwargs.get("name_dict", kwargs))
    missing = [k for k in mapping if k not in ds.variables and k not in ds.dims]
    if missing:
        raise RequestError(
            ctx.parameter,
            missing,
            "names nothing in the data",
            f"Rename one of {sorted(map(str, ds.variables))}",
        )
    return ds.rename(mapping)


def rename_mapping(spec: Mapping[str, Any]) -> dict[str, str]:
    """The ``{old: new}`` names of a ``rename`` spec that need no data (else empty).

    >>> rename_mapping({"type": "rename", "var_id": "t2m", "new_name": "temp"})
    {'t2m': 'temp'}
    >>> rename_mapping({"type": "rename", "name_dict": {"t2m": "temp"}})
    {'t2m': 'temp'}
    """
    if spec.get("type") != "rename":
        return {}
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if "var_id" in kwargs or "new_name" in kwargs:
        return {str(kwargs.get("var_id")): str(kwargs.get("new_name"))}
    value = kwargs.pop("new_name_or_name_dict", kwargs.pop("name_dict", None))
    mapping = dict(value) if isinstance(value, Mapping) else {}
    mapping.update(kwargs if value is None or isinstance(value, Mapping) else {})
    return {str(k): str(v) for k, v in mapping.items() if isinstance(v, str)}


def names_before(specs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """For each name the ``rename`` entries of ``specs`` give, the name it had before them.

    Lets ``variables`` name a variable as the preprocessors leave it.

    >>> names_before([{"type": "rename", "var_id": "t2m", "new_name": "temp"},
    ...               {"type": "rename", "name_dict": {"temp": "air"}}])
    {'air': 't2m'}
    """
    origin: dict[str, str] = {}
    for spec in specs:
        for old, new in rename_mapping(spec).items():
            origin[new] = origin.pop(old, old)
    return {new: old for new, old in origin.items() if new != old}


@register("reverse")
def _reverse(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Flip dimensions, e.g. ``{"type": "reverse", "dim": "latitude"}``."""
    dims = kwargs.get("dims", kwargs.get("dim", kwargs.get("axis")))
    names = [dims] if isinstance(dims, str) else list(dims or [])
    _check_dims(ds, names, ctx)
    return ds.isel({d: slice(None, None, -1) for d in names})


@register("roll")
def _roll(ds: xr.Dataset, ctx: TransformContext, **shifts: Any) -> xr.Dataset:
    """Roll along dimensions, coordinates included.

    ``wrap_longitude: true`` also rewrites the rolled coordinates' values into -180..180, so
    ``{"type": "roll", "longitude": 720, "wrap_longitude": true}`` turns ERA5's 0..359.75 into
    -180..179.75 (the values must then increase, else the shift was not half the circle).
    """
    roll_coords = bool(shifts.pop("roll_coords", True))
    wrap = bool(shifts.pop("wrap_longitude", False))
    shifts = dict(shifts.pop("shifts", shifts))
    _check_dims(ds, list(shifts), ctx)
    out = ds.roll({k: int(v) for k, v in shifts.items()}, roll_coords=roll_coords)
    for dim in shifts if wrap else ():
        if dim not in out.coords:
            continue
        lon = out[dim]
        wrapped = (lon + 180.0) % 360.0 - 180.0
        if wrapped.size > 1 and not bool((wrapped.diff(dim) > 0).all()):
            raise RequestError(
                ctx.parameter,
                {dim: shifts[dim]},
                f"does not leave {dim} increasing within -180..180",
                f"Roll by half the length of {dim} ({out.sizes[dim] // 2})",
            )
        wrapped.attrs, wrapped.encoding = lon.attrs, lon.encoding
        out = out.assign_coords({dim: wrapped})
    return out


@register("transpose")
def _transpose(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Reorder dimensions."""
    dims = list(kwargs.get("dims", []))
    _check_dims(ds, [d for d in dims if d != "..."], ctx)
    return ds.transpose(*dims)


@register("sortby")
def _sortby(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Sort by coordinate values."""
    return ds.sortby(kwargs.get("variables"), ascending=bool(kwargs.get("ascending", True)))


@register("squeeze")
def _squeeze(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Drop length-1 dimensions."""
    return ds.squeeze(kwargs.get("dim"), drop=bool(kwargs.get("drop", False)))


@register("drop_vars")
def _drop_vars(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Drop variables by name."""
    names = kwargs.get("names", kwargs.get("name"))
    names = [names] if isinstance(names, str) else list(names or [])
    return ds.drop_vars(names, errors=kwargs.get("errors", "raise"))


@register("assign_attrs")
def _assign_attrs(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Set attributes: on the variable in a per-variable list, else on the dataset."""
    attrs = dict(kwargs.get("attrs", kwargs))
    if ctx.variable is not None:
        ds = ds.copy()
        ds[ctx.variable].attrs.update(attrs)
        return ds
    return ds.assign_attrs(attrs)


@register("astype")
def _astype(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Cast data variables (the one in a per-variable list, else all) to ``dtype``."""
    dtype = np.dtype(kwargs["dtype"])
    names = [ctx.variable] if ctx.variable else list(ds.data_vars)
    out = ds.copy()
    for name in names:
        var = out[name]
        out[name] = var.astype(dtype, keep_attrs=True)
        out[name].encoding = {
            k: v
            for k, v in var.encoding.items()
            if k not in ("dtype", "scale_factor", "add_offset")
        }
    return out


@register("encoding")
def _encoding(ds: xr.Dataset, ctx: TransformContext, **kwargs: Any) -> xr.Dataset:
    """Set storage encoding keys of a variable (``dtype``, ``_FillValue``, ``units``...).

    ``compression`` (``"zlib:1"``, ``"none"``... as the request's field) sets the codec of the
    variable (of every data variable in ``preprocessors``), overriding the request's.
    """
    allowed = {
        "dtype",
        "_FillValue",
        "scale_factor",
        "add_offset",
        "units",
        "calendar",
        "compression",
    }
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise RequestError(
            ctx.parameter,
            bad,
            "are not encoding keys this transform sets",
            f"Use only {sorted(allowed)}",
        )
    names = [ctx.variable] if ctx.variable else list(ds.data_vars)
    out = ds.copy()
    # Packing asked for here is kept even when the source's own packing is decoded away.
    marker: dict[str, Any] = {}
    if {"scale_factor", "add_offset"} & set(kwargs):
        marker[PACKING_ASKED] = True
    if "compression" in kwargs:
        codec = kwargs.pop("compression")
        marker[COMPRESSION_ASKED] = parse_compression(codec, f"{ctx.parameter}.compression").text
    for name in names:
        out[name].encoding = {**out[name].encoding, **kwargs, **marker}
    return out


_BUILTIN.update(ELEMENTWISE)
