"""Recommendation candidates for a tiled request: tile order, edge, source-aligned tile sizes and
smaller chunks along the other dimensions.

:func:`tile_candidates` is a table of rules (:data:`RULES`), each giving the candidates of one kind;
the recommender (:mod:`zarr_parallel.run.recommend`) re-plans them all and keeps those that lower
the read amplification.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from zarr_parallel.planning.tile_spec import TileSpec
from zarr_parallel.planning.tiles import DimTiles
from zarr_parallel.transforms.tiled_target import Tiling

#: ``(changes, sentence, keeps_region, magnitude)``: one alternative request.
Candidate = tuple[dict[str, Any], str, bool, int]


@dataclass(frozen=True, eq=False)
class TiledRequest:
    """What the rules look at: the request, its target and the target's tiling."""

    req: Any
    target: Any
    tiling: Tiling
    spec: TileSpec

    @cached_property
    def base(self) -> dict[str, Any]:
        """The canonical ``tiles`` option, which candidates change one field of."""
        return self.spec.to_json()

    @property
    def name(self) -> str:
        """The variable whose layout stands for the tiled ones."""
        return self.tiling.variables[0]

    @cached_property
    def vlayout(self) -> Any:
        """That variable's source layout, if it has one."""
        source = self.target.sources.get(self.name)
        return None if source is None else self.target.layout.variables.get(source)

    @cached_property
    def aligned_options(self) -> list[tuple[DimTiles, int, list[int]]]:
        """Per tiled dimension whose tiles cut source chunks: the source chunk length and the
        nearest tile lengths below and above that divide it or that it divides."""
        axes = self.tiling.dim_axes(self.name, self.vlayout, self.target._axis)
        out: list[tuple[DimTiles, int, list[int]]] = []
        for t, ax in zip(self.tiling.tiles, axes, strict=True):
            chunk = int(ax.chunk_len.max()) if ax.chunk_len.size else t.length
            if t.size % chunk == 0 or chunk % t.size == 0:
                continue
            overlap = t.size - t.stride
            options = [
                s
                for s in range(overlap + 1, t.length + 1)
                if (s % chunk == 0 or chunk % s == 0)
                and (self.spec.edge != "error" or (t.length - s) % (s - overlap) == 0)
            ]
            below = [s for s in options if s < t.size][-1:]
            above = [s for s in options if s > t.size][:1]
            out.append((t, chunk, below + above))
        return out


def _order(c: TiledRequest) -> list[Candidate]:
    """Every other order of the tiled dimensions."""
    if len(c.tiling.order) <= 1:
        return []
    return [
        (
            {"tiles": {**c.base, "order": list(perm)}},
            f"set tiles.order to {list(perm)} (tiles numbered along {perm[-1]} first)",
            True,
            1,
        )
        for perm in itertools.permutations(c.tiling.order)
        if perm != c.tiling.order
    ]


def _edge(c: TiledRequest) -> list[Candidate]:
    """Pad instead of dropping a remainder the dropped tiles read anyway."""
    if c.spec.edge != "drop" or all(t.covered >= t.length for t in c.tiling.tiles):
        return []
    return [
        (
            {"tiles": {**c.base, "edge": "pad"}},
            "set tiles.edge to 'pad' (keep the remainder the dropped tiles read anyway)",
            True,
            1,
        )
    ]


def _sizes(c: TiledRequest) -> list[Candidate]:
    """Per tiled dimension, the nearest tile lengths aligned with the source chunks."""
    return [
        (
            {"tiles": {**c.base, "size": {**c.base["size"], t.name: s}}},
            f"set tiles.size['{t.name}'] to {s} (source chunks of {chunk} along {t.name})",
            True,
            abs(s - t.size),
        )
        for t, chunk, sizes in c.aligned_options
        for s in sizes
    ]


def _chunks(c: TiledRequest) -> list[Candidate]:
    """Smaller chunks along the other dimensions let a job hold whole rows of tiles."""
    asked = {} if c.req.chunks == "auto" else dict(c.req.chunks)
    var = c.target.dataset[c.name]
    out: list[Candidate] = []
    for dim in map(str, var.dims):
        if dim == c.spec.dim or dim in c.tiling.within_dims:
            continue
        chunk = c.target.chunks[c.name][dim]
        ax = c.target._axis(var, dim, c.vlayout)
        src = int(ax.chunk_len.max()) if ax.chunk_len.size else 1
        smaller = (chunk // 2) // src * src
        if 0 < smaller < chunk:
            out.append(
                (
                    {"chunks": {**asked, dim: smaller}},
                    f"set chunks['{dim}'] to {smaller} (smaller jobs hold whole rows of tiles)",
                    True,
                    chunk - smaller,
                )
            )
    return out


def _all_sizes(c: TiledRequest) -> list[Candidate]:
    """Every tiled dimension at once at its nearest source-aligned tile length."""
    aligned = {
        t.name: min(sizes, key=lambda s: abs(s - t.size))
        for t, _, sizes in c.aligned_options
        if sizes
    }
    if len(aligned) <= 1:
        return []
    return [
        (
            {"tiles": {**c.base, "size": {**c.base["size"], **aligned}}},
            f"set tiles.size to {{{', '.join(f'{d}: {s}' for d, s in aligned.items())}}} "
            "(aligned with the source chunks)",
            True,
            sum(abs(s - c.spec.size[d]) for d, s in aligned.items()),
        )
    ]


#: The rules, in the order their candidates are offered (the recommender keeps the first of
#: equal changes).
RULES: tuple[Callable[[TiledRequest], list[Candidate]], ...] = (
    _order,
    _edge,
    _sizes,
    _chunks,
    _all_sizes,
)


def tile_candidates(req: Any, target: Any) -> list[Candidate]:
    """Recommendation candidates for a tiled request: tile order and source-aligned tile sizes.

    Each is ``(changes, sentence, keeps_region, magnitude)``; the recommender re-plans them and
    keeps those that lower the read amplification.
    """
    tiling: Tiling | None = getattr(target, "tiling", None)
    if tiling is None or req.tiles is None:
        return []
    request = TiledRequest(req, target, tiling, TileSpec.parse(req.tiles))
    return [candidate for rule in RULES for candidate in rule(request)]
