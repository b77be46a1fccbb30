"""Recommendations: request changes that lower the read amplification (docs/design.md §3.5)."""

from __future__ import annotations

import copy
import json
import logging
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
import yaml

from zarr_parallel.errors import ZarrParallelError
from zarr_parallel.planning.plan import Plan
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.source import Source
from zarr_parallel.sources.target import INDEX_PREFIX, Target, indexed_source
from zarr_parallel.transforms.registry import apply_transforms
from zarr_parallel.transforms.tile_candidates import tile_candidates
from zarr_parallel.units import format_bytes

logger = logging.getLogger(__name__)

#: A candidate change: (request fields, sentence, keeps the requested region, magnitude).
Candidate = tuple[dict[str, Any], str, bool, int]


@dataclass(frozen=True)
class Recommendation:
    """One alternative request, appliable as data (``changes`` are request fields)."""

    changes: dict[str, Any]
    read_amplification: float
    job_memory_bytes: int
    sentence: str
    keeps_region: bool = True
    magnitude: int = 0
    jobs: int = field(default=0)
    #: The changed request's modelled bytes through storage (planning.strategy.plan_cost), when
    #: the recommendation is made for them (a cheaper target chunk shape); 0 otherwise.
    modelled_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form for artifacts and the CLI."""
        out = {
            "changes": self.changes,
            "read_amplification": round(self.read_amplification, 4),
            "job_memory_bytes": self.job_memory_bytes,
            "jobs": self.jobs,
            "keeps_region": self.keeps_region,
            "sentence": self.sentence,
        }
        if self.modelled_bytes:
            out["modelled_bytes"] = self.modelled_bytes
        return out

    def request_yaml(self) -> str:
        """The changes as the YAML lines a user pastes into the request file (block style)."""
        return changes_yaml(self.changes)

    def set_options(self) -> str:
        """The changes as ``--set`` options for the command line, quoted for a POSIX shell."""
        return set_options(self.changes)


class _QuotingDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, with double quotes where a scalar must be quoted.

    A ``--set`` value goes inside the shell's single quotes; YAML's own single quotes there would
    have to be written as ``'"'"'``.
    """

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        return '"' if style == "'" else style


def _plain(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The changes as plain JSON data (lists for tuples, Python numbers for numpy's)."""
    return dict(json.loads(json.dumps(dict(changes), default=_label)))


def changes_yaml(changes: Mapping[str, Any]) -> str:
    """Request fields as block-style YAML, the keys in the order given.

    >>> print(changes_yaml({"chunks": {"time": 48, "latitude": 180}}), end="")
    chunks:
      time: 48
      latitude: 180
    """
    text = yaml.dump(
        _plain(changes),
        Dumper=_QuotingDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
    )
    return str(text)


def set_options(changes: Mapping[str, Any]) -> str:
    """Request fields as the command line's ``--set KEY=VALUE`` options (one per field).

    Each value is one line of flow-style YAML (what ``--set`` parses), quoted for the shell.

    >>> set_options({"chunks": {"time": 48}})
    "--set 'chunks={time: 48}'"
    """
    options = []
    for key, value in _plain(changes).items():
        flow = yaml.dump(
            value,
            Dumper=_QuotingDumper,
            default_flow_style=True,
            sort_keys=False,
            width=float("inf"),
            allow_unicode=True,
        ).strip()
        flow = flow.removesuffix("\n...").strip()  # a bare scalar ends with a document end
        options.append(f"--set {shlex.quote(f'{key}={flow}')}")
    return " ".join(options)


def recommendations_text(plan: Plan, recs: Sequence[Recommendation]) -> str:
    """The text of a run halted on recommendations (the CLI prints it; the exception says it).

    Each recommendation shows its figures, the YAML to put in the request and the ``--set``
    options for the command line.
    """
    lines = [lead_sentence(plan)]
    if recs:
        lines.append("Recommendations, best first:")
        for i, r in enumerate(recs):
            lines.append(f"  {i + 1}. {r.sentence}")
            lines.append("     in the request file:")
            lines += [f"       {line}" for line in r.request_yaml().splitlines()]
            lines.append(f"     on the command line: {r.set_options()}")
    else:
        lines.append("No aligned alternative was found.")
    lines.append(decide_sentence(plan))
    return "\n".join(lines)


def recommendations_markdown(plan: Plan, recs: Sequence[Recommendation]) -> str:
    """:func:`recommendations_text` as Markdown (the Prefect UI's recommendations artifact)."""
    parts = [lead_sentence(plan)]
    if not recs:
        parts.append("No aligned alternative was found.")
    for i, r in enumerate(recs):
        parts.append(
            f"### {i + 1}. {r.sentence}\n\nIn the request file:\n\n```yaml\n{r.request_yaml()}```"
            f"\n\nOn the command line:\n\n```\n{r.set_options()}\n```"
        )
    parts.append(decide_sentence(plan))
    return "\n\n".join(parts)


def halt_reason(plan: Plan) -> str:
    """Why a plan halts on recommendations, in one sentence with its figures."""
    return (
        f"The plan reads {plan.read_amplification:.2f}x the source bytes it needs "
        f"({format_bytes(plan.read_bytes)} read for {format_bytes(plan.needed_bytes)}): the "
        "selection, the target chunks or the tiles cut source chunks."
    )


#: What the user can do about recommendations.
DECIDE = (
    "Apply one (recommend_changes='apply' takes the first), change the request, or run as "
    "asked with recommend_changes='proceed'."
)
#: What the user can do about suggestions beside a plan that does not halt.
SUGGESTED = (
    "The run goes on as asked (recommend_changes acts only on plans that re-read the source); "
    "to take one, change the request as shown."
)


def halts_on_recommendations(plan: Plan) -> bool:
    """Whether ``plan`` halts a ``recommend_changes='halt'`` run: it re-reads source chunks.

    A staged plan reads each source chunk once, so it does not halt by itself (docs/design.md
    §2b); recommendations beside it (a cheaper target chunk shape) are listed only.
    """
    return plan.read_amplification > 1.0 + 1e-9


def lead_sentence(plan: Plan) -> str:
    """The first sentence above recommendations: why the run halts, or that it does not."""
    if halts_on_recommendations(plan):
        return halt_reason(plan)
    return (
        f"The plan reads each source chunk once ({plan.strategy}); a different target chunk "
        "shape makes a clearly cheaper plan by the planner's cost model (bytes through storage)."
    )


def decide_sentence(plan: Plan) -> str:
    """The last sentence below recommendations: what the user can do."""
    return DECIDE if halts_on_recommendations(plan) else SUGGESTED


Replanner = Callable[[CacheRequest], tuple[Target, Plan]]


def recommend(
    req: CacheRequest,
    source: Source,
    target: Target,
    plan: Plan,
    replan: Replanner,
    extra: Sequence[Recommendation] = (),
) -> list[Recommendation]:
    """Alternatives to ``req`` with lower read amplification, best first.

    Best = lowest read amplification, then keeping the requested region, then least change.
    ``extra`` are recommendations made elsewhere (a cheaper target chunk shape,
    :mod:`zarr_parallel.run.chunk_advice`), ranked with these; a change found both ways is
    listed once.
    """
    candidates: list[Candidate] = []
    candidates += _selection_candidates(req, source, target)
    candidates += _chunk_candidates(req, target, plan)
    candidates += tile_candidates(req, target)
    out: list[Recommendation] = []
    seen: set[str] = set()
    for changes, sentence, keeps, magnitude in candidates:
        key = _key(changes)
        if key in seen:
            continue
        seen.add(key)
        trial = req.model_copy(update=copy.deepcopy(changes))
        try:
            _, alt = replan(trial)
        except ZarrParallelError as e:
            logger.debug("candidate %s rejected: %s", changes, e)
            continue
        if alt.read_amplification >= plan.read_amplification - 1e-9:
            continue
        out.append(
            Recommendation(
                changes,
                alt.read_amplification,
                alt.max_job_memory,
                f"{sentence}: read amplification {alt.read_amplification:.2f} "
                f"(now {plan.read_amplification:.2f}), {len(alt.jobs)} job"
                f"{'s' if len(alt.jobs) != 1 else ''} of at most "
                f"{alt.max_job_memory / 1e6:.0f} MB",
                keeps,
                magnitude,
                len(alt.jobs),
            )
        )
    listed = {_key(r.changes) for r in out}
    out += [r for r in extra if _key(r.changes) not in listed]
    out.sort(key=lambda r: (round(r.read_amplification, 4), not r.keeps_region, r.magnitude))
    return out


def _key(changes: Mapping[str, Any]) -> str:
    """One key per change, whatever the order of its fields."""
    return repr(sorted(changes.items(), key=lambda kv: kv[0]))


def _selection_candidates(req: CacheRequest, source: Source, target: Target) -> list[Candidate]:
    """Move the start and end of 2-item ``sel``/``isel`` slices to source chunk boundaries.

    Each candidate is written in the terms the selection sees: the data after the preprocessors
    before it (so a selection after a ``reverse`` gets its ends in the reversed order), with
    labels for ``sel`` and positions for ``isel``.
    """
    out: list[Candidate] = []
    indexed = indexed_source(req, source)
    # A tiled target's selections are judged on the data before tiling.
    final = target.tiling.base if target.tiling is not None else target.dataset
    for i, spec in enumerate(req.preprocessors):
        kind = {"sel": "sel", "subset": "sel", "isel": "isel"}.get(str(spec.get("type")))
        if kind is None:
            continue
        before: xr.Dataset | None = None
        for dim, value in spec.items():
            if dim == "type" or not isinstance(value, list | tuple) or len(value) != 2:
                continue
            if before is None:
                before = apply_transforms(indexed, req.preprocessors[:i], "preprocessors")
            out += _moved_ends(req, source, (final, before), (i, kind, dim))
    return out


def _moved_ends(
    req: CacheRequest,
    source: Source,
    data: tuple[xr.Dataset, xr.Dataset],
    where: tuple[int, str, Any],
) -> list[Candidate]:
    """The selection ``preprocessors[i][dim]`` widened and narrowed to source chunk boundaries.

    ``data`` holds the target's data (``final``) and the data the selection applies to
    (``before``); ``where`` is ``(i, kind, dim)``.
    """
    final, before = data
    i, kind, dim = where
    coord = _index_coord(before, dim)
    if coord is None or coord not in final.coords or final[coord].ndim != 1:
        return []
    kept = np.sort(np.asarray(final[coord].values, dtype=np.int64))
    if kept.size == 0 or not np.all(np.diff(kept) == 1):
        return []
    bounds = _source_bounds(source, coord[len(INDEX_PREFIX) :])
    if bounds is None:
        return []
    a, b = int(kept[0]), int(kept[-1]) + 1
    lo = int(bounds[np.searchsorted(bounds, a, side="right") - 1])
    hi = int(bounds[np.searchsorted(bounds, b, side="left")])
    inner_lo = int(bounds[np.searchsorted(bounds, a, side="left")])
    inner_hi = int(bounds[np.searchsorted(bounds, b, side="right") - 1])
    position_source = np.asarray(before[coord].values, dtype=np.int64)
    out: list[Candidate] = []
    for new_a, new_b, keeps, verb in (
        (lo, hi, True, "widen"),
        (inner_lo, inner_hi, False, "narrow"),
    ):
        if (new_a, new_b) == (a, b) or new_b <= new_a:
            continue
        new_value = _selection_value(before, position_source, (new_a, new_b), kind, dim)
        if new_value is None:
            continue
        pre = copy.deepcopy(req.preprocessors)
        pre[i][dim] = new_value
        out.append(
            (
                {"preprocessors": pre},
                f"{verb} preprocessors[{i}].{dim} to {new_value} (source chunk boundaries)",
                keeps,
                abs(new_a - a) + abs(new_b - b),
            )
        )
    return out


def _selection_value(
    before: xr.Dataset, position_source: np.ndarray, new: tuple[int, int], kind: str, dim: Any
) -> list[Any] | None:
    """The selection's new value for source positions ``new`` (labels for ``sel``, positions
    for ``isel``), or None when it cannot be written as one slice."""
    new_a, new_b = new
    positions = np.flatnonzero((position_source >= new_a) & (position_source < new_b))
    if positions.size != new_b - new_a or not np.all(np.diff(positions) == 1):
        return None  # not one run of positions where the selection applies
    first, last = int(positions[0]), int(positions[-1])
    if kind == "isel":
        return [first, last + 1]
    if dim in before.coords:
        labels = before[dim].values
        return [_label(labels[first]), _label(labels[last])]
    return None


def _index_coord(ds: xr.Dataset, dim: str) -> str | None:
    """The index coordinate along ``dim`` (named after the source dimension)."""
    for name, c in ds.coords.items():
        if str(name).startswith(INDEX_PREFIX) and c.dims == (dim,):
            return str(name)
    return None


def _label(value: Any) -> Any:
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s"))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _source_bounds(source: Source, dim: str) -> np.ndarray | None:
    for vl in source.layout.variables.values():
        if dim in vl.dims:
            return np.asarray(vl.boundaries[vl.dims.index(dim)], dtype=np.int64)
    return None


def _chunk_candidates(req: CacheRequest, target: Target, plan: Plan) -> list[Candidate]:
    """Target chunks that are multiples or divisors of the source chunks along split dims."""
    out: list[Candidate] = []
    split = {d for g in plan.groups for d in g.split_dims}
    if not split:
        return out
    current = {d: c for per in target.chunks.values() for d, c in per.items()}
    src_chunk: dict[str, int] = {}
    for arr in target.array_inputs():
        for ax in arr.axes:
            if ax.dim in split and ax.chunk_len.size:
                src_chunk[ax.dim] = int(ax.chunk_len.max())
    base = {} if req.chunks == "auto" else dict(req.chunks)
    for dim, s in src_chunk.items():
        want = current.get(dim, s)
        options = (
            {s * max(1, want // s), s * max(1, -(-want // s))}
            if want >= s
            else {d for d in range(1, s + 1) if s % d == 0 and d <= want}
        )
        if want < s:
            options = {max(options)} if options else set()
            options.add(s)
        for size in sorted(options):
            if size == want:
                continue
            chunks = {**base, dim: size}
            out.append(
                (
                    {"chunks": chunks},
                    f"set chunks['{dim}'] to {size} (source chunk {s} along {dim})",
                    True,
                    abs(size - want),
                )
            )
    return out
