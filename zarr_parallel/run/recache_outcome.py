"""What a re-cache run decides (:class:`Decision`) and the decisions made from a full plan alone.

:mod:`zarr_parallel.run.recache_decision` compares the source with the published cache; the
re-cache command answers an up-to-date cache before any flow run (docs/design.md §2b) with the
same decision, from the one shared pre-flow planning of the full request
(:func:`full_run_request`, :func:`up_to_date_decision`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.steps import Prepared
from zarr_parallel.sources.target import cached_source
from zarr_parallel.store.manifest import plan_record

Action = Literal["up_to_date", "append", "full"]


@dataclass(frozen=True)
class Decision:
    """What a re-cache run does and why."""

    action: Action
    reason: str
    cache: str
    dim: str | None = None
    old_length: int | None = None
    new_length: int | None = None
    start: int | None = None
    base_version: str | None = None
    new_files: tuple[str, ...] = ()
    checked_files: tuple[str, ...] = ()
    #: Steps some variables have and others not yet, left out until they arrive (files that
    #: hold different variables, see :mod:`zarr_parallel.sources.merge`).
    pending: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON form for artifacts, summaries and the manifest."""
        return {
            "action": self.action,
            "reason": self.reason,
            "cache": self.cache,
            "dim": self.dim,
            "old_length": self.old_length,
            "new_length": self.new_length,
            "start": self.start,
            "base_version": self.base_version,
            "new_files": list(self.new_files),
            "checked_files": list(self.checked_files),
            "pending": list(self.pending),
        }

    def markdown(self) -> str:
        """The decision as the re-cache artifact shows it."""
        title = {"up_to_date": "up to date", "append": "append", "full": "full re-cache"}
        lines = [
            f"# Re-cache: {title[self.action]}",
            "",
            f"**Why:** {self.reason}",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| cache | `{self.cache}` |",
        ]
        if self.base_version:
            lines.append(f"| published version | `{self.base_version}` |")
        if self.action == "append":
            lines += [
                f"| {self.dim} cached | {self.old_length} |",
                f"| {self.dim} in source | {self.new_length} |",
                f"| rewritten from {self.dim} index | {self.start} (whole chunks from there on; "
                "earlier chunks are reused unchanged) |",
            ]
        if self.new_files:
            lines.append(
                f"| new files | {', '.join(os.path.basename(f) for f in self.new_files)} |"
            )
        if self.checked_files:
            names = ", ".join(os.path.basename(f) for f in self.checked_files)
            lines.append(f"| changed files checked value by value | {names} |")
        lines += [f"| left out for now | {note} |" for note in self.pending]
        return "\n".join(lines)


def full_run_request(req: CacheRequest) -> CacheRequest:
    """The request as a full re-cache plans it: ``overwrite`` and ``resume`` decide how a full
    run goes, not what the cache should hold."""
    return req.model_copy(update={"overwrite": True, "resume": "auto"})


def up_to_date_decision(full: Prepared) -> Decision:
    """The decision for a full plan (of :func:`full_run_request`) found up to date."""
    current = full.paths.current()
    base = current.name if current is not None else None
    stored_request = (plan_record(current) or {}).get("request") if current is not None else None
    if stored_request and stored_request != full.request.model_dump(mode="json"):
        # Same content (store.same_content), other run settings: nothing to write.
        reason = (
            "the source and the request's content are unchanged (only how the run is "
            "executed differs, e.g. memory_limit, num_jobs or deploy_mode)"
        )
    else:
        reason = (
            f"the request and the source are unchanged (plan fingerprint "
            f"{full.plan.fingerprint[:12]} matches the published version {base})"
        )
    return Decision("up_to_date", reason, str(full.paths.final), base_version=base)


def with_pending(req: CacheRequest, decision: Decision) -> Decision:
    """``decision`` saying which steps are left out until every variable has them (files that
    hold different variables, :mod:`zarr_parallel.sources.merge`)."""
    # Opened by the decision already (the per-process cache): no second read.
    pending = cached_source(req).layout.pending if decision.base_version else ()
    if not pending:
        return decision
    reason = "; ".join([decision.reason, *pending])
    return dataclasses.replace(decision, reason=reason, pending=tuple(pending))


__all__ = ["Action", "Decision", "full_run_request", "up_to_date_decision", "with_pending"]
