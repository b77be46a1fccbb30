"""Confinement: names that become paths inside the cache must stay inside it.

Every variable, coordinate and dimension name of the target becomes (or may become) a folder of
the Zarr store. A name with a path separator, ``.``/``..``, a leading dot (reserved for metadata
and this package's ``.zarr-parallel`` manifest), Zarr's reserved ``__`` prefix, or the name of a
metadata document would write outside its array's folder or over the store's own files, so it is
refused before anything is written. ``cache_label`` and ``cache_name`` are checked in
:mod:`zarr_parallel.request.model`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from zarr_parallel.errors import RequestError

if TYPE_CHECKING:  # names are checked before xarray is needed (tiles.py stays xarray-free)
    import xarray as xr

_METADATA_NAMES = {"zarr.json"}


def path_problem(name: object) -> str | None:
    """Why ``name`` cannot be a folder inside the cache, or None when it can.

    >>> path_problem("t2m") is None
    True
    >>> path_problem("..")
    "is a relative path ('.' or '..')"
    """
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\\\')"
    if "\x00" in name:
        return "contains a NUL character"
    if name in (".", ".."):
        return "is a relative path ('.' or '..')"
    if name.startswith("."):
        return "starts with '.' (reserved for metadata and the .zarr-parallel manifest)"
    if name.startswith("__"):
        return "starts with '__' (reserved by Zarr)"
    if name in _METADATA_NAMES:
        return "is the name of a Zarr metadata document"
    return None


def dataset_names(ds: xr.Dataset) -> Iterable[object]:
    """Every name of ``ds`` that may become a path: variables, coordinates, dimensions."""
    yield from ds.data_vars
    yield from ds.coords
    yield from ds.dims


def check_names(ds: xr.Dataset, parameter: str, value: object, where: str) -> None:
    """Raise :class:`RequestError` naming ``parameter`` if a name of ``ds`` would escape.

    ``where`` says which step produced the names (the source, the preprocessors...).
    """
    for name in dataset_names(ds):
        problem = path_problem(name)
        if problem is not None:
            raise RequestError(
                parameter,
                value,
                f"{where} the name {name!r}, which {problem}; names become folders of the "
                "cache and must stay inside it",
                "Rename it to a plain name such as 't2m' (a 'rename' transform)",
            )
