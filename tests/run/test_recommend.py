"""Recommendations on real files: a selection that starts and ends inside source chunks, and
target chunks whose units do not fit the budget (docs/design.md §3.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import make_plan, prepare

# era5_files: time chunks of 6 steps from 2020-01-01T00; steps 3..43 cut chunks 0 and 7.
MID_CHUNK = [{"type": "sel", "time": ["2020-01-01T03:00", "2020-01-02T19:00"]}]


def _request(files: list[Path], tmp_path: Path, **fields: Any) -> Any:
    return build_request(
        data_uri=[str(p) for p in files],
        cache_store=str(tmp_path / "cache.zarr"),
        deploy_mode="series",
        **fields,
    )


def test_mid_chunk_selection_halts_with_widen_and_narrow(
    era5_files: list[Path], tmp_path: Path
) -> None:
    req = _request(era5_files, tmp_path, preprocessors=MID_CHUNK, chunks={"time": 41})
    with pytest.raises(RecommendationsPending) as info:
        prepare(req)
    e = info.value
    # 41 steps need 48 read along time (chunks 0..7 of 6 steps).
    assert e.plan.read_amplification == pytest.approx(48 / 41)
    assert "1.17x" in str(e)
    assert len(e.recommendations) >= 2
    widen, narrow = e.recommendations[0], e.recommendations[1]
    # Best first: both reach 1.00, the one keeping the requested region comes first.
    assert widen.keeps_region and not narrow.keeps_region
    assert widen.changes == {
        "preprocessors": [{"type": "sel", "time": ["2020-01-01T00:00:00", "2020-01-02T23:00:00"]}]
    }
    assert narrow.changes == {
        "preprocessors": [{"type": "sel", "time": ["2020-01-01T06:00:00", "2020-01-02T17:00:00"]}]
    }
    for rec in (widen, narrow):
        assert rec.read_amplification == 1.0
        assert rec.job_memory_bytes > 0
        assert "read amplification 1.00 (now 1.17)" in rec.sentence
        # The changes are data: applied to the request, they give the promised plan.
        _, plan = make_plan(req.model_copy(update=rec.changes))
        assert plan.read_amplification == 1.0
        assert plan.max_job_memory == rec.job_memory_bytes
    assert MID_CHUNK[0]["time"] == ["2020-01-01T03:00", "2020-01-02T19:00"], "not mutated"
    assert not (tmp_path / "cache.zarr").exists() and list(tmp_path.iterdir()) == []


def test_descending_latitude_selection_recommendation(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Latitude 90 → -90 in chunks of 40 rows: [60, -30] cuts both chunks; the fix keeps the
    descending order the data has."""
    pre = [{"type": "sel", "latitude": [60, -30]}]
    req = _request(era5_files, tmp_path, preprocessors=pre, chunks={"latitude": 10})
    with pytest.raises(RecommendationsPending) as info:
        prepare(req)
    best = info.value.recommendations[0]
    assert best.changes == {"preprocessors": [{"type": "sel", "latitude": [90.0, -90.0]}]}
    assert best.read_amplification == 1.0


def test_apply_takes_the_best(era5_files: list[Path], tmp_path: Path) -> None:
    req = _request(
        era5_files,
        tmp_path,
        preprocessors=MID_CHUNK,
        chunks={"time": 41},
        recommend_changes="apply",
    )
    prepared = prepare(req)
    assert prepared.applied is not None and prepared.applied.keeps_region
    assert prepared.plan.read_amplification == 1.0
    assert prepared.request.preprocessors[0]["time"] == [
        "2020-01-01T00:00:00",
        "2020-01-02T23:00:00",
    ]


def test_proceed_keeps_the_request(era5_files: list[Path], tmp_path: Path) -> None:
    req = _request(
        era5_files, tmp_path, preprocessors=MID_CHUNK, chunks={"time": 41}, recommend_changes=False
    )
    prepared = prepare(req)
    assert prepared.applied is None and prepared.recommendations == []
    assert prepared.plan.read_amplification == pytest.approx(48 / 41)


def test_target_chunk_recommendation(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Target chunks of 4 steps on source chunks of 6: units of 12 steps. In a budget too small
    for a unit, jobs are cut at target chunks and re-read source chunks; target chunks that
    divide the source chunk (3) or equal it (6) read each chunk once."""
    # Under the xarray path's memory model (the fast path streams slabs: the unit fits).
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    req = _request(
        era5_files,
        tmp_path,
        chunks={"time": 4, "latitude": 73, "longitude": 144},
        variables=["t2m"],
        memory_limit="3MB",
        memory_reserve="1MB",
    )
    with pytest.raises(RecommendationsPending) as info:
        prepare(req)
    e = info.value
    assert e.plan.read_amplification > 1.0
    assert any("exceed the memory budget" in n for n in e.plan.notes)
    suggested = [r.changes["chunks"] for r in e.recommendations if "chunks" in r.changes]
    assert {"time": 3, "latitude": 73, "longitude": 144} in suggested
    assert {"time": 6, "latitude": 73, "longitude": 144} in suggested
    assert all(r.read_amplification == 1.0 for r in e.recommendations)
    # Closest to what was asked first.
    assert e.recommendations[0].changes["chunks"]["time"] == 3


def test_python_door_raises_and_publishes(era5_files: list[Path], tmp_path: Path) -> None:
    """Through ZarrParallelAssembler: RecommendationsPending with the recommendations as data,
    a keyed markdown artifact in the Prefect API, and nothing written; then apply."""
    from prefect.artifacts import Artifact

    from zarr_parallel import ZarrParallelAssembler
    from zarr_parallel.orchestration.tasks import artifact_key

    zp = ZarrParallelAssembler(
        [str(p) for p in era5_files], preprocessors=MID_CHUNK, variables=["t2m"], cache_label="_r"
    )
    with pytest.raises(RecommendationsPending) as info:
        zp.cache(cache_dir=str(tmp_path / "c"), deploy_mode="series")
    recs = info.value.recommendations
    assert isinstance(info.value, ValueError)
    assert [r.read_amplification for r in recs[:2]] == [1.0, 1.0]
    assert all(isinstance(r.changes, dict) and r.job_memory_bytes > 0 and r.sentence for r in recs)
    assert not (tmp_path / "c").exists()
    final = tmp_path / "c" / "era5_like_r.zarr"
    art = Artifact.get(artifact_key("zp-recommendations", final))
    assert art is not None and recs[0].sentence.split(":")[0] in str(art.data)

    result = zp.cache(
        cache_dir=str(tmp_path / "c"), deploy_mode="series", recommend_changes="apply"
    )
    assert result.summary["read_amplification"] == 1.0
    assert result.summary["applied_recommendation"]["changes"] == recs[0].changes
