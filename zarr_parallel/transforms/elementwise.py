"""Element-wise xarray methods as transforms: each output element depends on its input alone.

zarr-parallel 0.5 called any xarray method named in a transform's ``type``. These are the ones a
job can apply to its region and get what xarray gives on the whole array (docs/design.md §2b):
``fillna`` with a scalar, ``clip``, ``where`` with a condition on the variable's own values,
``round`` and ``abs``. Nothing here looks at neighbouring elements, so every target index keeps
its source index and the plan's alignment holds. Arguments are JSON data: numbers and the
condition's operator are looked up here, never evaluated, and no callable is accepted.

The functions are registered by :mod:`zarr_parallel.transforms.registry` from
:data:`ELEMENTWISE`. They apply to the variable of a per-variable list, else to every numeric
data variable (each ``where`` then tests each variable's own values).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    # Only annotations name xarray here (see registry.py: validation should not import it).
    import xarray as xr

from zarr_parallel.errors import RequestError

#: The comparisons a ``where`` condition may name, by their symbol.
COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
#: Conditions on missing values, which take no ``value``.
MISSING_TESTS = ("isnull", "notnull")
#: Encoding keys in packed units: meaningless once the values changed (see :func:`_apply`).
_PACKED_KEYS = ("scale_factor", "add_offset", "_FillValue", "missing_value")


class Where(Protocol):
    """Where a transform runs (:class:`zarr_parallel.transforms.registry.TransformContext`)."""

    @property
    def parameter(self) -> str: ...

    @property
    def variable(self) -> str | None: ...


def _number(value: Any, parameter: str, allow_nan: bool = False) -> float | int:
    """``value`` if it is a plain number (not a bool, a string or a list)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (allow_nan or math.isfinite(value)):
        return value  # type: ignore[no-any-return]
    raise RequestError(
        parameter,
        value,
        "must be a finite number",
        "Give one number, e.g. 0 (element-wise transforms take scalars, not arrays or text)",
    )


def _apply(
    ds: xr.Dataset, ctx: Where, method: Callable[[xr.DataArray], xr.DataArray]
) -> xr.Dataset:
    """``method`` on the context's variable (else every data variable), attributes kept.

    The attributes carry the source variable's name (the planner's mapping). The encoding is
    kept but for the stored dtype, which the new values may not fit (a ``where`` turns ints into
    floats), and for packing: the values changed, so they are written as computed.
    """
    # In preprocessors, numbers only: a string or time variable (CDS's expver...) has no clip.
    numeric = [str(v) for v, var in ds.data_vars.items() if var.dtype.kind in "iufc"]
    names = [ctx.variable] if ctx.variable else numeric
    out = ds.copy()
    for name in names:
        var = out[name]
        result = method(var)
        result.attrs = dict(var.attrs)
        encoding = {k: v for k, v in var.encoding.items() if k != "dtype"}
        if "scale_factor" in encoding or "add_offset" in encoding:
            encoding = {k: v for k, v in encoding.items() if k not in _PACKED_KEYS}
        result.encoding = encoding
        out[name] = result
    return out


def _only(kwargs: Mapping[str, Any], allowed: set[str], ctx: Where, example: str) -> None:
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise RequestError(
            f"{ctx.parameter}.{bad[0]}",
            kwargs[bad[0]],
            f"is not an argument of this transform (it takes {sorted(allowed) or 'none'})",
            f"Write it as {example}",
        )


def _fillna(ds: xr.Dataset, ctx: Where, **kwargs: Any) -> xr.Dataset:
    """Replace missing values by a number: ``{"type": "fillna", "value": 0}``."""
    _only(kwargs, {"value"}, ctx, "{'type': 'fillna', 'value': 0}")
    if "value" not in kwargs:
        raise RequestError(
            f"{ctx.parameter}.value", None, "is required", "Write {'type': 'fillna', 'value': 0}"
        )
    value = _number(kwargs["value"], f"{ctx.parameter}.value")
    return _apply(ds, ctx, lambda var: var.fillna(value))


def _clip(ds: xr.Dataset, ctx: Where, **kwargs: Any) -> xr.Dataset:
    """Limit values to ``[min, max]`` (either may be left out): ``{"type": "clip", "min": 0}``."""
    _only(kwargs, {"min", "max"}, ctx, "{'type': 'clip', 'min': 0, 'max': 1}")
    low = None if kwargs.get("min") is None else _number(kwargs["min"], f"{ctx.parameter}.min")
    high = None if kwargs.get("max") is None else _number(kwargs["max"], f"{ctx.parameter}.max")
    if low is None and high is None:
        raise RequestError(
            ctx.parameter,
            dict(kwargs),
            "needs min, max or both",
            "Write {'type': 'clip', 'min': 0}",
        )
    if low is not None and high is not None and low > high:
        raise RequestError(
            f"{ctx.parameter}.min", low, f"is above max ({high})", "Swap min and max"
        )
    return _apply(ds, ctx, lambda var: var.clip(low, high))


def _condition(cond: Any, parameter: str) -> Callable[[xr.DataArray], xr.DataArray]:
    """A test of a variable's values from ``{"op": ">", "value": 0}`` or a list of them (all)."""
    if isinstance(cond, list) and cond:
        tests = [_condition(c, f"{parameter}[{i}]") for i, c in enumerate(cond)]
        return lambda var: _all(var, tests)
    fix = (
        "Write e.g. {'op': '>', 'value': 0}, {'op': 'notnull'}, or a list of such conditions "
        f"(all must hold); op is one of {[*COMPARISONS, *MISSING_TESTS]}"
    )
    if not isinstance(cond, Mapping) or "op" not in cond:
        raise RequestError(parameter, cond, "is not a condition", fix)
    op = cond["op"]
    if op in MISSING_TESTS:
        if set(cond) != {"op"}:
            raise RequestError(parameter, dict(cond), f"'{op}' takes no value", fix)
        return lambda var: var.isnull() if op == "isnull" else var.notnull()
    if op not in COMPARISONS or set(cond) != {"op", "value"}:
        raise RequestError(parameter, dict(cond), "is not a condition", fix)
    compare, value = COMPARISONS[op], _number(cond["value"], f"{parameter}.value")
    return lambda var: compare(var, value)


def _all(var: xr.DataArray, tests: list[Callable[[xr.DataArray], xr.DataArray]]) -> xr.DataArray:
    result = tests[0](var)
    for test in tests[1:]:
        result = result & test(var)
    return result


def _where(ds: xr.Dataset, ctx: Where, **kwargs: Any) -> xr.Dataset:
    """Keep values where a condition on them holds, else ``other`` (default: missing).

    ``{"type": "where", "cond": {"op": ">", "value": 0}, "other": 0}`` is xarray's
    ``var.where(var > 0, 0)``. ``drop`` is refused: it would change the target's shape.
    """
    _only(kwargs, {"cond", "other"}, ctx, "{'type': 'where', 'cond': {'op': '>', 'value': 0}}")
    if "cond" not in kwargs:
        raise RequestError(
            f"{ctx.parameter}.cond",
            None,
            "is required",
            "Write {'type': 'where', 'cond': {'op': '>', 'value': 0}, 'other': 0}",
        )
    test = _condition(kwargs["cond"], f"{ctx.parameter}.cond")
    if kwargs.get("other") is None:
        return _apply(ds, ctx, lambda var: var.where(test(var)))
    other = _number(kwargs["other"], f"{ctx.parameter}.other")
    return _apply(ds, ctx, lambda var: var.where(test(var), other))


def _round(ds: xr.Dataset, ctx: Where, **kwargs: Any) -> xr.Dataset:
    """Round to ``decimals`` places (default 0), as numpy rounds: ``{"type": "round"}``."""
    _only(kwargs, {"decimals"}, ctx, "{'type': 'round', 'decimals': 2}")
    decimals = kwargs.get("decimals", 0)
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise RequestError(
            f"{ctx.parameter}.decimals", decimals, "must be a whole number", "Use e.g. 2"
        )
    return _apply(ds, ctx, lambda var: var.round(decimals))


def _abs(ds: xr.Dataset, ctx: Where, **kwargs: Any) -> xr.Dataset:
    """Absolute values: ``{"type": "abs"}``."""
    _only(kwargs, set(), ctx, "{'type': 'abs'}")
    return _apply(ds, ctx, abs)


#: xarray methods 0.5 would have called that stay refused, and why (docs/design.md §2b): a job
#: sees its region only, so nothing may look at neighbours; nothing may run code or do I/O.
_NEIGHBOURS = (
    "shift diff cumsum cumprod ffill bfill interpolate_na rolling rolling_exp coarsen resample pad "
    "reindex reindex_like interp interp_like differentiate integrate cumulative_integrate weighted"
)
_REDUCTIONS = (
    "mean sum min max std var median quantile count reduce groupby groupby_bins argmin argmax "
    "idxmin idxmax polyfit"
)
REFUSED_METHODS = {
    **dict.fromkeys(
        _NEIGHBOURS.split(),
        "looks at neighbouring values, which a job writing one region cannot see",
    ),
    **dict.fromkeys(
        _REDUCTIONS.split(), "reduces along dimensions, which a job writing one region cannot do"
    ),
    **dict.fromkeys(
        ["eval", "query", "pipe", "map", "apply", "map_blocks", "assign"],
        "takes code or a callable; requests carry data only",
    ),
    **dict.fromkeys(
        ["to_netcdf", "to_zarr", "load", "compute", "persist", "close", "dump_to_store"],
        "does I/O; the run does that itself",
    ),
}

#: The element-wise transforms, by the xarray method name they mirror.
ELEMENTWISE: dict[str, Callable[..., xr.Dataset]] = {
    "fillna": _fillna,
    "clip": _clip,
    "where": _where,
    "round": _round,
    "abs": _abs,
}
