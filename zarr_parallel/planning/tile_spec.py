"""The ``tiles`` option of a request, validated: :class:`TileSpec`, its short and long forms, and
zarr-parallel 0.5's ``tiled`` preprocessor translated into it (:func:`request_tiles`).

A tiled cache cuts some dimensions of the target (say latitude and longitude) into tiles of a fixed
size and numbers the tiles along one *tile dimension*; the tile arithmetic itself is in
:mod:`zarr_parallel.planning.tiles`. Nothing here does I/O or imports xarray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarr_parallel.errors import RequestError
from zarr_parallel.names import path_problem

#: Keys of the long form of the ``tiles`` option; a mapping with none of them is the short form.
OPTION_KEYS = (
    "size",
    "overlap",
    "edge",
    "fill_value",
    "dim",
    "within",
    "order",
    "periods",
    "ascending",
)
EDGES = ("error", "drop", "pad")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class TileSpec:
    """The validated ``tiles`` option.

    Parameters
    ----------
    size
        Tile length per tiled dimension, e.g. ``{"latitude": 64, "longitude": 64}``.
    overlap
        Elements shared by neighbouring tiles per tiled dimension (0: tiles touch). The step from
        one tile to the next is ``size - overlap``.
    edge
        What to do when the tiles do not cover a dimension exactly: ``"error"`` (refuse, the
        default: nothing is dropped or invented silently), ``"drop"`` (leave out the remainder at
        the end) or ``"pad"`` (extend the last tile with ``fill_value``).
    fill_value
        Value of padded elements; ``None`` means NaN, which needs a floating-point variable.
    dim
        Name of the tile dimension.
    within
        Name of the within-tile dimension of each tiled dimension.
    order
        Tiled dimensions from the slowest to the fastest varying tile index; ``None`` follows the
        data's dimension order.
    periods
        Per tiled dimension, the period of its coordinate (e.g. 360 for longitude): a tile whose
        coordinate jumps by more than half of it crosses a seam and is refused.
    ascending
        Refuse tiled dimensions whose coordinates are not strictly ascending.
    """

    size: Mapping[str, int]
    overlap: Mapping[str, int] = field(default_factory=dict)
    edge: str = "error"
    fill_value: float | int | None = None
    dim: str = "tile"
    within: Mapping[str, str] = field(default_factory=dict)
    order: tuple[str, ...] | None = None
    periods: Mapping[str, float] = field(default_factory=dict)
    ascending: bool = False

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_edge()
        self._check_names()
        self._check_order()

    def _check_lengths(self) -> None:
        if not isinstance(self.size, Mapping) or not self.size:
            raise RequestError(
                "tiles.size",
                self.size,
                "must name at least one dimension with its tile length",
                "Write e.g. tiles: {size: {latitude: 64, longitude: 64}}",
            )
        for d, s in self.size.items():
            if not _is_int(s) or s <= 0:
                raise RequestError(
                    f"tiles.size.{d}",
                    s,
                    "must be a positive whole number of elements",
                    "Use e.g. 64",
                )
        tiled = set(self.size)
        overlap = dict(self.overlap)
        for d, ov in overlap.items():
            if d not in tiled:
                raise RequestError(
                    f"tiles.overlap.{d}", ov, "names a dimension that is not tiled", _names(tiled)
                )
            if not _is_int(ov) or not 0 <= ov < self.size[d]:
                raise RequestError(
                    f"tiles.overlap.{d}",
                    ov,
                    f"must be a whole number from 0 to {self.size[d] - 1} (less than the tile)",
                    "Use 0 for tiles that touch without sharing elements",
                )
        object.__setattr__(
            self, "overlap", {d: int(overlap.get(d, 0)) for d in self.size}
        )  # complete and in size order
        object.__setattr__(self, "size", {str(d): int(s) for d, s in self.size.items()})

    def _check_edge(self) -> None:
        if self.edge not in EDGES:
            raise RequestError(
                "tiles.edge", self.edge, "is not an edge policy", "Use 'error', 'drop' or 'pad'"
            )
        if self.fill_value is not None and not _is_number(self.fill_value):
            raise RequestError(
                "tiles.fill_value",
                self.fill_value,
                "must be a number",
                "Use e.g. -9999 (or leave it unset for NaN)",
            )
        if isinstance(self.fill_value, float) and math.isnan(self.fill_value):
            object.__setattr__(self, "fill_value", None)  # None means NaN: one spelling
        elif self.fill_value is not None and not math.isfinite(self.fill_value):
            # Infinities do not survive the request's JSON on the way to the workers.
            raise RequestError(
                "tiles.fill_value",
                self.fill_value,
                "must be finite",
                "Use a finite number, or leave it unset for NaN",
            )

    def _check_names(self) -> None:
        tiled = set(self.size)
        if not isinstance(self.dim, str) or not self.dim or self.dim in tiled:
            raise RequestError(
                "tiles.dim",
                self.dim,
                "must be a new dimension name, not a tiled dimension",
                "Use e.g. 'tile'",
            )
        _check_path_name("tiles.dim", self.dim)
        within = dict(self.within)
        for d in within:
            if d not in tiled:
                raise RequestError(
                    f"tiles.within.{d}", within[d], "names a dimension that is not tiled", ""
                )
        for d, name in within.items():
            _check_path_name(f"tiles.within.{d}", name)
        names = {d: str(within.get(d, f"{d}_in_tile")) for d in self.size}
        clash = [n for n in names.values() if not n or n in tiled or n == self.dim]
        if clash or len(set(names.values())) != len(names):
            raise RequestError(
                "tiles.within",
                names,
                "needs distinct new names, different from the tiled dimensions and tiles.dim",
                "Write e.g. within: {latitude: y, longitude: x}",
            )
        object.__setattr__(self, "within", names)

    def _check_order(self) -> None:
        tiled = set(self.size)
        if self.order is not None:
            order = tuple(str(d) for d in self.order)
            if sorted(order) != sorted(self.size):
                raise RequestError(
                    "tiles.order",
                    list(order),
                    "must list every tiled dimension once, slowest varying first",
                    f"Use an order of {list(self.size)}",
                )
            object.__setattr__(self, "order", order)
        for d, period in self.periods.items():
            if d not in tiled or not _is_number(period) or period <= 0:
                raise RequestError(
                    f"tiles.periods.{d}",
                    period,
                    "must be the positive period of a tiled dimension's coordinate",
                    "Use e.g. {longitude: 360}",
                )
        object.__setattr__(self, "periods", {d: float(p) for d, p in self.periods.items()})
        if not isinstance(self.ascending, bool):
            raise RequestError("tiles.ascending", self.ascending, "must be true or false", "")

    @classmethod
    def parse(cls, value: Any) -> TileSpec:
        """Validate the long form or the short form ``{latitude: 64, longitude: 64}``.

        In the short form the options may stand beside the lengths:
        ``{latitude: 64, longitude: 64, edge: pad}``.

        >>> TileSpec.parse({"latitude": 64}).to_json()["within"]
        {'latitude': 'latitude_in_tile'}
        """
        if isinstance(value, TileSpec):
            return value
        if not isinstance(value, Mapping):
            raise RequestError(
                "tiles",
                value,
                "must be a mapping",
                "Write e.g. tiles: {latitude: 64, longitude: 64} or "
                "tiles: {size: {latitude: 64, longitude: 64}, edge: pad}",
            )
        fields = _option_fields(value)
        _normalise_overlap(fields)
        if isinstance(fields.get("edge"), str):
            fields["edge"] = fields["edge"].lower()
        _normalise_mappings(fields)
        _normalise_order(fields)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        """The canonical form kept in the request (every default filled in)."""
        return {
            "size": dict(self.size),
            "overlap": dict(self.overlap),
            "edge": self.edge,
            "fill_value": self.fill_value,
            "dim": self.dim,
            "within": dict(self.within),
            "order": list(self.order) if self.order is not None else None,
            "periods": dict(self.periods),
            "ascending": self.ascending,
        }

    def stride(self, dim: str) -> int:
        """Step between the starts of neighbouring tiles along ``dim``."""
        return self.size[dim] - self.overlap[dim]


def _option_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the long or the short form, with the tile lengths under ``size``."""
    fields = {k: v for k, v in value.items() if k in OPTION_KEYS}
    lengths = {k: v for k, v in value.items() if k not in OPTION_KEYS}
    if "size" not in fields:
        # Short form: tile lengths at the top, options beside them.
        fields["size"] = lengths
    elif lengths:
        name = next(iter(lengths))
        raise RequestError(
            f"tiles.{name}",
            lengths[name],
            "is not a tiles option",
            f"Use {list(OPTION_KEYS)}; tile lengths go under size",
        )
    return fields


def _normalise_overlap(fields: dict[str, Any]) -> None:
    """One overlap for every tiled dimension, or a mapping per dimension."""
    overlap = fields.get("overlap", 0)
    if _is_int(overlap):
        fields["overlap"] = {d: overlap for d in dict(fields["size"])}
    elif not isinstance(overlap, Mapping):
        raise RequestError(
            "tiles.overlap", overlap, "must be a number or a mapping", "Use e.g. 0 or {x: 4}"
        )


def _normalise_mappings(fields: dict[str, Any]) -> None:
    """``within`` and ``periods``: a mapping per tiled dimension, or unset."""
    for key in ("within", "periods"):
        if fields.get(key) is None:
            fields.pop(key, None)
        elif not isinstance(fields[key], Mapping):
            raise RequestError(
                f"tiles.{key}", fields[key], "must be a mapping per tiled dimension", ""
            )


def _normalise_order(fields: dict[str, Any]) -> None:
    """``order``: a list of the tiled dimensions (a tuple in the spec), or unset."""
    if fields.get("order") is None:
        return
    order = fields["order"]
    if isinstance(order, str) or not isinstance(order, Sequence):
        raise RequestError("tiles.order", order, "must be a list of the tiled dimensions", "")
    fields["order"] = tuple(order)


def _check_path_name(parameter: str, name: Any) -> None:
    """Refuse a tile dimension name that would not stay a folder inside the cache."""
    problem = path_problem(name)
    if problem is not None:
        raise RequestError(
            parameter,
            name,
            f"{problem}; dimension names become folders of the cache and must stay inside it",
            "Use a plain name such as 'tile' or 'y'",
        )


def _names(names: set[str]) -> str:
    return f"Use one of {sorted(names)}"


def from_v05(spec: Mapping[str, Any], parameter: str) -> dict[str, Any]:
    """Translate zarr-parallel 0.5's ``{"type": "tiled", ...}`` preprocessor into ``tiles``.

    0.5 cut tiles with xarray's ``coarsen(...).construct(...)`` and stacked them along
    ``batch_dim``; its ``boundary`` maps onto ``edge`` (``exact`` → error, ``trim`` → drop,
    ``pad`` → pad with NaN) and its dimension names are kept (``batch_dim``, ``<dim>_fine``), so
    code written for 0.5's caches finds them.

    >>> from_v05({"type": "tiled", "latitude": 8, "boundary": "trim"}, "p")["edge"]
    'drop'
    """
    args = {k: v for k, v in spec.items() if k != "type"}
    boundary = str(args.pop("boundary", "pad")).lower()
    edges = {"exact": "error", "trim": "drop", "pad": "pad"}
    if boundary not in edges:
        raise RequestError(
            f"{parameter}.boundary",
            boundary,
            "is not a boundary of 0.5's tiled transform",
            "Use 'exact', 'trim' or 'pad', or set the tiles option instead",
        )
    validate = args.pop("validate_axis_order", False)
    periods = args.pop("discontinuity_periods", None)
    sizes = dict(args)
    if periods is None:
        periods = {"longitude": 360.0, "lon": 360.0}  # 0.5's default guard
    periods = {d: p for d, p in dict(periods).items() if d in sizes}
    spec_obj = TileSpec.parse(
        {
            "size": sizes,
            "edge": edges[boundary],
            "dim": "batch_dim",
            "within": {d: f"{d}_fine" for d in sizes},
            "periods": periods,
            "ascending": bool(validate),
        }
    )
    return spec_obj.to_json()


def request_tiles(
    tiles: Any,
    preprocessors: Sequence[Any],
    chunks: Mapping[str, int] | str,
    shards: Mapping[str, int] | None,
) -> tuple[dict[str, Any] | None, list[Any]]:
    """The canonical ``tiles`` option of a request and its preprocessors without 0.5's ``tiled``.

    0.5's ``{"type": "tiled", ...}`` is translated when it is the last preprocessor (later
    transforms would see 0.5's tiled layout, which this version does not build). Chunks and shards
    must leave the tiled dimensions alone: a tiled cache holds one chunk per tile.
    """
    pre = list(preprocessors)
    last = pre[-1] if pre else None
    if isinstance(last, Mapping) and str(last.get("type")) == "tiled":
        where = f"preprocessors[{len(pre) - 1}]"
        if tiles is not None:
            raise RequestError(
                where,
                dict(last),
                "tiles twice: the tiles option is also set",
                "Keep one of them (the tiles option)",
            )
        tiles = from_v05(last, where)
        pre.pop()
    if tiles is None:
        return None, pre
    spec = TileSpec.parse(tiles)
    for field_name, given in (("chunks", chunks), ("shards", shards)):
        if not isinstance(given, Mapping):
            continue
        for d, value in given.items():
            if d in spec.size:
                raise RequestError(
                    f"{field_name}['{d}']",
                    value,
                    f"{d} is tiled: a tiled cache holds one chunk per tile",
                    f"Remove it; tiles.size sets the tile length along {d}",
                )
        if field_name == "chunks" and given.get(spec.dim, 1) != 1:
            raise RequestError(
                f"chunks['{spec.dim}']",
                given[spec.dim],
                "must be 1: a tiled cache holds one chunk per tile",
                f"Remove it, or group tiles into shards with shards: {{{spec.dim}: N}}",
            )
    return spec.to_json(), pre
