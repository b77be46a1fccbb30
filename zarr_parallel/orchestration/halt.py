"""A run halted on recommendations: the recommendations artifact and the ``AwaitingDecision`` end.

Halting is an expected outcome (``recommend_changes="halt"``, the default), not a failure. An ad
hoc run (CLI, Python) that halts ends in a Cancelled-type state named ``AwaitingDecision``: the
Prefect UI shows it as a decision to make, not as a red failure, with the one-paragraph summary
as its message and a link to the recommendations artifact; the run logs one line and no
traceback. The state carries the :class:`RecommendationsPending` exception, so the flow's caller
still gets it raised (the CLI's exit 3). Deployment runs pause for the decision instead
(:func:`zarr_parallel.orchestration.control.decide_on_recommendations`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import State, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_UI_URL
from prefect.states import Cancelled

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.recommend import DECIDE, halt_reason, recommendations_markdown
from zarr_parallel.store.paths import resolve_paths

#: The name of the final state of an ad hoc run halted on recommendations (its type: Cancelled).
AWAITING_DECISION = "AwaitingDecision"


def publish_recommendations(
    final: Path, pending: RecommendationsPending, title: str = "Run halted on recommendations"
) -> UUID:
    """Publish the recommendations artifact of cache ``final``; returns the artifact's id.

    Each recommendation shows the YAML to paste into the request and the ``--set`` options.
    """
    markdown = f"# {title}\n\n" + recommendations_markdown(pending.plan, pending.recommendations)
    return UUID(
        str(
            create_markdown_artifact(
                markdown,
                key=artifact_key("zp-recommendations", final),
                description="Recommendations",
            )
        )
    )


def artifact_link(artifact_id: UUID, key: str) -> str:
    """Where the UI shows the artifact: its URL when the API has a UI, else its key."""
    ui = PREFECT_UI_URL.value()
    if ui:
        return f"{str(ui).rstrip('/')}/artifacts/artifact/{artifact_id}"
    return f"the artifact {key!r}"


def decision_summary(pending: RecommendationsPending, link: str) -> str:
    """The one paragraph an ``AwaitingDecision`` state says: why, the best change, what to do."""
    recs = pending.recommendations
    best = (
        f" {len(recs)} recommendation{'s' if len(recs) != 1 else ''}; the best: {recs[0].sentence}."
        if recs
        else " No aligned alternative was found."
    )
    return (
        f"Halted on recommendations; nothing was written. {halt_reason(pending.plan)}{best} "
        f"{DECIDE} Recommendations (the YAML and --set line of each): {link}."
    )


def awaiting_decision(request: CacheRequest, pending: RecommendationsPending) -> State[Any]:
    """End an ad hoc run halted on recommendations: publish, log one line, return the state.

    The returned ``Cancelled`` state, named :data:`AWAITING_DECISION`, holds ``pending``: a flow
    that returns it ends in that state, and its caller gets ``pending`` raised.
    """
    final = resolve_paths(request).final
    artifact_id = publish_recommendations(final, pending)
    link = artifact_link(artifact_id, artifact_key("zp-recommendations", final))
    summary = decision_summary(pending, link)
    get_run_logger().info("%s", summary)
    return Cancelled(name=AWAITING_DECISION, message=summary, data=pending)


__all__ = [
    "AWAITING_DECISION",
    "artifact_link",
    "awaiting_decision",
    "decision_summary",
    "publish_recommendations",
]
