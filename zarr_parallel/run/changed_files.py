"""Source files since the cache was made: which are new, which changed, and do the changed ones
still hold the cached values?

A re-cache run (:mod:`zarr_parallel.run.recache_decision`) finds new files and files whose size or
modification time changed (:func:`file_changes`). Before it appends onto the published version,
the cached values that came from changed files are read back and compared with what the files
hold now (:func:`check_changed_files`); any difference means a full re-cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

from zarr_parallel.planning.fingerprint import canonical_json
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.chunk_compare import values_equal
from zarr_parallel.sources.layout import SourceLayout, group_files
from zarr_parallel.sources.target import Target

#: Changed files are checked value by value only while they hold at most this share of the
#: cached steps; beyond it re-caching costs about as much as checking.
MAX_CHECKED_SHARE = 0.5


def file_names(files: Sequence[str]) -> str:
    """The first four files' base names, and how many more there are.

    >>> file_names(["/d/a.nc", "/d/b.nc"])
    'a.nc, b.nc'
    """
    shown = [os.path.basename(f) for f in files[:4]]
    more = f" and {len(files) - 4} more" if len(files) > 4 else ""
    return ", ".join(shown) + more


def file_changes(
    target: Target, old_layout: dict[str, Any], base: str
) -> tuple[list[str], list[str]] | str:
    """The new files after the cached ones and the cached files whose state changed, or the
    reason for a full re-cache.

    Parameters
    ----------
    target
        The source as it is now.
    old_layout
        The source layout the published version records (its ``files`` and ``file_states``).
    base
        The published version's name (for the reason).
    """
    layout = target.layout
    old_files = [str(f) for f in old_layout.get("files", [])]
    old_states = old_layout.get("file_states")
    if not old_states or len(old_states) != len(old_files):
        return f"the published version {base} does not record its source files' states"
    found = _new_files(layout, old_layout, old_files)
    if isinstance(found, str):
        return found
    new_files = found
    now = dict(zip(layout.files, layout.file_states, strict=False))
    changed = [
        f
        for f, old in zip(old_files, old_states, strict=True)
        if f in now and canonical_json(old) != canonical_json(now[f])
    ]
    if not new_files and not changed:
        return "the source's chunk layout changed"
    return new_files, changed


def _new_files(
    layout: SourceLayout, old_layout: dict[str, Any], old_files: list[str]
) -> list[str] | str:
    """The files after the cached ones (per variable when files hold different variables), or
    the reason the cached range itself changed."""
    files = list(layout.files)
    gone = [f for f in old_files if f not in files]
    if gone:
        return f"source file(s) {file_names(gone)} are gone"
    if not layout.groups and not old_layout.get("groups"):
        pairs = [(old_files, files)]
    else:
        # Each variable's files must still begin with the ones it was cached from.
        now = layout.to_json()
        pairs = [(group_files(old_layout, v)[0], group_files(now, v)[0]) for v in layout.variables]
    new_files: list[str] = []
    for old, current in pairs:
        if current[: len(old)] != old:
            early = [f for f in current if f not in old]
            return (
                f"new source file(s) {file_names(early)} sort before or among the cached ones, "
                "so the cached range itself changed"
            )
        new_files += [f for f in current[len(old) :] if f not in new_files]
    return new_files


def unchanged_reason(new_files: list[str], verified: list[str]) -> str:
    """Why a changed source that did not grow leaves the cache up to date."""
    if verified:
        return (
            f"source file(s) {file_names(verified)} changed state but hold the same values, "
            "and nothing new falls within the selection"
        )
    return f"new source file(s) {file_names(new_files)} fall outside the selection"


def check_changed_files(
    req: CacheRequest, target: Target, cache: xr.Dataset, changed: list[str], dim: str | None
) -> str | None:
    """Compare the cached values that came from changed files with what they hold now.

    Returns a reason for a full re-cache, or None when every cached value is unchanged.
    """
    found = _changed_rows(target, cache, changed, dim)
    if found is None:
        return (
            f"source file(s) {file_names(changed)} changed (size or modification time) and the "
            "cache cannot tell which of its values came from them"
        )
    rows, dim = found
    total = int(cache.sizes[dim])
    if rows.size > MAX_CHECKED_SHARE * max(total, 1):
        return (
            f"source file(s) {file_names(changed)} changed (size or modification time) and hold "
            f"{rows.size} of the {total} cached steps along {dim!r}: re-caching costs about as "
            "much as checking them"
        )
    budget = max(1, (req.memory_bytes - req.reserve_bytes) // 4)
    with dask.config.set(scheduler="synchronous"):
        for vname, var in target.template().data_vars.items():
            if dim not in var.dims:
                problem = _check_first_file(target, cache, changed, str(vname), var)
            else:
                problem = _check_rows(cache, changed, str(vname), var, (dim, rows, budget))
            if problem:
                return problem
    return None


def _changed_rows(
    target: Target, cache: xr.Dataset, changed: list[str], dim: str | None
) -> tuple[np.ndarray, str] | None:
    """The cached positions along ``dim`` that came from ``changed`` files, and ``dim`` (the
    joining dimension when None is given); None when the cache cannot tell."""
    layout = target.layout
    concat = layout.concat_dim
    if not concat:
        return None
    index = f"_zpi_{concat}"
    if index not in target.dataset.coords:
        return None
    if len(layout.file_lengths) != len(layout.files):
        return None
    src_dim = target.dataset[index].dims
    if dim is None and src_dim:
        dim = str(src_dim[0])
    if dim is None or src_dim != (dim,):
        return None
    old_n = int(cache.sizes[dim])
    src = np.asarray(target.dataset[index].values)[:old_n]
    hit = np.zeros(src.shape, dtype=bool)
    # Files holding different variables: each group of files has its own offsets.
    groups = [(g.files, g.lengths) for g in layout.groups] or [(layout.files, layout.file_lengths)]
    for files, lengths in groups:
        if len(lengths) != len(files):
            return None
        offsets = np.cumsum([0, *lengths])
        for f in changed:
            if f in files:
                i = files.index(f)
                hit |= (src >= offsets[i]) & (src < offsets[i + 1])
    return np.flatnonzero(hit), dim


def _check_first_file(
    target: Target, cache: xr.Dataset, changed: list[str], vname: str, var: xr.DataArray
) -> str | None:
    """A variable without the append dimension, which comes from the first file."""
    files = target.layout.files_of(target.sources.get(vname) or vname)
    if (
        files
        and files[0] in changed
        and not values_equal(np.asarray(var.values), np.asarray(cache[vname].values))
    ):
        return f"the values of {vname!r} changed in {file_names(files[:1])}"
    return None


def _check_rows(
    cache: xr.Dataset,
    changed: list[str],
    vname: str,
    var: xr.DataArray,
    where: tuple[str, np.ndarray, int],
) -> str | None:
    """A variable along the append dimension: the changed rows, in windows within ``budget``."""
    dim, rows, budget = where
    row_bytes = max(1, var.nbytes // max(1, var.sizes[dim]))
    for a, b in _windows(rows, max(1, budget // row_bytes)):
        new = np.asarray(var.isel({dim: slice(a, b)}).values)
        old = np.asarray(cache[vname].isel({dim: slice(a, b)}).values)
        if not values_equal(new, old):
            return (
                f"values of {vname!r} at {dim} {a}:{b} differ from the cache: source "
                f"file(s) {file_names(changed)} were rewritten"
            )
    return None


def _windows(rows: np.ndarray, most: int) -> Iterator[tuple[int, int]]:
    """Contiguous runs of ``rows`` as ``[a, b)``, each at most ``most`` long."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        for a in range(int(run[0]), int(run[-1]) + 1, most):
            yield a, min(a + most, int(run[-1]) + 1)
