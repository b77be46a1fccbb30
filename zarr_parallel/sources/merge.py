"""Files that hold different variables: merged by variable, joined along the record dimension.

ERA5 downloads and CMIP6 datasets come one variable per file (``t2m_2020-01.nc``,
``d2m_2020-01.nc``...). As pangeo-forge's ``FilePattern`` with a merge and a concat dimension
describes them, each variable's files are joined along the record dimension and the variables
are then merged (docs/design.md §2b, UX). Variables keep their own files
(:class:`~zarr_parallel.sources.layout.FileGroup`), so each one's chunk grid, identity entries and
fast reads come from the files that hold it.

Refused before anything is written, naming the files: grids that differ (the coordinates of any
other dimension), steps that differ between variables (other steps, gaps) and a variable held by
two files for the same steps. Steps only some variables have yet, at the end, are left out and
reported (:attr:`Joined.pending`): when variables arrive on different days, a re-cache appends
the steps all of them have, and the rest once the other variables' files arrive.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.fingerprint import canonical_json
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources import combine
from zarr_parallel.sources.layout import FileGroup

logger = logging.getLogger(__name__)

#: Shared variables up to this size (per file) are compared between the files that hold them.
_COMPARED_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Joined:
    """Several netCDF files opened as one dataset, with where each variable comes from."""

    dataset: xr.Dataset
    files: list[str]
    concat_dim: str | None
    #: Per file of ``files``, its length along ``concat_dim``.
    file_lengths: list[int]
    #: Variables grouped by their files (empty when every file holds the same variables).
    groups: tuple[FileGroup, ...] = ()
    #: Steps some variables have and others do not yet, left out (one sentence each).
    pending: tuple[str, ...] = ()


@dataclass
class _Group:
    """One group while merging: its variables, files (in order), lengths and joined dataset."""

    names: tuple[str, ...]
    files: list[str]
    lengths: list[int]
    ds: xr.Dataset
    labels: np.ndarray | None = field(default=None)


def open_files(uris: Sequence[str], engine: str, req: CacheRequest) -> Joined:
    """Open netCDF files as one dataset: joined along one dimension, merged by variable when
    files hold different variables.

    Raises
    ------
    RequestError
        Naming the files, when they cannot be opened, joined or merged.
    """
    parts = combine.open_parts(uris, engine, req)
    if len({_names(p) for p in parts}) <= 1:
        return Joined(*combine.join_parts(parts, uris))
    return merge_parts(parts, uris)


def groups_digest(joined: Joined) -> list[str]:
    """What the source's digest adds for files holding different variables: which files hold
    which variables (nothing otherwise, so the digests of other sources stay as they were)."""
    return [canonical_json([g.to_json() for g in joined.groups])] if joined.groups else []


def _names(ds: xr.Dataset) -> tuple[str, ...]:
    return tuple(sorted(map(str, ds.data_vars)))


def _base(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def merge_parts(parts: Sequence[xr.Dataset], uris: Sequence[str]) -> Joined:
    """Merge opened files holding different variables (see the module's description)."""
    shared = _shared(parts)
    dim = _merge_concat_dim(parts, uris, shared)
    order = sorted(range(len(parts)), key=lambda i: (_sort_key(parts[i], dim), uris[i]))
    if dim is not None:
        along = [i for i in order if dim in parts[i].dims]
        combine.check_calendars([parts[i] for i in along], [uris[i] for i in along], dim)
    groups = [
        _join_group(parts, uris, idx, names, dim)
        for idx, names in _grouped(parts, uris, order, dim, shared)
    ]
    _check_grids(groups, dim)
    pending = _common_steps(groups, dim)
    try:
        ds = xr.merge(
            [g.ds for g in groups], join="exact", compat="override", combine_attrs="override"
        )
    except ValueError as e:
        raise RequestError(
            "data_uri",
            [_base(g.files[0]) for g in groups],
            f"files holding different variables do not merge ({e})",
            "Use files that share the same grid and steps",
        ) from e
    if dim is not None:
        ds = combine.harmonise_time_encoding(ds, parts, dim)
    # Every file read, once, in group order (a file may hold variables of several groups).
    files = list(dict.fromkeys(f for g in groups for f in g.files))
    length = {uris[i]: int(parts[i].sizes.get(dim, 0)) if dim else 0 for i in range(len(parts))}
    for note in pending:
        logger.warning("%s", note)
    return Joined(
        ds,
        files,
        dim,
        [length[f] for f in files] if dim else [],
        tuple(FileGroup(g.names, tuple(g.files), tuple(g.lengths)) for g in groups),
        tuple(pending),
    )


def _sort_key(ds: xr.Dataset, dim: str | None) -> tuple[int, Any]:
    """Files sort by their first step (files without the dimension first)."""
    if dim is None or dim not in ds.coords:
        return (0, 0)
    return (1, combine.first_label(ds, dim))


def _shared(parts: Sequence[xr.Dataset]) -> set[str]:
    """Variables every file set carries beside its own: CF bounds named by a coordinate's
    ``bounds`` attribute (CMIP6 files each hold ``time_bnds``, ``lat_bnds``...), and small
    variables in every file. They are read from one set of files and checked equal in the
    others (a large variable in two sets of files is refused instead: too costly to compare)."""
    sets = [set(map(str, p.data_vars)) for p in parts]
    found = {
        name
        for name in set.intersection(*sets)
        if all(p[name].nbytes <= _COMPARED_BYTES for p in parts)
    }
    for p in parts:
        found |= {str(c.attrs["bounds"]) for c in p.coords.values() if "bounds" in c.attrs}
    return found


def _merge_concat_dim(
    parts: Sequence[xr.Dataset], uris: Sequence[str], shared: set[str]
) -> str | None:
    """The record dimension: where two files holding the same variable differ (None when every
    variable is in one file only, so the files are merged and not joined)."""
    holders: dict[str, list[int]] = {}
    for i, p in enumerate(parts):
        for name in map(str, p.data_vars):
            holders.setdefault(name, []).append(i)
    for name, idx in holders.items():
        if len(idx) < 2 or name in shared:
            continue
        pair = [parts[idx[0]], parts[idx[1]]]
        try:
            return combine.find_concat_dim(pair, [uris[idx[0]], uris[idx[1]]])
        except RequestError:
            same = _names(pair[0]) == _names(pair[1])
            raise _twice(name, uris[idx[0]], uris[idx[1]], "", same) from None
    return None


def _twice(name: str, a: str, b: str, steps: str, same: bool = False) -> RequestError:
    """The error for a variable that two files hold for the same steps (``same``: files that
    hold the same variables, i.e. a copy)."""
    fix = "Leave one of the two files out of data_uri"
    if not same:
        fix += (
            f", or drop {name!r} from one of them (open_options: {{drop_variables: [{name}]}} "
            "drops it from every file)"
        )
    return RequestError(
        "data_uri",
        sorted([_base(a), _base(b)]),
        f"the variable {name!r} is in both {_base(a)} and {_base(b)} for the same steps{steps}, "
        "so it is unclear which file to read it from",
        fix,
    )


def _grouped(
    parts: Sequence[xr.Dataset],
    uris: Sequence[str],
    order: Sequence[int],
    dim: str | None,
    shared: set[str],
) -> list[tuple[list[int], tuple[str, ...]]]:
    """Variables grouped by the files (in ``order``) that hold them.

    A variable along the record dimension comes from every file holding it; one without it
    from the first such file; a shared one (:func:`_shared`) from the files of one variable set.
    """
    holders: dict[str, list[int]] = {}
    for i in order:
        for name in map(str, parts[i].data_vars):
            holders.setdefault(name, []).append(i)
    by_files: dict[tuple[int, ...], list[str]] = {}
    for name, idx in holders.items():
        if name in shared:
            idx = _shared_from(parts, uris, name, idx, dim)
        along = dim is not None and dim in parts[idx[0]][name].dims
        by_files.setdefault(tuple(idx) if along else (idx[0],), []).append(name)
    return [(list(idx), tuple(names)) for idx, names in by_files.items()]


def _shared_from(
    parts: Sequence[xr.Dataset], uris: Sequence[str], name: str, idx: list[int], dim: str | None
) -> list[int]:
    """The files a shared variable is read from (those of the first file's variable set),
    after checking the other files hold the same values for the same steps."""
    ref = _names(parts[idx[0]])
    mine = [i for i in idx if _names(parts[i]) == ref]
    for j in idx:
        if j in mine or parts[j][name].nbytes > _COMPARED_BYTES:
            continue
        var = parts[j][name]
        same_steps = [
            i
            for i in mine
            if dim is None
            or dim not in var.dims
            or (dim in parts[i].coords and parts[i][dim].equals(parts[j][dim]))
        ]
        if same_steps and not _equal(parts[same_steps[0]][name], var):
            a, b = _base(uris[same_steps[0]]), _base(uris[j])
            raise RequestError(
                "data_uri",
                [a, b],
                f"the variable {name!r}, which files of different variables share, differs "
                f"between {a} and {b} for the same steps",
                f"Fix the files, or leave {name!r} out with open_options: "
                f"{{drop_variables: [{name}]}}",
            )
    return mine


def _equal(a: xr.DataArray, b: xr.DataArray) -> bool:
    """Same dimensions and values (NaN equal to NaN), as xarray's ``equals`` says."""
    return bool(a.variable.equals(b.variable))  # type: ignore[no-untyped-call]


def _join_group(
    parts: Sequence[xr.Dataset],
    uris: Sequence[str],
    idx: list[int],
    names: tuple[str, ...],
    dim: str | None,
) -> _Group:
    """The files of one group joined along ``dim``, holding the group's variables only."""
    subset = [parts[i][list(names)] for i in idx]
    files = [uris[i] for i in idx]
    if dim is not None and len(idx) > 1:
        _check_no_overlap(parts, uris, idx, names, dim)
        ds, files, _, lengths = combine.join_parts(subset, files, dim)
    else:
        ds = subset[0]
        lengths = [int(ds.sizes[dim])] if dim is not None and dim in ds.dims else []
    labels = np.asarray(ds[dim].values) if dim is not None and dim in ds.coords else None
    return _Group(names, list(files), lengths, ds, labels)


def _check_no_overlap(
    parts: Sequence[xr.Dataset],
    uris: Sequence[str],
    idx: Sequence[int],
    names: tuple[str, ...],
    dim: str,
) -> None:
    """Refuse two files holding different variables that share one for overlapping steps."""
    for a, b in itertools.pairwise(idx):
        pa, pb = parts[a], parts[b]
        if dim not in pa.coords or dim not in pb.coords or _names(pa) == _names(pb):
            continue
        last, first = pa[dim].values[-1], pb[dim].values[0]
        if not last < first:
            steps = f" ({dim} {combine.label_text(first)} to {combine.label_text(last)})"
            raise _twice(names[0], uris[a], uris[b], steps)


def _check_grids(groups: Sequence[_Group], dim: str | None) -> None:
    """Refuse groups whose coordinates differ along any dimension but the record one."""
    seen: dict[str, tuple[np.ndarray, _Group]] = {}
    for g in groups:
        for name in map(str, g.ds.dims):
            if name == dim:
                continue
            values = (
                np.asarray(g.ds[name].values)
                if name in g.ds.coords
                else np.arange(g.ds.sizes[name])
            )
            if name not in seen:
                seen[name] = (values, g)
                continue
            first, other = seen[name]
            if first.shape != values.shape or not np.array_equal(first, values):
                raise RequestError(
                    "data_uri",
                    [_base(other.files[0]), _base(g.files[0])],
                    f"files holding different variables are on different grids: {name!r} has "
                    f"{_describe(first)} in {_base(other.files[0])} "
                    f"({', '.join(other.names)}) but {_describe(values)} in "
                    f"{_base(g.files[0])} ({', '.join(g.names)}); merged variables must share "
                    f"every coordinate{f' but {dim!r}' if dim else ''}",
                    "Cache variables on different grids in separate requests (each with its own "
                    "files in data_uri), or regrid them to one grid first",
                )


def _describe(values: np.ndarray) -> str:
    if values.size == 0:
        return "no values"
    ends = f"from {combine.label_text(values[0])} to {combine.label_text(values[-1])}"
    return f"{values.size} value{'s' if values.size != 1 else ''} {ends}"


def _common_steps(groups: list[_Group], dim: str | None) -> list[str]:
    """Cut every group to the steps all of them have; sentences for the steps left out.

    Raises
    ------
    RequestError
        When the groups' steps differ within the steps they all have (other steps, a gap).
    """
    along = [g for g in groups if dim is not None and dim in g.ds.dims]
    if dim is None or len(along) < 2:
        return []
    n = min(int(g.ds.sizes[dim]) for g in along)
    ref = next(g for g in along if int(g.ds.sizes[dim]) == n)
    for g in along:
        _check_same_steps(g, ref, n, dim)
    notes: list[str] = []
    short = [name for g in along if int(g.ds.sizes[dim]) == n for name in g.names]
    for g in along:
        total = int(g.ds.sizes[dim])
        if total == n:
            continue
        notes.append(_pending_note(g, n, dim, short))
        _cut(g, n, dim)
    return notes


def _check_same_steps(g: _Group, ref: _Group, n: int, dim: str) -> None:
    if g.labels is not None and ref.labels is not None:
        same = np.asarray(g.labels[:n] == ref.labels[:n])
        if not bool(np.all(same)):
            raise _steps_differ(g, ref, int(np.flatnonzero(~same)[0]), dim)


def _cut(g: _Group, n: int, dim: str) -> None:
    """Keep the first ``n`` steps of a group, and the files that hold them."""
    g.ds = g.ds.isel({dim: slice(0, n)})
    starts = np.cumsum([0, *g.lengths])
    kept = [i for i in range(len(g.files)) if starts[i] < n]
    g.files = [g.files[i] for i in kept]
    g.lengths = [g.lengths[i] for i in kept]


def _file_at(g: _Group, k: int) -> str:
    starts = np.cumsum([0, *g.lengths])
    return _base(g.files[int(np.searchsorted(starts, k, side="right") - 1)])


def _pending_note(g: _Group, n: int, dim: str, short: Sequence[str]) -> str:
    total = int(g.ds.sizes[dim])
    span = ""
    if g.labels is not None:
        span = f" ({combine.label_text(g.labels[n])} to {combine.label_text(g.labels[-1])})"
    starts = np.cumsum([0, *g.lengths])
    late = [_base(f) for i, f in enumerate(g.files) if starts[i + 1] > n]
    shown = ", ".join(late[:3]) + (f" and {len(late) - 3} more" if len(late) > 3 else "")
    return (
        f"{total - n} step(s) of {', '.join(g.names)} along {dim!r}{span}, in {shown}, are "
        f"left out until {', '.join(short)} ha{'s' if len(short) == 1 else 've'} them too; a "
        "re-cache appends them once those files arrive"
    )


def _steps_differ(g: _Group, ref: _Group, k: int, dim: str) -> RequestError:
    """The error for two groups whose ``k``-th steps differ: name the step one lacks."""
    assert g.labels is not None and ref.labels is not None
    a, b = g.labels[k], ref.labels[k]
    having, lacking = (g, ref) if a < b else (ref, g)
    step = min(a, b)
    problem = (
        f"files hold different variables and their steps along {dim!r} disagree: "
        f"{', '.join(lacking.names)} has no step {dim}={combine.label_text(step)}, which "
        f"{', '.join(having.names)} has (in {_file_at(having, k)}); {', '.join(lacking.names)} "
        f"goes on with {combine.label_text(max(a, b))} (in {_file_at(lacking, k)}): a gap, or "
        "files with other steps"
    )
    return RequestError(
        "data_uri",
        sorted({_file_at(having, k), _file_at(lacking, k)}),
        problem,
        "Give every variable the same steps: add the missing file(s), or leave the files of "
        "the extra steps out of data_uri",
    )
