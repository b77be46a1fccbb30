"""Tile arithmetic (zarr_parallel.planning.tiles) against brute force, and the tiled planner."""

from __future__ import annotations

import math
from itertools import pairwise, product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.memory import job_memory
from zarr_parallel.planning.plan import plan_jobs
from zarr_parallel.planning.tile_spec import TileSpec, from_v05, request_tiles
from zarr_parallel.planning.tiles import (
    DimTiles,
    TileAxisMap,
    WithinTileAxisMap,
    exact_sizes,
    range_boxes,
)

# -- brute-force references -------------------------------------------------------------------


def tile_positions(tiles: list[DimTiles], t: int) -> tuple[int, ...]:
    return tuple(int(p) for p in np.unravel_index(t, [d.count for d in tiles]))


def tile_window(d: DimTiles, p: int) -> range:
    return range(p * d.stride, min(p * d.stride + d.size, d.length))


def tile_chunks(tiles: list[DimTiles], axes: list[AxisMap], t: int) -> set[tuple[int, ...]]:
    pos = tile_positions(tiles, t)
    per_dim = [
        {int(ax.chunk_of[i]) for i in tile_window(d, p)}
        for d, ax, p in zip(tiles, axes, pos, strict=True)
    ]
    return set(product(*per_dim))


@st.composite
def tiled_axes(draw: st.DrawFn) -> tuple[list[DimTiles], list[AxisMap]]:
    ndim = draw(st.integers(1, 3))
    tiles, axes = [], []
    for k in range(ndim):
        length = draw(st.integers(1, 30))
        size = draw(st.integers(1, 12))
        overlap = draw(st.integers(0, size - 1))
        edge = draw(st.sampled_from(["drop", "pad"]))
        if length < size and edge == "drop":
            edge = "pad"
        cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=5, unique=True))
        bounds = np.array(sorted({0, length, *[c for c in cuts if c < length]}))
        order = draw(st.sampled_from(["forward", "reversed"]))
        idx = np.arange(length)
        if order == "reversed":
            idx = idx[::-1]
        chunk_of = np.searchsorted(bounds, idx, side="right") - 1
        tiles.append(DimTiles.plan(f"d{k}", length, size, overlap, edge))
        axes.append(AxisMap(f"d{k}", chunk_of, np.diff(bounds)))
    return tiles, axes


# -- range_boxes ------------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_range_boxes_cover_the_range_exactly(shape: list[int], data: st.DataObject) -> None:
    total = math.prod(shape)
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    seg, lo, hi = range_boxes(np.array([start]), np.array([stop]), shape)
    assert len(seg) <= 2 * len(shape) - 1
    covered: list[int] = []
    for a, b in zip(lo, hi, strict=True):
        assert np.all(a < b) and np.all(b <= shape)
        for pos in product(*(range(x, y) for x, y in zip(a, b, strict=True))):
            covered.append(int(np.ravel_multi_index(pos, shape)))
    assert sorted(covered) == list(range(start, stop))


# -- DimTiles ---------------------------------------------------------------------------------


@given(
    length=st.integers(1, 60),
    size=st.integers(1, 20),
    data=st.data(),
    edge=st.sampled_from(["error", "drop", "pad"]),
)
def test_dim_tiles_follow_the_edge_policy(
    length: int, size: int, data: st.DataObject, edge: str
) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    stride = size - overlap
    exact = length >= size and (length - size) % stride == 0
    if (edge == "error" and not exact) or (edge == "drop" and length < size):
        with pytest.raises(RequestError, match=r"tiles\.size\.x"):
            DimTiles.plan("x", length, size, overlap, edge)
        return
    d = DimTiles.plan("x", length, size, overlap, edge)
    covered = set().union(*(tile_window(d, p) for p in range(d.count)))
    assert all(len(tile_window(d, p)) == size for p in range(d.count) if not d.padded)
    if edge == "pad" or exact:
        assert covered == set(range(length))  # nothing lost
    else:
        # drop: the most whole tiles, each inside the data
        assert max(covered) + 1 + stride > length
        assert all(p * stride + size <= length for p in range(d.count))
    assert d.covered == len(covered)


def test_error_edge_suggests_exact_sizes() -> None:
    assert exact_sizes(73, 0) == [1, 73]
    with pytest.raises(RequestError, match=r"tiles\.size\.latitude=20.*\(1, 73\).*'drop'"):
        DimTiles.plan("latitude", 73, 20, 0, "error")
    with pytest.raises(RequestError, match="at most 10"):
        DimTiles.plan("x", 10, 16, 0, "drop")


# -- TileAxisMap ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tiled_axes(), st.data())
def test_tile_axis_matches_brute_force(
    case: tuple[list[DimTiles], list[AxisMap]], data: st.DataObject
) -> None:
    tiles, axes = case
    tmap = TileAxisMap.build("tile", tiles, axes)
    count = tmap.size
    chunks = [tile_chunks(tiles, axes, t) for t in range(count)]
    # Clean boundaries: no source chunk shared by a tile before and a tile after.
    clean = [
        k for k in range(count + 1) if not (set().union(*chunks[:k]) & set().union(*chunks[k:]))
    ]
    assert tmap.source_boundaries.tolist() == clean
    # Needed: distinct data positions covered (over all tiled dims).
    assert tmap.needed == math.prod(
        len(set().union(*(tile_window(d, p) for p in range(d.count)))) for d in tiles
    )
    # Touched: what the write path reads, box by box.
    start = data.draw(st.integers(0, count - 1))
    stop = data.draw(st.integers(start + 1, count))
    _, lo, hi = range_boxes(np.array([start]), np.array([stop]), tmap.counts)
    expected = 0
    for a, b in zip(lo, hi, strict=True):
        elems = 1
        for d, ax, x, y in zip(tiles, axes, a, b, strict=True):
            window = range(x * d.stride, min((y - 1) * d.stride + d.size, d.length))
            used = {int(ax.chunk_of[i]) for i in window}
            elems *= sum(int(ax.chunk_len[c]) for c in used)
        expected += elems
    assert int(tmap.touched(np.array([start]), np.array([stop]))[0]) == expected
    single = max(
        math.prod(
            sum(int(ax.chunk_len[c]) for c in {int(ax.chunk_of[i]) for i in tile_window(d, p)})
            for d, ax, p in zip(tiles, axes, tile_positions(tiles, t), strict=True)
        )
        for t in range(count)
    )
    assert tmap.tile_touched() == single


def test_tiles_sharing_chunks_share_a_job() -> None:
    """Tiles 20 x 24 over chunks 40 x 72: units are two tile rows, each chunk read once."""
    tiles = [DimTiles.plan("lat", 80, 20, 0, "error"), DimTiles.plan("lon", 144, 24, 0, "error")]
    axes = [AxisMap.uniform("lat", 80, 40), AxisMap.uniform("lon", 144, 72)]
    tmap = TileAxisMap.build("tile", tiles, axes)
    assert tmap.source_boundaries.tolist() == [0, 12, 24]
    arr = ArrayInput(
        "t2m",
        (tmap, WithinTileAxisMap.build("y", 20), WithinTileAxisMap.build("x", 24)),
        (1, 20, 24),
        4,
        4,
    )
    plan = plan_jobs([arr], Limits(10**9, min_jobs=4))
    assert plan.read_amplification == 1.0
    seen: dict[tuple[int, ...], int] = {}
    for job in plan.jobs:
        (_, a, b) = job.region[0]
        for t in range(a, b):
            for chunk in tile_chunks(tiles, axes, t):
                assert seen.setdefault(chunk, job.id) == job.id  # each chunk in one job
    assert sorted(seen) == [(i, j) for i in range(2) for j in range(2)]
    assert plan.needed_bytes == 80 * 144 * 4
    # Room for one tile row but not two: cut at tile rows (one box, one read per job), and the
    # re-reads of the chunk rows shared by two jobs are counted.
    row = int(job_memory(40 * 144, 6 * 20 * 24, 4, 4))
    rows = plan_jobs([arr], Limits(row + 1000))
    assert rows.read_amplification == 2.0
    assert all(job.region[0][1] % 6 == 0 and job.region[0][2] % 6 == 0 for job in rows.jobs)
    assert rows.notes
    # Not even a row: single tiles, each re-reading its chunk.
    tiles_only = plan_jobs([arr], Limits(row - 1000))
    assert tiles_only.read_amplification > rows.read_amplification


# -- the option -------------------------------------------------------------------------------


def test_short_and_long_forms_agree() -> None:
    short = TileSpec.parse({"latitude": 64, "longitude": 32, "edge": "pad"})
    long = TileSpec.parse({"size": {"latitude": 64, "longitude": 32}, "edge": "PAD", "overlap": 0})
    assert short.to_json() == long.to_json()
    assert short.to_json()["within"] == {
        "latitude": "latitude_in_tile",
        "longitude": "longitude_in_tile",
    }
    assert TileSpec.parse(short.to_json()) == short


@pytest.mark.parametrize(
    ("value", "parameter"),
    [
        ({"size": {"latitude": 0}}, r"tiles\.size\.latitude"),
        ({"size": {"latitude": 8}, "overlap": 8}, r"tiles\.overlap\.latitude"),
        ({"size": {"latitude": 8}, "edge": "wrap"}, r"tiles\.edge"),
        ({"size": {"latitude": 8}, "dim": "latitude"}, r"tiles\.dim"),
        ({"size": {"latitude": 8, "longitude": 8}, "order": ["latitude"]}, r"tiles\.order"),
        ({"size": {"latitude": 8}, "within": {"latitude": "tile"}}, r"tiles\.within"),
        ({"size": {"latitude": 8}, "latitude": 4}, r"tiles\.latitude"),
        ({"size": {"latitude": 8}, "fill_value": "x"}, r"tiles\.fill_value"),
        ({"size": {"latitude": 8}, "fill_value": float("inf")}, r"tiles\.fill_value"),
        ([64, 64], r"tiles="),
    ],
)
def test_bad_options_name_the_field(value: object, parameter: str) -> None:
    with pytest.raises(RequestError, match=parameter):
        TileSpec.parse(value)


def test_v05_tiled_preprocessor_translates() -> None:
    pre = [
        {"type": "reverse_axis", "dim": "latitude"},
        {"type": "tiled", "latitude": 24, "longitude": 48, "boundary": "trim"},
    ]
    tiles, rest = request_tiles(None, pre, "auto", None)
    assert rest == pre[:1]
    assert tiles is not None
    assert tiles["size"] == {"latitude": 24, "longitude": 48}
    assert tiles["edge"] == "drop"
    assert tiles["dim"] == "batch_dim"
    assert tiles["within"] == {"latitude": "latitude_fine", "longitude": "longitude_fine"}
    assert tiles["periods"] == {"longitude": 360.0}
    assert from_v05({"type": "tiled", "x": 4}, "p")["edge"] == "pad"  # 0.5's default
    with pytest.raises(RequestError, match=r"preprocessors\[1\].*tiles twice"):
        request_tiles({"latitude": 8}, pre, "auto", None)


def test_chunks_must_leave_tiles_whole() -> None:
    with pytest.raises(RequestError, match=r"chunks\['latitude'\].*one chunk per tile"):
        request_tiles({"latitude": 8}, [], {"latitude": 4}, None)
    with pytest.raises(RequestError, match=r"chunks\['tile'\]"):
        request_tiles({"latitude": 8}, [], {"tile": 4}, None)
    tiles, _ = request_tiles({"latitude": 8}, [], {"tile": 1, "time": 24}, {"tile": 16})
    assert tiles is not None


@settings(max_examples=40, deadline=None)
@given(tiled_axes(), st.integers(1, 4), st.floats(0.0, 1.0))
def test_tiled_plans_cover_once_within_budget(
    case: tuple[list[DimTiles], list[AxisMap]], min_jobs: int, slack: float
) -> None:
    tiles, axes = case
    tmap = TileAxisMap.build("tile", tiles, axes)
    within = tuple(WithinTileAxisMap.build(f"w{k}", d.size) for k, d in enumerate(tiles))
    arr = ArrayInput("v", (tmap, *within), (1, *(d.size for d in tiles)), 4, 4)
    tile_elems = math.prod(d.size for d in tiles)
    one_tile = int(job_memory(tmap.tile_touched(), tile_elems, 4, 4))
    all_touched = int(tmap.touched(np.array([0]), np.array([tmap.size]))[0])
    everything = int(job_memory(all_touched, tmap.size * tile_elems, 4, 4))
    budget = int(one_tile + slack * (everything - one_tile))
    plan = plan_jobs([arr], Limits(budget, min_jobs=min_jobs))
    # Coverage and disjoint writes: the tile ranges partition the tiles.
    ranges = sorted((j.region[0][1], j.region[0][2]) for j in plan.jobs)
    assert ranges[0][0] == 0 and ranges[-1][1] == tmap.size
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    assert all(j.region[1:] == tuple((w.dim, 0, w.size) for w in within) for j in plan.jobs)
    # Budget.
    assert all(j.memory <= budget for j in plan.jobs)
    # Honest read cost: the sum of what each job's boxes decompress, over the distinct elements.
    assert plan.read_bytes == 4 * sum(
        int(tmap.touched(np.array([a]), np.array([b]))[0]) for a, b in ranges
    )
    assert plan.needed_bytes == 4 * tmap.needed
    if plan.read_amplification == 1.0 and all(d.covered == d.length for d in tiles):
        owner: dict[tuple[int, ...], int] = {}
        for job in plan.jobs:
            for t in range(job.region[0][1], job.region[0][2]):
                for chunk in tile_chunks(tiles, axes, t):
                    assert owner.setdefault(chunk, job.id) == job.id
