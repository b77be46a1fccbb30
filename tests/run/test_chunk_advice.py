"""Recommendations of a cheaper target chunk shape on real files (docs/design.md §3.5).

Four days of hourly maps (one HDF5 chunk per step × the 91 × 180 grid) read into time series
(96 × 8 × 8) within a tight budget (``memory_reserve``), through the xarray read path: a staged
plan then writes and reads an intermediate store, and a time chunk whose units fit one job
moves half the bytes. A staged plan reads each source chunk once, so the suggestion is listed and
never halts the run or is applied (docs/design.md §2b); a plan that re-reads halts with it among
its recommendations, and ``apply`` takes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.planning.strategy import plan_cost
from zarr_parallel.request.model import build_request
from zarr_parallel.run.recommend import recommendations_markdown
from zarr_parallel.run.steps import make_plan, prepare

TIME_SERIES = {"time": 96, "latitude": 8, "longitude": 8}


@pytest.fixture(autouse=True)
def xarray_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")


@pytest.fixture(scope="module")
def maps(era5_factory: Any) -> list[Path]:
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None)


def _request(files: list[Path], tmp_path: Path, reserve: str, **extra: Any) -> Any:
    return build_request(
        data_uri=[str(p) for p in files],
        cache_store=str(tmp_path / "c.zarr"),
        chunks=TIME_SERIES,
        deploy_mode="series",
        memory_limit="300MB",
        memory_reserve=reserve,
        **extra,
    )


def test_staged_plan_lists_a_cheaper_shape_without_halting(
    maps: list[Path], tmp_path: Path
) -> None:
    req = _request(maps, tmp_path, "290MB")  # recommend_changes: halt (the default)
    prepared = prepare(req)
    plan = prepared.plan
    assert plan.strategy == "staged" and plan.read_amplification == 1.0
    assert prepared.applied is None
    (rec,) = prepared.recommendations
    assert rec.changes == {"chunks": {"time": 24, "latitude": 8, "longitude": 8}}
    assert rec.keeps_region and rec.read_amplification == 1.0
    assert "no intermediate store" in rec.sentence and "(96 asked: 4 chunks" in rec.sentence
    # The changes are data: applied to the request they give the promised, cheaper plan.
    _, alt = make_plan(req.model_copy(update=rec.changes))
    assert alt.strategy == "direct" and not alt.stages and alt.read_amplification == 1.0
    assert rec.modelled_bytes == plan_cost(alt) and 1.5 * plan_cost(alt) <= plan_cost(plan)
    assert rec.job_memory_bytes == alt.peak_job_memory <= plan.memory_budget
    assert rec.jobs == len(alt.jobs)
    assert rec.to_json()["modelled_bytes"] == plan_cost(alt)
    # The artifact's text says the run goes on as asked.
    text = recommendations_markdown(plan, prepared.recommendations)
    assert "reads each source chunk once (staged)" in text and "goes on as asked" in text
    assert not (tmp_path / "c.zarr").exists()


def test_apply_does_not_reshape_a_staged_plan_and_proceed_looks_for_nothing(
    maps: list[Path], tmp_path: Path
) -> None:
    applied = prepare(_request(maps, tmp_path, "290MB", recommend_changes="apply"))
    assert applied.applied is None and applied.plan.strategy == "staged"
    assert applied.request.chunks == TIME_SERIES and applied.recommendations
    proceed = prepare(_request(maps, tmp_path, "290MB", recommend_changes="proceed"))
    assert proceed.recommendations == [] and proceed.plan.strategy == "staged"


def test_a_plan_that_rereads_halts_with_the_shape_and_apply_takes_it(
    maps: list[Path], tmp_path: Path
) -> None:
    """Within 25 MB a direct plan splits each unit in two (read amplification 2, kept direct:
    below STAGE_ABOVE). Longitude chunks dividing the source's do not help; a shorter time
    chunk does, and is the best recommendation."""
    req = _request(maps, tmp_path, "275MB")
    with pytest.raises(RecommendationsPending) as info:
        prepare(req)
    e = info.value
    assert e.plan.read_amplification == 2.0
    best = e.recommendations[0]
    assert set(best.changes) == {"chunks"} and best.changes["chunks"]["time"] < 96
    assert best.read_amplification == 1.0 and best.modelled_bytes
    assert "read amplification 1.00 (now 2.00)" in best.sentence
    applied = prepare(req.model_copy(update={"recommend_changes": "apply"}))
    assert applied.applied == best
    assert applied.request.chunks == best.changes["chunks"]
    assert applied.plan.read_amplification == 1.0 and applied.plan.strategy == "direct"


def test_sharded_targets_are_not_reshaped(maps: list[Path], tmp_path: Path) -> None:
    req = _request(maps, tmp_path, "290MB", shards={"time": 96, "latitude": 16, "longitude": 16})
    prepared = prepare(req)
    assert prepared.plan.strategy == "staged" and prepared.recommendations == []
