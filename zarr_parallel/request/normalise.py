"""One plain form of a request: the planner and the workers see the same values.

A request reaches the planner as Python objects (from YAML, from Python callers) and reaches the
workers as JSON text. Anything whose meaning changes on that trip makes the two disagree: an
unquoted YAML date is a ``datetime.date`` to the planner (``sel`` up to midnight of that day)
and the string ``"2020-01-03"`` to a worker (the whole day), so the plan and the writes differ.
:func:`normalise_fields` turns the request, once and at the boundary, into the values its JSON
form holds, and refuses what has no JSON form:

- dates and datetimes (also ``numpy.datetime64`` and ``pandas.Timestamp``) become ISO strings,
  the spelling a quoted value has, so an unquoted date means what the quoted one means;
- numpy scalars and arrays become Python numbers, booleans, strings and lists;
- tuples become lists, ``os.PathLike`` paths strings, pydantic models their fields;
- NaN and infinities are refused, except NaN as ``tiles.fill_value`` (it becomes ``None``, which
  means NaN there): JSON has no spelling for them and nowhere else do they mean anything;
- mapping keys must be strings (YAML makes ``10:`` an int and ``on:`` a boolean), and sets,
  bytes and other objects are refused.

The result is a fixed point of ``json.loads(json.dumps(...))``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel

from zarr_parallel.errors import RequestError

#: Deepest nesting accepted; a request needs a handful of levels, junk may need thousands.
MAX_DEPTH = 64
#: Top-level fields whose keys are names (dimensions, variables, options): shown as ``x['k']``.
_NAME_MAPS = {"chunks", "shards", "variables", "add_attrs", "open_options", "storage_options"}
#: Where NaN has a meaning; there it is spelled ``None``.
_NAN_MEANS_NONE = {"tiles.fill_value"}


def normalise_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return request fields in their plain JSON form (a new object; the input is not changed).

    Raises
    ------
    RequestError
        A value has no JSON form that keeps its meaning; the error names where it is.

    >>> import datetime, numpy
    >>> normalise_fields({"preprocessors": [{"type": "sel", "time": (datetime.date(2020, 1, 2),
    ...                   numpy.datetime64("2020-01-03T06:00"))}], "num_jobs": numpy.int64(4)})
    {'preprocessors': [{'type': 'sel', 'time': ['2020-01-02', '2020-01-03T06:00']}], 'num_jobs': 4}
    """
    return _mapping(fields, "", 0)


def _child(path: str, key: str) -> str:
    if not path:
        return key
    if path in _NAME_MAPS:
        return f"{path}['{key}']"
    return f"{path}.{key}"


def _refuse(path: str, value: Any, problem: str, fix: str) -> RequestError:
    return RequestError(path or "request", value, problem, fix)


def _normalise(value: Any, path: str, depth: int) -> Any:
    """The plain form of ``value`` found at ``path`` (see the module's rules)."""
    if depth > MAX_DEPTH:
        raise _refuse(path, "...", f"nests deeper than {MAX_DEPTH} levels", "Write a plain request")
    if value is None or isinstance(value, bool | str):
        return _scalar(value)
    if isinstance(value, np.timedelta64 | dt.timedelta):
        raise _refuse(
            path, str(value), "is a time span", "Write it as a string, e.g. '6h' or '30:00'"
        )
    if isinstance(value, int | float | np.integer | np.floating | np.bool_):
        return _number(value, path)
    if isinstance(value, dt.date | dt.time | np.datetime64):
        return _timestamp(value, path)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    elif isinstance(value, os.PathLike):
        return os.fspath(value)
    elif isinstance(value, np.ndarray):
        value = value.tolist()
        if not isinstance(value, list):  # a 0-d array is one scalar
            return _normalise(value, path, depth + 1)
    if isinstance(value, Mapping):
        return _mapping(value, path, depth)
    if isinstance(value, list | tuple):
        return [_normalise(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        raise _refuse(path, sorted(map(repr, value)), "is a set, which has no order", "Use a list")
    raise _refuse(
        path,
        repr(value)[:80],
        f"is a {type(value).__name__}, which a request cannot hold",
        "Use a string, a number, true/false, a list or a mapping",
    )


def _scalar(value: str | bool | None) -> str | bool | None:
    # str and bool subclasses (numpy.str_, enums) become the plain type json.loads gives back.
    if isinstance(value, bool):
        return bool(value)
    return None if value is None else str(value)


def _number(value: Any, path: str) -> int | float | bool | None:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(value)
    if math.isfinite(number):
        return number
    if math.isnan(number) and path in _NAN_MEANS_NONE:
        return None
    raise _refuse(
        path,
        number,
        "is not a finite number (NaN or infinity)",
        "Use a finite number: NaN and infinity mean nothing here and have no JSON spelling",
    )


def _timestamp(value: dt.date | dt.time | np.datetime64, path: str) -> str:
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            raise _refuse(path, "NaT", "is not a time (NaT)", "Use a date such as '2020-01-31'")
        return str(np.datetime_as_string(value))
    text = value.isoformat()
    if text == "NaT":  # pandas.NaT is a datetime too
        raise _refuse(path, "NaT", "is not a time (NaT)", "Use a date such as '2020-01-31'")
    return text


def _mapping(value: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _refuse(
                path,
                key,
                f"has a key that is not a string ({type(key).__name__} {key!r})",
                f"Quote the key, e.g. '{key}': ... (YAML reads 10 as a number and on/off/yes/no "
                "as true/false)",
            )
        out[str(key)] = _normalise(item, _child(path, str(key)), depth + 1)
    return out
