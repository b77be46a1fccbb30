"""The Prefect view of a run halted on recommendations: a Cancelled-type state named
AwaitingDecision with the one-paragraph summary, one log line and no traceback, read back from the
real (session) Prefect API; a real failure stays Failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.logging.handlers import APILogHandler

from core_support import series_fields
from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.errors import RecommendationsPending, RequestError
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.orchestration.halt import AWAITING_DECISION
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.model import build_request

# era5_files: time chunks of 6 steps; this selection starts and ends inside chunks.
MID_CHUNK = [{"type": "sel", "time": ["2020-01-01T03:00", "2020-01-02T19:00"]}]


def _run_record(run_id: UUID) -> tuple[Any, list[Any], list[Any]]:
    """The flow run, its logs (its own and its task runs') and its task runs, from the API."""
    # Logs reach the API in batches: send what this process still holds first.
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = [t for t in client.read_task_runs() if t.flow_run_id == run_id]
    return run, logs, tasks


def test_halted_run_awaits_a_decision(era5_files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "halt.zarr"
    req = build_request(**series_fields(era5_files, store, preprocessors=MID_CHUNK))
    state = cache_flow(req, return_state=True)
    assert state.type == StateType.CANCELLED and state.name == AWAITING_DECISION
    # The flow's caller still gets the exception, with the recommendations as data.
    pending = state.result(raise_on_failure=False)
    assert isinstance(pending, RecommendationsPending) and pending.recommendations

    run, logs, tasks = _run_record(state.state_details.flow_run_id)
    assert run.state.type == StateType.CANCELLED and run.state.name == AWAITING_DECISION
    message = run.state.message
    assert message.startswith("Halted on recommendations; nothing was written.")
    assert "\n" not in message, "one paragraph"
    assert pending.recommendations[0].sentence in message and "recommend_changes" in message
    key = artifact_key("zp-recommendations", store)
    artifact = Artifact.get(key)
    assert artifact is not None
    assert str(artifact.id) in message or key in message, "the artifact is linked"
    assert "```yaml" in str(artifact.data) and "--set 'preprocessors=" in str(artifact.data)
    # One line says it; no traceback anywhere in the run's logs (its tasks' included).
    texts = [log.message for log in logs]
    assert sum(t.startswith("Halted on recommendations") for t in texts) == 1, texts
    assert not [t for t in texts if "Traceback" in t or "RecommendationsPending" in t], texts
    assert {t.name.split("-")[0]: t.state.type for t in tasks} == {"plan": StateType.COMPLETED}
    assert not store.exists()


def test_python_door_still_raises(era5_files: list[Path], tmp_path: Path) -> None:
    zp = ZarrParallelAssembler([str(p) for p in era5_files], preprocessors=MID_CHUNK)
    with pytest.raises(RecommendationsPending, match=r"The plan reads 1\.17x"):
        zp.cache(str(tmp_path / "c.zarr"), deploy_mode="series", progress=False)


def test_a_real_failure_stays_failed(era5_files: list[Path], tmp_path: Path) -> None:
    req = build_request(**series_fields(era5_files, tmp_path / "bad.zarr", variables=["sp"]))
    state = cache_flow(req, return_state=True)
    assert state.type == StateType.FAILED
    assert isinstance(state.result(raise_on_failure=False), RequestError)
    run, _, _ = _run_record(state.state_details.flow_run_id)
    assert run.state.type == StateType.FAILED
