"""Draw the design page's diagrams as plain SVG: ``python scripts/draw_house.py``.

Writes, deterministically (the same code gives the same bytes), with no graphviz, network or
JavaScript, so the docs render offline:

``docs/img/house.svg``
    The rooms of the package with their modules, read from the code with :mod:`ast`, and an
    arrow from each room to every room it imports, with the number of importing module pairs.
    Imports of a higher room (which the house forbids, see ``tests/test_house.py``) are drawn in
    red on the left.
``docs/img/request-flow.svg``
    The data flow of one request through the three doors, drawn from :data:`FLOW` below.

Run it again whenever modules move or imports change (the house picture is only as true as its
last run). ``--check`` exits 1 when a picture differs from what the code gives now.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"

# The rooms, bottom up: the one definition (tests/test_house.py checks the code against it).
ROOMS = (
    "base",
    "planning",
    "transforms",
    "request",
    "sources",
    "store",
    "run",
    "orchestration",
    "doors",
)
BASE_MODULES = frozenset(
    {"errors", "units", "logs", "faults", "names", "examples", "version", "buffers"}
)
DOOR_MODULES = frozenset(
    {"api", "assembler", "cli", "__init__", "__main__", "flows", "deployments"}
)
PROJECT = ("zarr_parallel", "flows", "deployments")
ROOM_NOTES = {
    "base": "errors, units, logs, names, buffers, test faults",
    "planning": "pure arithmetic, no I/O",
    "transforms": "the transform registry, tiles",
    "request": "the one validated request",
    "sources": "open, layout, identity, fast read",
    "store": "versions, manifest, lock, readers",
    "run": "the steps of a run, one job",
    "orchestration": "Prefect flows, tasks, runners",
    "doors": "Python, command line, deployments",
}

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
INK = "#1f2933"
MUTED = "#52606d"
DOWN = "#3e6fb0"
UP = "#c0392b"
ROOM_FILL = ("#f4f7fb", "#eef3f8")


# --- reading the code ----------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in PROJECT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # a virtual environment or cache inside the folder is not the project
            found[module_name(path)] = path
    return dict(sorted(found.items()))


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("flows", "deployments"):
        return "doors"
    if parts[0] != "zarr_parallel":
        return None
    if len(parts) == 1 or parts[1] in DOOR_MODULES:
        return "doors"
    if parts[1] in ROOMS[1:-1]:
        return parts[1]
    if len(parts) == 2 and parts[1] in BASE_MODULES:
        return "base"
    return None


def owner(name: str, known: dict[str, Path]) -> str | None:
    """The longest dotted prefix of ``name`` that is a known module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every project module ``module`` imports (top level or in a function)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [owner(alias.name, known) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                package = (
                    module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                )
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([source] if source else [])])
            names = [
                f"{source}.{alias.name}"
                if f"{source}.{alias.name}" in known
                else owner(source, known)
                for alias in node.names
            ]
        else:
            continue
        yield from (name for name in names if name is not None and name != module)


def _shown(module: str, path: Path) -> bool:
    """A package's ``__init__`` is shown only when it holds more than a docstring."""
    if path.name != "__init__.py" or module == "zarr_parallel":
        return True
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def chip_name(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("flows", "deployments"):
        return "/".join(parts) + "/" if len(parts) == 1 else "/".join(parts)
    if len(parts) == 1:
        return "__init__"
    if parts[1] in ROOMS[1:-1]:
        return ".".join(parts[2:]) or "__init__"
    return ".".join(parts[1:])


@dataclass(frozen=True)
class House:
    rooms: dict[str, list[str]]  # room -> chips
    pairs: Counter[tuple[str, str]]  # (importing room, imported room) -> module pairs
    internal: Counter[str]  # room -> module pairs inside it
    lost: list[str]  # modules in no room


def read_house() -> House:
    known = project_modules()
    rooms: dict[str, list[str]] = {room: [] for room in ROOMS}
    lost = []
    edges: set[tuple[str, str]] = set()
    for module, path in known.items():
        room = room_of(module)
        if room is None:
            lost.append(module)
            continue
        if _shown(module, path):
            rooms[room].append(chip_name(module))
        edges.update((module, target) for target in imported_modules(module, path, known))
    pairs: Counter[tuple[str, str]] = Counter()
    internal: Counter[str] = Counter()
    for a, b in sorted(edges):
        ra, rb = room_of(a), room_of(b)
        if ra is None or rb is None:
            continue
        if ra == rb:
            internal[ra] += 1
        else:
            pairs[ra, rb] += 1
    return House({r: sorted(c, key=_chip_order) for r, c in rooms.items()}, pairs, internal, lost)


def _chip_order(chip: str) -> tuple[int, str]:
    return (1 if chip.startswith(("flows", "deployments")) else 0, chip)


# --- SVG helpers ---------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def text(
    x: float,
    y: float,
    s: str,
    size: float = 12,
    anchor: str = "start",
    weight: str = "normal",
    fill: str = INK,
    family: str = FONT,
) -> str:
    return (
        f'<text x="{_num(x)}" y="{_num(y)}" font-family="{family}" font-size="{_num(size)}" '
        f'font-weight="{weight}" text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>'
    )


def rect(
    x: float, y: float, w: float, h: float, fill: str, stroke: str, rx: float = 4, extra: str = ""
) -> str:
    return (
        f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" rx="{_num(rx)}" '
        f'fill="{fill}" stroke="{stroke}"{extra}/>'
    )


def svg(width: float, height: float, title: str, body: list[str]) -> str:
    markers = "".join(
        f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{colour}"/></marker>'
        for name, colour in (("down", DOWN), ("up", UP), ("ink", INK))
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" '
            f'height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}" '
            f'role="img" aria-label="{escape(title)}">',
            f"<title>{escape(title)}</title>",
            f"<defs>{markers}</defs>",
            f'<rect width="{_num(width)}" height="{_num(height)}" fill="#ffffff"/>',
            *body,
            "</svg>",
            "",
        ]
    )


def _text_width(s: str, size: float, mono: bool = False) -> float:
    return len(s) * size * (0.62 if mono else 0.58)


# --- the house -----------------------------------------------------------------------------------

CHIP_H, CHIP_GAP, CHIP_SIZE = 20.0, 6.0, 11.0
LABEL_W, CHIPS_W, PAD, LANE = 200.0, 470.0, 10.0, 24.0


def _lanes(arcs: Sequence[tuple[int, int]]) -> list[int]:
    """A lane per arc (top, bottom band index) so that arcs of one lane never overlap."""
    order = sorted(range(len(arcs)), key=lambda i: (arcs[i][1] - arcs[i][0], arcs[i]))
    taken: dict[int, list[tuple[int, int]]] = defaultdict(list)
    lanes = [0] * len(arcs)
    for i in order:
        top, bottom = arcs[i]
        lane = 0
        while any(top < b and t < bottom for t, b in taken[lane]):
            lane += 1
        taken[lane].append((top, bottom))
        lanes[i] = lane
    return lanes


def _chip_rows(chips: Sequence[str]) -> list[list[tuple[str, float]]]:
    rows: list[list[tuple[str, float]]] = [[]]
    used = 0.0
    for chip in chips:
        w = _text_width(chip, CHIP_SIZE, mono=True) + 14
        if rows[-1] and used + w > CHIPS_W:
            rows.append([])
            used = 0.0
        rows[-1].append((chip, w))
        used += w + CHIP_GAP
    return rows


@dataclass(frozen=True)
class Arc:
    """An arrow between two rooms: drawn on the right (down the house) or the left (up)."""

    source: str
    target: str
    count: int
    lane: int
    side: str  # "right" or "left"

    @property
    def key(self) -> str:
        return f"{self.side}:{self.source}>{self.target}"


def _arcs(house: House, band: dict[str, int]) -> list[Arc]:
    arcs: list[Arc] = []
    for side, sign in (("right", 1), ("left", -1)):  # right: the imported room is lower
        pairs = sorted((a, b) for a, b in house.pairs if (band[b] - band[a]) * sign > 0)
        spans = [tuple(sorted((band[a], band[b]))) for a, b in pairs]
        lanes = _lanes([(top, bottom) for top, bottom in spans])
        arcs += [
            Arc(a, b, house.pairs[a, b], lane, side)
            for (a, b), lane in zip(pairs, lanes, strict=True)
        ]
    return arcs


def _draw_rooms(
    house: House, x0: float, band_w: float, body: list[str]
) -> tuple[dict[str, tuple[float, float]], float]:
    """The room bands, top down; returns each room's (top, height) and the bottom."""
    geometry: dict[str, tuple[float, float]] = {}
    y = 56.0
    for i, room in enumerate(reversed(ROOMS)):
        rows = _chip_rows(house.rooms[room])
        chips_h = len(rows) * (CHIP_H + CHIP_GAP) - CHIP_GAP
        h = max(54.0, chips_h + 2 * PAD)
        geometry[room] = (y, h)
        body.append(rect(x0, y, band_w, h, ROOM_FILL[i % 2], "#9aa5b1", 6))
        body.append(text(x0 + PAD, y + 19, room, 13, weight="bold"))
        body.append(text(x0 + PAD, y + 34, ROOM_NOTES[room], 9.5, fill=MUTED))
        if house.internal[room]:
            inside = f"{house.internal[room]} imports inside"
            body.append(text(x0 + PAD, y + 46, inside, 9.5, fill=MUTED))
        cy = y + (h - chips_h) / 2
        for row in rows:
            cx = x0 + LABEL_W
            for chip, w in row:
                body.append(rect(cx, cy, w, CHIP_H, "#ffffff", "#7b8794", 3))
                body.append(text(cx + w / 2, cy + 14, chip, CHIP_SIZE, "middle", family=MONO))
                cx += w + CHIP_GAP
            cy += CHIP_H + CHIP_GAP
        y += h + 8
    return geometry, y


def _attach_points(
    arcs: Sequence[Arc], band: dict[str, int], geometry: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Where each arc meets its upper and its lower room.

    Spread over the band's height and ordered so that nested arcs do not cross: arriving arcs
    above leaving ones, outer lanes further out.
    """
    ends: dict[tuple[str, str], list[tuple[tuple[int, int], str, int]]] = defaultdict(list)
    for arc in arcs:
        upper, lower = sorted((arc.source, arc.target), key=band.__getitem__)
        ends[arc.side, upper].append(((1, -arc.lane), arc.key, 0))
        ends[arc.side, lower].append(((0, arc.lane), arc.key, 1))
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (_, room), items in ends.items():
        top, height = geometry[room]
        for k, (_, key, which) in enumerate(sorted(items)):
            found[key][which] = top + height * (k + 1) / (len(items) + 1)
    return {key: (ys[0], ys[1]) for key, ys in found.items()}


def _draw_arc(arc: Arc, edge: float, ends: tuple[float, float], body: list[str]) -> None:
    right = arc.side == "right"
    colour = DOWN if right else UP
    lane_x = edge + (PAD + (arc.lane + 0.5) * LANE) * (1 if right else -1)
    # Down the house the arrow goes from the upper room to the lower; up it, the other way.
    y_from, y_to = ends if right else (ends[1], ends[0])
    dash = "" if right else ' stroke-dasharray="5 3"'
    body.append(
        f'<path d="M{_num(edge)},{_num(y_from)} H{_num(lane_x)} V{_num(y_to)} '
        f'H{_num(edge + (2 if right else -2))}" fill="none" stroke="{colour}" '
        f'stroke-width="1.4"{dash} marker-end="url(#arrow-{"down" if right else "up"})"/>'
    )
    mid = (y_from + y_to) / 2
    body.append(
        f'<circle cx="{_num(lane_x)}" cy="{_num(mid)}" r="8" fill="#ffffff" stroke="{colour}"/>'
    )
    body.append(text(lane_x, mid + 3.5, str(arc.count), 9.5, "middle", "bold", colour))


def draw_house(house: House) -> str:
    """The house: rooms top down (doors first, so imports point down the page), with arcs."""
    band = {room: i for i, room in enumerate(reversed(ROOMS))}
    arcs = _arcs(house, band)
    lanes = {
        side: max((a.lane + 1 for a in arcs if a.side == side), default=0)
        for side in ("left", "right")
    }
    x0 = PAD + (lanes["left"] * LANE + 2 * PAD if lanes["left"] else 0)
    band_w = LABEL_W + CHIPS_W + 2 * PAD
    body: list[str] = [
        text(PAD, 24, "zarr_parallel: rooms and the direction of imports", 16, weight="bold"),
        text(PAD, 42, SUBTITLE, 11, fill=MUTED),
    ]
    geometry, bottom = _draw_rooms(house, x0, band_w, body)
    ends = _attach_points(arcs, band, geometry)
    for arc in arcs:
        _draw_arc(arc, x0 + band_w if arc.side == "right" else x0, ends[arc.key], body)
    upward = sum(a.count for a in arcs if a.side == "left")
    body.append(text(PAD, bottom + 16, LEGEND, 10.5, fill=MUTED))
    body.append(
        text(PAD, bottom + 32, UPWARD.format(upward), 10.5, fill=UP)
        if upward
        else text(PAD, bottom + 32, "No room imports a higher room.", 10.5, fill=MUTED)
    )
    height = bottom + 44
    if house.lost:
        body.append(text(PAD, height, "In no room: " + ", ".join(house.lost), 10.5, fill=UP))
        height += 16
    width = x0 + band_w + (lanes["right"] * LANE + 2 * PAD if lanes["right"] else PAD)
    return svg(max(width, 760.0), height, "zarr_parallel's rooms and their imports", body)


SUBTITLE = (
    "generated from the code by scripts/draw_house.py; a room may import only the rooms below it"
)
LEGEND = (
    "Arrow from room A to room B, with n: n modules of A import modules of B "
    "(distinct module pairs, imports inside functions included)."
)
UPWARD = (
    "Red, dashed, on the left: {} imports of a higher room, which the house forbids "
    "(tests/test_house.py)."
)


# --- the data flow of one request ----------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    does: str
    where: str
    exits: str = ""


#: The three doors: (name, how it is called, where the code is).
DOORS = (
    ("Python", "ZarrParallelAssembler(...).cache()", "zarr_parallel/api.py"),
    ("Command line", "python -m flows.cache run REQUEST.yaml", "orchestration/cache.py: main"),
    ("Prefect deployment", "UI form, API call, schedule", "deployments/ → flows/cache.py"),
)
#: One request's way through cache_flow (zarr_parallel/orchestration/cache.py).
FLOW = (
    Step(
        "validate",
        "one CacheRequest; a deployment run's request is checked against the operator's policy",
        "request/model.py · run/policy.py",
        "exit 2 · RequestError",
    ),
    Step(
        "lock",
        "refuse a cache path the cache does not own; take P.lock (one run per cache)",
        "run/steps.run_lock · store/lock.py",
        "exit 1 · CacheLocked",
    ),
    Step(
        "plan",
        "source layout → target → plan_jobs → recommendations → version; pre-flight (space)",
        "run/steps.prepare · planning/plan.py · run/preflight.py",
        "exit 2 · PlanError · exit 3 · halted",
    ),
    Step(
        "initialise",
        "staging version P.versions/<n>-<fp12>: metadata, coordinates, plan.json; lock fence",
        "run/steps.initialise · store/cache_store.py",
    ),
    Step(
        "map write jobs",
        "tasks over the workers; each job, in a job process: read once, transform, write "
        "whole chunks, record",
        "orchestration/write_flow.py · run/job.py · run/job_process.py",
        "exit 1 · RunFailed (records kept)",
    ),
    Step(
        "finish / verify",
        "every job recorded, every chunk present, optional verify, sources unchanged",
        "run/steps.finish · run/verify.py · sources/identity.py",
        "exit 1 · SourceChanged",
    ),
    Step(
        "publish",
        "fenced by the lock token: switch the link P atomically, prune old versions; summary",
        "store/cache_store.publish",
        "exit 0 · done",
    ),
)


def draw_flow() -> str:
    width = 860.0
    body = [
        text(PAD, 24, "One request, three doors, one path", 16, weight="bold"),
        text(
            PAD,
            42,
            "cache_flow (zarr_parallel/orchestration/cache.py); generated by scripts/draw_house.py",
            11,
            fill=MUTED,
        ),
    ]
    door_w, door_h, gap = 270.0, 58.0, 15.0
    y = 60.0
    xs = [PAD + 5 + i * (door_w + gap) for i in range(len(DOORS))]
    for x, (name, call, where) in zip(xs, DOORS, strict=True):
        body.append(rect(x, y, door_w, door_h, "#fdf6e3", "#b58900", 6))
        body.append(text(x + door_w / 2, y + 18, name, 12.5, "middle", "bold"))
        body.append(text(x + door_w / 2, y + 34, call, 10, "middle", family=MONO))
        body.append(text(x + door_w / 2, y + 49, where, 9.5, "middle", fill=MUTED))
    step_x, step_w, step_h, step_gap = 20.0, 580.0, 52.0, 22.0
    y_step = y + door_h + 34
    centre = step_x + step_w / 2
    for x in xs:
        body.append(
            f'<path d="M{_num(x + door_w / 2)},{_num(y + door_h)} L{_num(centre)},'
            f'{_num(y_step - 2)}" fill="none" stroke="{INK}" stroke-width="1.3" '
            'marker-end="url(#arrow-ink)"/>'
        )
    for i, step in enumerate(FLOW):
        sy = y_step + i * (step_h + step_gap)
        body.append(rect(step_x, sy, step_w, step_h, "#eef3f8", "#3e6fb0", 6))
        body.append(text(step_x + 12, sy + 18, f"{i + 1}. {step.name}", 12.5, weight="bold"))
        body.append(text(step_x + 12, sy + 32, step.does, 9.5))
        body.append(text(step_x + 12, sy + 45, step.where, 9.5, fill=MUTED, family=MONO))
        if step.exits:
            ex = step_x + step_w + 16
            colour = "#2f855a" if step.exits.startswith("exit 0") else UP
            body.append(
                f'<path d="M{_num(step_x + step_w)},{_num(sy + step_h / 2)} H{_num(ex + 4)}" '
                f'stroke="{colour}" stroke-width="1.2" stroke-dasharray="3 2"/>'
            )
            body.append(text(ex + 8, sy + step_h / 2 + 4, step.exits, 10, fill=colour))
        if i + 1 < len(FLOW):
            body.append(
                f'<path d="M{_num(centre)},{_num(sy + step_h)} V{_num(sy + step_h + step_gap - 2)}"'
                f' stroke="{INK}" stroke-width="1.3" marker-end="url(#arrow-ink)"/>'
            )
    end = y_step + len(FLOW) * (step_h + step_gap) - step_gap
    note = (
        "Nothing but the lock file is written before step 4. A cache found up to date at step 3 "
        "goes straight to the summary (exit 0, no writes)."
    )
    body.append(text(PAD, end + 24, note, 10.5, fill=MUTED))
    return svg(width, end + 38, "The data flow of one request", body)


# --- main ----------------------------------------------------------------------------------------


def pictures() -> dict[Path, str]:
    return {OUT / "house.svg": draw_house(read_house()), OUT / "request-flow.svg": draw_flow()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a picture is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, content in pictures().items():
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(
            f"{path.relative_to(ROOT)} is stale: run python scripts/draw_house.py", file=sys.stderr
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
