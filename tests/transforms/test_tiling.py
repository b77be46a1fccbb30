"""Tiled caches end to end: every tile equals its window of the source after the preprocessors."""

from __future__ import annotations

import ast
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.errors import PlanError, RecommendationsPending, RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.run.finish import finish
from zarr_parallel.run.job import run_job
from zarr_parallel.run.steps import initialise, make_plan, prepare
from zarr_parallel.sources.target import build_target

# -- an independent reference -----------------------------------------------------------------


def tile_counts(length: int, size: int, overlap: int, edge: str) -> int:
    stride = size - overlap
    if length < size:
        return 1
    whole = (length - size) // stride + 1
    rest = length - ((whole - 1) * stride + size)
    return whole + (1 if rest and edge == "pad" else 0)


def assert_tiles_match(
    cache: xr.Dataset,
    expected: xr.Dataset,
    size: Mapping[str, int],
    *,
    overlap: Mapping[str, int] | None = None,
    edge: str = "error",
    dim: str = "tile",
    within: Mapping[str, str] | None = None,
    order: list[str] | None = None,
    fill: float = np.nan,
) -> None:
    """Compare every tile (data and coordinates) with its window of ``expected``, tile by tile."""
    overlap = {d: 0 for d in size} | dict(overlap or {})
    within = {d: f"{d}_in_tile" for d in size} | dict(within or {})
    names = [str(v) for v in expected.data_vars]
    order = order or [str(d) for d in expected[names[0]].dims if d in size]
    counts = [tile_counts(expected.sizes[d], size[d], overlap[d], edge) for d in order]
    assert cache.sizes[dim] == math.prod(counts)
    for t in range(math.prod(counts)):
        pos = dict(zip(order, np.unravel_index(t, counts), strict=True))
        window = {
            d: slice(p * (size[d] - overlap[d]), p * (size[d] - overlap[d]) + size[d])
            for d, p in pos.items()
        }
        back = {within[d]: d for d in size}
        for name in names:
            want = expected[name].isel(window)
            tile = cache[name].isel({dim: t})
            got = xr.DataArray(tile.values, dims=[back.get(str(d), d) for d in tile.dims])
            got = got.transpose(*want.dims)
            assert got.dtype == want.dtype
            assert tile.attrs == want.attrs
            pad = [(0, size[d] - want.sizes[d]) if d in size else (0, 0) for d in want.dims]
            full = np.pad(want.values, pad, constant_values=fill)
            np.testing.assert_array_equal(got.values, full, err_msg=f"{name} tile {t}")
        for d in size:
            if d in expected.coords:
                coord = expected[d].isel({d: window[d]}).values
                got_c = cache[d].isel({dim: t}).values
                np.testing.assert_array_equal(got_c[: coord.size], coord)
                assert np.all(np.isnan(got_c[coord.size :]))
            assert int(cache[f"{dim}_{d}"].isel({dim: t})) == pos[d]


def source(files: list[Path]) -> xr.Dataset:
    return xr.open_mfdataset(files, engine="h5netcdf").load()


def run(files: list[Path], tmp_path: Path, **fields: Any) -> Any:
    fields.setdefault("deploy_mode", "series")
    fields.setdefault("chunks", {"time": 12})
    cache_kw = {
        k: fields.pop(k)
        for k in (
            "deploy_mode",
            "memory_limit",
            "memory_reserve",
            "recommend_changes",
            "resume",
            "num_jobs",
        )
        if k in fields
    }
    zp = ZarrParallelAssembler([str(p) for p in files], **fields)
    return zp.cache(cache_store=str(tmp_path / "tiled.zarr"), **cache_kw)


# -- round trips ------------------------------------------------------------------------------


def test_tiles_that_divide_the_grid(era5_files: list[Path], tmp_path: Path) -> None:
    """Three files, tiles 24 x 48 over 72 x 144: one Zarr chunk per tile, every source chunk read
    once."""
    result = run(
        era5_files,
        tmp_path,
        preprocessors=[{"type": "isel", "latitude": [0, 72]}],
        tiles={"latitude": 24, "longitude": 48},
        recommend_changes="proceed",  # the selection cuts the last latitude chunk
    )
    cache = xr.open_zarr(result.path)
    assert dict(cache["t2m"].sizes) == {
        "tile": 9,
        "time": 60,
        "latitude_in_tile": 24,
        "longitude_in_tile": 48,
    }
    assert zarr.open_array(result.path, path="t2m").chunks == (1, 12, 24, 48)
    expected = source(era5_files).isel(latitude=slice(0, 72))
    assert_tiles_match(cache, expected, {"latitude": 24, "longitude": 48})
    assert cache.attrs["tiles"]["count"] == {"latitude": 3, "longitude": 3}
    np.testing.assert_array_equal(cache["time"].values, expected["time"].values)


@pytest.mark.parametrize(
    ("tiles", "preprocessors", "reference"),
    [
        pytest.param(
            {"latitude": 20, "longitude": 40, "edge": "pad"},
            [{"type": "reverse", "dim": "latitude"}],
            lambda ds: ds.isel(latitude=slice(None, None, -1)),
            id="pad-reversed-latitude",
        ),
        pytest.param(
            {
                "size": {"latitude": 20, "longitude": 40},
                "overlap": {"longitude": 10},
                "edge": "drop",
            },
            [],
            lambda ds: ds,
            id="drop-with-overlap",
        ),
    ],
)
def test_ragged_edges(
    era5_files: list[Path],
    tmp_path: Path,
    tiles: dict[str, Any],
    preprocessors: list[dict[str, Any]],
    reference: Callable[[xr.Dataset], xr.Dataset],
) -> None:
    result = run(
        era5_files,
        tmp_path,
        preprocessors=preprocessors,
        tiles=tiles,
        variables={"t2m": {}},
        recommend_changes="proceed",
    )
    cache = xr.open_zarr(result.path)
    size = tiles.get("size", {"latitude": 20, "longitude": 40})
    assert_tiles_match(
        cache,
        reference(source(era5_files)[["t2m"]]),
        size,
        overlap=tiles.get("overlap"),
        edge=tiles["edge"],
    )
    if tiles["edge"] == "drop":
        # 73 x 144 with 20 x 40 tiles 30 apart: 3 x 4 tiles, the rest left out.
        assert cache.sizes["tile"] == 12
        assert result.summary["read_amplification"] > 1.0  # dropped rows share chunks read


def test_error_edge_refuses_before_writing(era5_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"tiles\.size\.latitude=20.*does not tile.*'pad'"):
        run(era5_files, tmp_path, tiles={"latitude": 20, "longitude": 48})
    assert list(tmp_path.iterdir()) == []


def test_v05_tiled_preprocessor(era5_files: list[Path], tmp_path: Path) -> None:
    """0.5's trailing {"type": "tiled"} (time tiled too, boundary trim) keeps 0.5's names."""
    result = run(
        era5_files[:1],
        tmp_path,
        preprocessors=[
            {"type": "reverse_axis", "dim": "latitude"},
            {"type": "tiled", "time": 12, "latitude": 24, "longitude": 48, "boundary": "trim"},
        ],
        chunks=None,
        recommend_changes=False,
    )
    cache = xr.open_zarr(result.path)
    assert dict(cache["t2m"].sizes) == {
        "batch_dim": 2 * 3 * 3,
        "time_fine": 12,
        "latitude_fine": 24,
        "longitude_fine": 48,
    }
    expected = source(era5_files[:1]).isel(latitude=slice(None, None, -1))
    sizes = {"time": 12, "latitude": 24, "longitude": 48}
    within = {d: f"{d}_fine" for d in sizes}
    assert_tiles_match(
        cache.drop_vars("time"),
        expected.drop_vars("time"),
        sizes,
        edge="drop",
        dim="batch_dim",
        within=within,
    )


def test_integer_variables_need_a_fill_value_to_pad(era5_files: list[Path]) -> None:
    fields: dict[str, Any] = {
        "data_uri": [str(p) for p in era5_files],
        "variables": {"t2m": [{"type": "astype", "dtype": "int32"}]},
        "cache_store": "/tmp/never-written.zarr",
        "deploy_mode": "series",
    }
    with pytest.raises(RequestError, match=r"tiles\.fill_value.*int32"):
        build_target(build_request(**fields, tiles={"latitude": 20, "edge": "pad"}))
    target = build_target(
        build_request(**fields, tiles={"latitude": 20, "edge": "pad", "fill_value": -1})
    )
    last = target.dataset["t2m"].isel(tile=-1, time=0).values  # rows 60..79 of 73
    want = source(era5_files)["t2m"].astype("int32").isel(time=0, latitude=slice(60, 73))
    np.testing.assert_array_equal(last[:13], want.values)
    assert (last[13:] == -1).all()


# -- memory and recommendations ---------------------------------------------------------------


def test_memory_refusal_names_the_largest_tile_that_fits(
    era5_files: list[Path], tmp_path: Path
) -> None:
    fields: dict[str, Any] = {
        "tiles": {"latitude": 64, "longitude": 64, "edge": "pad"},
        "memory_limit": "1MB",
        "memory_reserve": "500KB",
    }
    with pytest.raises(PlanError, match=r"memory_limit.*one tile of 't2m'.*needs about") as err:
        run(era5_files, tmp_path, **fields)
    assert err.value.parameter == "memory_limit"
    assert "more than the 500.00 kB a job may use" in str(err.value)  # the budget
    assert list(tmp_path.iterdir()) == []  # nothing written
    found = re.search(r"tiles\.size=(\{[^}]*\})", err.value.fix)
    assert found, err.value.fix
    fitting = ast.literal_eval(found.group(1))
    assert all(fitting[d] < 64 for d in ("latitude", "longitude"))
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        chunks={"time": 12},
        cache_store=str(tmp_path / "x.zarr"),
        memory_limit="1MB",
        memory_reserve="500KB",
        tiles={"size": fitting, "edge": "pad"},
        deploy_mode="series",
    )
    _, plan = make_plan(req)  # the suggested tiles plan within the same limit
    assert plan.max_job_memory <= plan.memory_budget


def test_recommended_tile_size_is_applied(era5_files: list[Path], tmp_path: Path) -> None:
    """Tiles of 30 x 48 over chunks of 40 x 72 share chunks across every tile row and column: at
    3 MB the whole grid is too big for one job, so tile rows re-read chunk rows; a source-aligned
    tile size reads each chunk once."""
    fields: dict[str, Any] = {
        "data_uri": [str(p) for p in era5_files],
        "chunks": {"time": 12},
        "tiles": {"latitude": 30, "longitude": 48, "edge": "pad"},
        "variables": {"t2m": {}},
        "cache_store": str(tmp_path / "planned.zarr"),
        "deploy_mode": "series",
        # A budget this small cannot run a Python process: these requests are only planned.
        "memory_limit": "3MB",
        "memory_reserve": "1MB",
    }
    with pytest.raises(RecommendationsPending) as err:
        prepare(build_request(**fields))
    assert err.value.plan.read_amplification > 1.4
    recs = err.value.recommendations
    assert recs[0].read_amplification == pytest.approx(1.0)
    tile_recs = {repr(r.changes["tiles"]["size"]): r for r in recs if "tiles" in r.changes}
    for aligned in ({"latitude": 20, "longitude": 48}, {"latitude": 20, "longitude": 36}):
        assert tile_recs[repr(aligned)].read_amplification == pytest.approx(1.0)
    applied = prepare(build_request(**fields, recommend_changes="apply"))
    assert applied.applied is not None and applied.applied.changes == recs[0].changes
    assert applied.plan.read_amplification == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == []  # planning wrote nothing
    # The aligned tiles, written for real (with room for the interpreter).
    aligned = tile_recs[repr({"latitude": 20, "longitude": 48})].changes["tiles"]
    result = run(era5_files, tmp_path, tiles=aligned, variables={"t2m": {}})
    assert result.summary["read_amplification"] == pytest.approx(1.0)
    cache = xr.open_zarr(result.path)
    assert cache.attrs["tiles"]["size"] == {"latitude": 20, "longitude": 48}
    assert_tiles_match(cache, source(era5_files)[["t2m"]], aligned["size"], edge="pad")


def test_dropping_recommends_padding(era5_files: list[Path], tmp_path: Path) -> None:
    """Dropped rows are read anyway (they share chunks with kept ones): padding keeps them."""
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        chunks={"time": 12},
        tiles={"latitude": 20, "longitude": 48, "edge": "drop"},
        cache_store=str(tmp_path / "x.zarr"),
        deploy_mode="series",
    )
    with pytest.raises(RecommendationsPending) as err:
        prepare(req)
    best = err.value.recommendations[0]
    assert best.changes["tiles"]["edge"] == "pad"
    assert best.read_amplification == pytest.approx(1.0)


def test_recommended_tile_order(era5_factory: Any, tmp_path: Path) -> None:
    """Source chunks span all latitudes and 16 longitudes: tiles numbered along longitude share
    every chunk with the next tile row; numbered along latitude, a column of tiles is one unit."""
    files = era5_factory(n_files=2, steps_per_file=24, nlat=72, chunks=(6, 72, 16))
    req = build_request(
        data_uri=[str(p) for p in files],
        chunks={"time": 12},
        tiles={"latitude": 24, "longitude": 16},
        cache_store=str(tmp_path / "x.zarr"),
        memory_limit="2MB",
        memory_reserve="1MB",
        deploy_mode="series",
    )
    with pytest.raises(RecommendationsPending) as err:
        prepare(req)
    assert err.value.plan.read_amplification == pytest.approx(3.0)
    best = err.value.recommendations[0]
    assert best.changes["tiles"]["order"] == ["longitude", "latitude"]
    assert best.read_amplification == pytest.approx(1.0)
    assert "tiles.order" in best.sentence


# -- deploy modes and resume ------------------------------------------------------------------


def _arrays(path: Path) -> dict[str, bytes]:
    """Array metadata and chunk files of a cache (sidecars and group attributes ignored)."""
    root = path.resolve()
    out: dict[str, bytes] = {}
    for name, _ in zarr.open_group(root, mode="r").arrays():
        for f in sorted((root / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = f.read_bytes()
    return out


def test_series_and_dask_distributed_give_identical_caches(
    era5_files: list[Path], tmp_path: Path
) -> None:
    fields: dict[str, Any] = {
        "tiles": {"latitude": 20, "longitude": 40, "edge": "pad"},
        "recommend_changes": "proceed",
        "num_jobs": 4,
    }
    series = run(era5_files, tmp_path / "series", **fields)
    dask_run = run(era5_files, tmp_path / "dask", deploy_mode="dask_distributed", **fields)
    assert dask_run.summary["jobs"] >= 4
    a, b = _arrays(series.path), _arrays(dask_run.path)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_resume_writes_only_the_missing_tiles(era5_files: list[Path], tmp_path: Path) -> None:
    fields: dict[str, Any] = {
        "data_uri": [str(p) for p in era5_files],
        "chunks": {"time": 12},
        "tiles": {"latitude": 20, "longitude": 40, "edge": "pad"},
        "variables": {"d2m": {}},
        "num_jobs": 4,
        "recommend_changes": "proceed",
        "cache_store": str(tmp_path / "tiled.zarr"),
        "deploy_mode": "series",
    }
    prepared = prepare(build_request(**fields))
    assert len(prepared.todo) >= 4
    initialise(prepared)
    half = prepared.todo[: len(prepared.todo) // 2]
    done = [run_job(prepared.request_json, str(prepared.version), j) for j in half]
    assert all(r["estimated_memory"] > 0 for r in done)  # the interrupted run stops here
    resumed = prepare(build_request(**fields))
    assert resumed.status == "resume"
    assert resumed.todo == prepared.todo[len(half) :]
    rest = [run_job(resumed.request_json, str(resumed.version), j) for j in resumed.todo]
    summary = finish(resumed, rest, time.time())
    assert summary["jobs_skipped"] == len(half)
    assert_tiles_match(
        xr.open_zarr(summary["cache"]),
        source(era5_files)[["d2m"]],
        {"latitude": 20, "longitude": 40},
        edge="pad",
    )
