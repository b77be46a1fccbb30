"""The cache flow's heartbeat in ad hoc runs against a lasting API (orchestration/heartbeat.py).

The session's Prefect API is a lasting one (tests/conftest.py): the events reach it for real.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from zarr_parallel.api import ZarrParallelAssembler
from zarr_parallel.orchestration.heartbeat import HEARTBEAT_EVENT, door_heartbeat, flow_heartbeat


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


#: What the flow body saw (a flow's parameters are copies, so not passed as one).
_SEEN: dict[str, Any] = {}


@flow
def _body() -> str:
    seen = _SEEN
    seen.clear()
    seen["prefect_interval"] = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    with flow_heartbeat():
        seen["during"] = _threads()
    seen["after"] = _threads()
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    return str(context.flow_run.id)


def _heartbeats(api: str, run_id: str) -> list[dict[str, Any]]:
    body = json.dumps(
        {
            "filter": {
                "event": {"name": [HEARTBEAT_EVENT]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            },
            "limit": 10,
        }
    ).encode()
    request = urllib.request.Request(
        f"{api}/events/filter", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return list(json.load(r)["events"])


def test_a_door_run_beats_from_its_body_and_stops_with_it(prefect_api: str) -> None:
    """Prefect's own heartbeat thread is off; the body's thread sends the same event to the API
    and is gone as soon as the body ends (no sleeping thread to join at the run's end)."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}), door_heartbeat():
        run_id = _body()
    seen = _SEEN
    assert seen["prefect_interval"] is None
    assert "zp-heartbeat" in seen["during"]
    assert "zp-heartbeat" not in seen["after"]
    deadline = time.monotonic() + 60
    while not (events := _heartbeats(prefect_api, run_id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert events, "the run's heartbeat never reached the API"
    (event,) = events
    assert event["resource"]["prefect.resource.name"]
    assert [r["prefect.resource.role"] for r in event["related"]][:1] == ["flow"]


def test_without_a_door_prefects_heartbeat_stays() -> None:
    """A deployment run (no door) keeps Prefect's own heartbeat; the body adds none."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        _body()
    seen = _SEEN
    assert seen["prefect_interval"] == 60
    assert "zp-heartbeat" not in seen["during"]


def test_a_temporary_api_gets_no_heartbeat() -> None:
    """Where Prefect's settings send none (a temporary API), the door changes nothing."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), door_heartbeat():
        _body()
    seen = _SEEN
    assert seen["prefect_interval"] is None
    assert "zp-heartbeat" not in seen["during"]


def _flow_names(api: str, since: str) -> list[str]:
    """Flow names of the heartbeats the API stored since ``since`` (ISO time)."""
    body = json.dumps(
        {
            "filter": {"event": {"name": [HEARTBEAT_EVENT]}, "occurred": {"since": since}},
            "limit": 50,
        }
    ).encode()
    request = urllib.request.Request(
        f"{api}/events/filter", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        events = json.load(r)["events"]
    return [
        str(rel.get("prefect.resource.name"))
        for e in events
        for rel in e["related"]
        if rel.get("prefect.resource.role") == "flow"
    ]


def test_an_ad_hoc_cache_run_sends_its_heartbeat_and_its_subflow_none(
    prefect_api: str, era5_factory: Any, tmp_path: Path
) -> None:
    """The Python API's run against the session's lasting API: the cache flow's body sends the
    heartbeat Prefect's thread no longer does; its write subflow sends none."""
    since = datetime.now(UTC).isoformat()
    files = era5_factory(n_files=2, steps_per_file=6, chunks=(3, 73, 144), seed=7)
    zp = ZarrParallelAssembler([str(f) for f in files], chunks={"time": 6})
    result: Any = zp.cache(
        cache_store=str(tmp_path / "c.zarr"), deploy_mode="series", progress=False
    )
    assert result.summary["flow_run"]  # a flow run, not the up-to-date answer
    deadline = time.monotonic() + 60
    while "zarr-parallel-cache" not in (names := _flow_names(prefect_api, since)):
        assert time.monotonic() < deadline, f"no cache-run heartbeat reached the API: {names}"
        time.sleep(1)
    assert "zarr-parallel-write" not in names
