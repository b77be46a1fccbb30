"""The cache flow's heartbeat in ad hoc runs against a lasting Prefect API (docs/design.md §2b).

Prefect's flow engine sends a flow-run heartbeat (the event ``prefect.flow-run.heartbeat``, by
which a lasting server tells a crashed run from a live one) from a thread that sleeps in steps of
1 s and is joined when the run ends. Every ad hoc run against a server ended about 0.5 s late: a
stack sample of the teardown found the whole of it in that join. So a door turns Prefect's
thread off around its flow run and hands the interval to the flow body (:func:`door_heartbeat`),
whose :func:`flow_heartbeat` sends the same event at the same interval and stops at once when the
body returns. Deployment runs keep Prefect's own: the Prefect worker starts their process.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)

#: The event Prefect's flow engine sends (``prefect.flow_engine``, ``_emit_flow_run_heartbeat``).
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
#: Prefect's least interval between two heartbeats (``MINIMUM_HEARTBEAT_INTERVAL``), seconds.
MINIMUM_SECONDS = 30

_SECONDS: ContextVar[int | None] = ContextVar("zarr_parallel_flow_heartbeat", default=None)


@contextmanager
def door_heartbeat() -> Iterator[None]:
    """Around a door's flow run: Prefect's heartbeat thread off, its interval handed to the
    flow body. Nothing changes where Prefect's settings send no heartbeat (a temporary API)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    seconds = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    if seconds is None:
        yield
        return
    token = _SECONDS.set(max(int(seconds), MINIMUM_SECONDS))
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        _SECONDS.reset(token)


def heartbeat_event(flow_run: Any, flow_name: str) -> dict[str, Any]:
    """The arguments of the heartbeat event of ``flow_run``, as Prefect's flow engine sends it."""
    import prefect
    from prefect.events.related import tags_as_related_resources

    related: list[Any] = []
    if flow_run.flow_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name,
            }
        )
    if flow_run.deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    related += tags_as_related_resources(set(flow_run.tags or []))
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name or "",
        "prefect.version": prefect.__version__,
    }
    return {"event": HEARTBEAT_EVENT, "resource": resource, "related": related}


@contextmanager
def flow_heartbeat() -> Iterator[None]:
    """In the flow body: send the run's heartbeat every interval the door handed over (now,
    then each interval); stop at once when the body ends. Nothing without a door's interval."""
    from prefect.context import FlowRunContext

    seconds = _SECONDS.get()
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    if seconds is None or context is None or flow_run is None:
        yield
        return
    event = heartbeat_event(flow_run, context.flow.name if context.flow else "")
    stop = threading.Event()

    def beat() -> None:
        from prefect.events import emit_event

        while True:
            try:
                emit_event(**event)
            except Exception:  # a missed heartbeat must not fail the run
                logger.debug("could not send the flow run's heartbeat", exc_info=True)
            if stop.wait(seconds):
                return

    # In a copy of this context: the thread must see the run's settings (its PREFECT_API_URL).
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(beat,), name="zp-heartbeat", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
