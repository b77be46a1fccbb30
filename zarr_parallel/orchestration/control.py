"""What a flow run coordinates with the Prefect API besides its tasks.

- :func:`in_deployment_run`: deployment runs (from the UI, the API or a schedule) pause for
  decisions; ad hoc runs (CLI, Python) never wait for a human.
- :func:`deployment_policy` / :func:`checked_request`: a deployment run's request is untrusted
  input, checked against the operator's policy before planning (:mod:`zarr_parallel.run.policy`).
- :func:`cache_slot`: a global concurrency limit of 1 per cache target, so two deployment runs
  never write one cache at once (the second waits for the first).
- :func:`decide_on_recommendations`: pause a deployment run that halted on recommendations until
  someone chooses, in the UI or through the API, to apply one, proceed as asked or cancel.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal, TypeVar, cast
from uuid import uuid4

import pydantic
from prefect import State, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists
from prefect.input import RunInput, keyset_from_paused_state
from prefect.states import Cancelled, Paused
from prefect.utilities.engine import propose_state_sync

from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run.policy import Policy, load_policy
from zarr_parallel.run.policy_checks import check_request
from zarr_parallel.run.recommend import Recommendation, recommendations_markdown
from zarr_parallel.run.steps import recommendations_message
from zarr_parallel.store.paths import resolve_paths
from zarr_parallel.units import format_duration, parse_duration

#: How often a paused run asks the API whether it was resumed (seconds).
PAUSE_POLL_SECONDS = 2
#: The server lets a pause expire this long after the run stopped waiting (see :func:`_pause`).
PAUSE_GRACE_SECONDS = 120

#: Seconds the CLI waits for a temporary local API to start (Prefect's default is 20).
TEMPORARY_API_STARTUP_SECONDS = 120

R = TypeVar("R", bound=RunInput)


@contextmanager
def temporary_api_settings(seconds: int = TEMPORARY_API_STARTUP_SECONDS) -> Iterator[None]:
    """Settings for an ad hoc run (CLI, Python API) against a temporary local Prefect API.

    With no ``PREFECT_API_URL`` Prefect starts a temporary API for the run. It waits 20 s for it
    by default, which a loaded machine can exceed (the run then failed before doing anything):
    a longer setting of the user's is kept. And flow-run heartbeats are turned off: they exist
    so a lasting API can tell a crashed run, and this API ends with the process, while every
    heartbeating flow run ends up to 1 s late (see :func:`without_flow_heartbeat`). The temporary
    server (a subprocess that inherits these settings) sends no analytics: there is no network
    here and none needed. With a ``PREFECT_API_URL`` nothing changes.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield
        return
    updates: dict[Any, Any] = {
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    if PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() < seconds:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = seconds
    with temporary_settings(updates):
        yield


@contextmanager
def without_flow_heartbeat() -> Iterator[None]:
    """Start flow runs here without Prefect's flow-run heartbeat thread.

    Prefect 3.8 sends a heartbeat every 180 s from a thread that sleeps in steps of 1 s and is
    joined when the run ends, so each heartbeating flow run ends up to 1 s after its work
    (measured: 0.6-1.8 s per cache run with its write subflow). The write subflow runs in its
    parent's process, whose own heartbeat already tells the API that this process lives.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def in_deployment_run() -> bool:
    """True inside a run created from a deployment (also in its subflows)."""
    from prefect.runtime import deployment

    try:
        return deployment.id is not None
    except Exception:  # no API reachable: not a deployment run either
        return False


def _is_deployment_run() -> bool:
    """Like :func:`in_deployment_run`, but an API that cannot answer is an error, not a "no":
    a deployment run must never go unchecked because a lookup failed."""
    from prefect.runtime import deployment

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is not None and run.deployment_id is not None:
        return True
    return deployment.id is not None


def deployment_policy() -> Policy | None:
    """The operator's policy in a deployment run; None in ad hoc runs (the local user's own).

    Read from the file the work pool's job template names (:mod:`zarr_parallel.run.policy`), or
    the closed default (only under the deployment's working directory) when there is none.
    """
    if not _is_deployment_run():
        return None
    policy = load_policy()
    get_run_logger().info("deployment run: the request is checked against %s", policy.origin)
    return policy


def checked_request(request: CacheRequest, policy: Policy | None) -> CacheRequest:
    """:func:`revalidate` the request; in a deployment run check it against ``policy`` too.

    Checked before validation (so a glob outside the allowed folders is not even listed) and
    after it (the files it matched, the cache path it resolved to).

    Raises
    ------
    RequestError
        Naming the parameter and the policy's rule; the run fails before planning.
    """
    if policy is not None:
        check_request(request, policy)
    request = revalidate(request)
    if policy is not None:
        check_request(request, policy)
    return request


def revalidate(request: CacheRequest) -> CacheRequest:
    """Validate a request as the CLI and the Python API do (idempotent).

    Deployment parameters arrive checked against the schema only: globs are expanded, relative
    paths resolved (against the working directory the deployment's pull step set) and transform
    names looked up here, on every run, so a scheduled run sees the files present *now*.
    """
    return build_request(**request.model_dump())


def slot_name(request: CacheRequest) -> str:
    """The global concurrency limit guarding this request's cache target."""
    final = resolve_paths(request).final
    slug = re.sub(r"[^a-z0-9]+", "-", final.name.lower()).strip("-")[:60]
    digest = hashlib.sha256(str(final).encode()).hexdigest()[:10]
    return f"zarr-parallel-{slug}-{digest}"


@contextmanager
def cache_slot(request: CacheRequest) -> Iterator[str | None]:
    """Hold the cache target's concurrency slot (limit 1) in deployment runs.

    Ad hoc runs do not take it: they are guarded by the cache's lock file, which refuses a second
    writer instead of queueing it. The slot's lease is renewed while held and expires if the run's
    process dies, so a crashed run cannot block the cache for ever.
    """
    if not in_deployment_run():
        yield None
        return
    name = slot_name(request)
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    get_run_logger().info("waiting for the cache's concurrency slot %s (limit 1)", name)
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        get_run_logger().info("holding %s", name)
        try:
            yield name
        finally:
            get_run_logger().info("releasing %s", name)


class RecommendationChoice(RunInput):
    """The decision that resumes a run paused on recommendations."""

    decision: Literal["apply", "proceed", "cancel"] = pydantic.Field(
        "apply",
        description=(
            "apply: use the recommendation numbered below; proceed: run as asked (source "
            "chunks are re-read); cancel: end the run, nothing is written"
        ),
    )
    recommendation: int = pydantic.Field(
        1, ge=1, description="Which recommendation to apply (1 = the best, as listed)"
    )


class ProceedOrCancel(RunInput):
    """The decision when no aligned alternative was found."""

    decision: Literal["proceed", "cancel"] = pydantic.Field(
        "proceed",
        description=(
            "No aligned alternative was found. proceed: run as asked (source chunks are "
            "re-read); cancel: end the run, nothing is written"
        ),
    )


def _choice_type(n_recommendations: int) -> type[RecommendationChoice | ProceedOrCancel]:
    """The input form for this pause: the recommendation number is limited to those listed."""
    if n_recommendations == 0:
        return ProceedOrCancel
    return pydantic.create_model(
        "RecommendationChoice",
        __base__=RecommendationChoice,
        recommendation=(
            int,
            pydantic.Field(
                1,
                ge=1,
                le=n_recommendations,
                description="Which recommendation to apply (1 = the best, as listed)",
            ),
        ),
    )


def _pause(choice_type: type[R], timeout: float) -> R | None:
    """Pause this flow run until it is resumed with input; None after ``timeout`` seconds.

    Like :func:`prefect.flow_runs.pause_flow_run`, except that the server-side expiry comes a
    grace period after this run stops waiting: the run then fails with its own message. (When
    the server's pause expires first it refuses the run's own final state and records only "The
    flow was failed and never resumed".) The server still fails the run at expiry if its process
    died while paused.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("only a flow run can pause")
    run_id = context.flow_run.id
    proposed: State[Any] = Paused(
        timeout_seconds=int(timeout) + PAUSE_GRACE_SECONDS,
        reschedule=False,
        pause_key=f"recommendations-{uuid4().hex[:12]}",
    )
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = {str(k): v for k, v in keyset.items()}
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client, proposed, flow_run_id=run_id)
        if not state.is_paused():
            raise RuntimeError(f"the run could not pause: the API answered {state}")
        choice_type.save(keyset)
        deadline = time.monotonic() + timeout
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_running():
                # Loaded synchronously here (the async variant is for async callers).
                return cast(R, choice_type.load(keyset))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(PAUSE_POLL_SECONDS, left))


def decide_on_recommendations(
    request: CacheRequest, pending: RecommendationsPending
) -> tuple[CacheRequest, Recommendation | None] | State[Any]:
    """Pause a deployment run until someone decides what to do about the recommendations.

    Outside deployment runs ``pending`` is raised again (the CLI exits with code 3). Returns the
    request to plan again (a recommendation applied, or ``recommend_changes="proceed"``) with the
    recommendation applied if any, or a Cancelled state to end the run with. A pause without a
    decision within ``pause_timeout`` ends the run as failed, saying so.
    """
    if not in_deployment_run():
        raise pending
    logger = get_run_logger()
    recs = pending.recommendations
    key = artifact_key("zp-recommendations", resolve_paths(request).final)
    timeout = parse_duration(request.pause_timeout, "pause_timeout")
    text = recommendations_message(pending.plan, recs)
    description = (
        "## The plan re-reads source chunks\n\n"
        + recommendations_markdown(pending.plan, recs)
        + "\n\nChoose **apply** (with the recommendation's number), **proceed** or **cancel**."
    )
    logger.warning(
        "pausing for a decision on %d recommendation(s) (waiting up to %s): %s",
        len(recs),
        format_duration(timeout),
        text,
    )
    choice = _pause(_choice_type(len(recs)).with_initial_data(description=description), timeout)
    if choice is None:
        message = (
            f"Paused on recommendations for {format_duration(timeout)} without a decision; "
            "nothing was written. Run again and decide sooner (pause_timeout), or set "
            "recommend_changes to 'apply' or 'proceed'.\n\n" + text
        )
        create_markdown_artifact(
            "# Pause timed out\n\n" + message.replace("\n  ", "\n- "),
            key=key,
            description="Recommendations (pause timed out)",
        )
        raise RecommendationsPending(pending.plan, recs, message)
    if choice.decision == "cancel":
        logger.info("cancelled on the recommendations; nothing was written")
        create_markdown_artifact(
            "# Cancelled on recommendations\n\nNothing was written.\n\n" + description,
            key=key,
            description="Recommendations (cancelled)",
        )
        return Cancelled(message="Cancelled on the recommendations; nothing was written")
    if choice.decision == "proceed":
        logger.info("proceeding as asked (recommend_changes='proceed')")
        return request.model_copy(update={"recommend_changes": "proceed"}), None
    assert isinstance(choice, RecommendationChoice)  # "apply" is offered only with recommendations
    chosen = recs[choice.recommendation - 1]
    logger.info("applying recommendation %d: %s", choice.recommendation, chosen.sentence)
    create_markdown_artifact(
        f"# Applied recommendation {choice.recommendation}\n\n{chosen.sentence}\n\n"
        f"In the request file:\n\n```yaml\n{chosen.request_yaml()}```\n\n"
        f"On the command line:\n\n```\n{chosen.set_options()}\n```\n\n" + description,
        key=key,
        description="Recommendations (applied)",
    )
    # The chosen changes are final: plan them as asked, without halting again.
    return request.model_copy(update={**chosen.changes, "recommend_changes": "proceed"}), chosen
