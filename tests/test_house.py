"""The house (docs/design.md §9): the package's rooms and its import rules, read from the
code with :mod:`ast`.

The rooms, from the bottom up; a module may import its own room and the rooms below it, never one
above, not even inside a function::

    base ← planning ← transforms ← request ← sources ← store ← run ← orchestration ← doors

Checked here, each with the offending modules and lines in its failure message:

(a) no module imports a module of a higher room (top level, inside functions, under
    ``TYPE_CHECKING``), and every module is in a room;
(b) no import cycle between the project's modules (function-local imports count);
(c) no private name (``_x``) imported from another project module;
(d) every function-local import of a project module says why (a comment on its line, or on the
    comment line right above it or above the run of imports it starts);
(e) every module is at most :data:`MAX_LINES` lines;
(f) every function's cyclomatic complexity (radon) is at most :data:`MAX_COMPLEXITY`;
(g) no Prefect import below the orchestration room (and no execution framework in planning);
(h) no import cycle among the ``benchmarks`` modules.

Fast and read-only: it parses files, imports nothing of the project and starts no process.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import sys
import tokenize
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from radon.complexity import cc_visit

ROOT = Path(__file__).resolve().parents[1]


def _drawing() -> ModuleType:
    """scripts/draw_house.py: the one definition of the rooms, which its pictures draw."""
    spec = importlib.util.spec_from_file_location("draw_house", ROOT / "scripts" / "draw_house.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


_HOUSE = _drawing()
#: The project's code, the rooms from the bottom up (a room may import itself and the rooms
#: before it), the top-level modules that form the base and those that are doors.
PROJECT: tuple[str, ...] = _HOUSE.PROJECT
ROOMS: tuple[str, ...] = _HOUSE.ROOMS
BASE_MODULES: frozenset[str] = _HOUSE.BASE_MODULES
DOOR_MODULES: frozenset[str] = _HOUSE.DOOR_MODULES
module_name: Callable[[Path], str] = _HOUSE.module_name
room_of: Callable[[str], str | None] = _HOUSE.room_of
_owner: Callable[[str, dict[str, Path]], str | None] = _HOUSE.owner
#: Rooms below orchestration: none of them may import Prefect (the job process runs their code).
NO_PREFECT_ROOMS = ("base", "planning", "transforms", "request", "sources", "store", "run")
PREFECT_PACKAGES = frozenset({"prefect", "prefect_dask"})
#: The planner is pure arithmetic: no execution framework either (docs/design.md §9).
PLANNING_FORBIDDEN = PREFECT_PACKAGES | {"dask", "distributed", "dask_jobqueue"}
MAX_LINES = 520
MAX_COMPLEXITY = 20


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> str:
    """No Prefect API here: these checks only parse files (overrides tests/conftest.py's)."""
    return ""


@dataclass(frozen=True)
class Import:
    """One imported project module (or name) of one import statement."""

    importer: str
    target: str
    name: str | None  # the name taken from ``target`` (``from target import name``), if any
    path: str
    line: int
    end_line: int
    local: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:``

    def where(self) -> str:
        how = " (in a function)" if self.local else ""
        how += " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.path}:{self.line}{how}"


@dataclass(frozen=True)
class External:
    """One import of a module outside the project: its top-level package."""

    importer: str
    package: str
    path: str
    line: int


@cache
def modules(folders: tuple[str, ...]) -> dict[str, Path]:
    """Every module under ``folders`` by dotted name."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # a virtual environment or cache inside the folder is not the project
            found[module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(
    body: Iterable[ast.stmt], local: bool = False, type_checking: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement, with whether it is inside a function and under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, local, type_checking
            continue
        inner_local = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        inner_tc = type_checking or (isinstance(node, ast.If) and _is_type_checking(node.test))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, ()) or ():
                if isinstance(child, ast.ExceptHandler | ast.match_case):
                    yield from _statements(child.body, inner_local, inner_tc)
                elif isinstance(child, ast.stmt):
                    yield from _statements([child], inner_local, inner_tc)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _module_imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import | External]:
    """The imports of one module: of project modules (:class:`Import`) and of others."""
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(), filename=rel)
    is_package = path.name == "__init__.py"
    for node, local, tc in _statements(tree.body):
        end = node.end_lineno or node.lineno
        targets: list[tuple[str, str | None]] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                owner = _owner(alias.name, known)
                if owner is None:
                    yield External(module, alias.name.split(".")[0], rel, node.lineno)
                else:
                    targets.append((owner, None))
        else:
            source = _absolute(module, is_package, node)
            owner = _owner(source, known)
            if owner is None:
                if node.level == 0:
                    yield External(module, source.split(".")[0], rel, node.lineno)
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append((submodule, None) if submodule in known else (owner, alias.name))
        for target, name in targets:
            if target != module:
                yield Import(module, target, name, rel, node.lineno, end, local, tc)


@cache
def imports(folders: tuple[str, ...]) -> tuple[tuple[Import, ...], tuple[External, ...]]:
    """All imports of the modules under ``folders``: of each other, and of anything else."""
    known = modules(folders)
    found = [imp for module, path in known.items() for imp in _module_imports(module, path, known)]
    return (
        tuple(i for i in found if isinstance(i, Import)),
        tuple(i for i in found if isinstance(i, External)),
    )


def _report(title: str, lines: Iterable[str]) -> str:
    lines = sorted(set(lines))
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


# --- (a) rooms -----------------------------------------------------------------------------------


def test_every_module_is_in_a_room() -> None:
    lost = [str(p.relative_to(ROOT)) for m, p in modules(PROJECT).items() if room_of(m) is None]
    assert not lost, _report(
        "modules in no room (put them in a room folder, or name them in tests/test_house.py)", lost
    )


def test_imports_point_down_the_house() -> None:
    rank = {room: i for i, room in enumerate(ROOMS)}
    found, _ = imports(PROJECT)
    upward = []
    for imp in found:
        mine, theirs = room_of(imp.importer), room_of(imp.target)
        if mine is None or theirs is None or rank[theirs] <= rank[mine]:
            continue
        upward.append(f"{imp.where()}: {imp.importer} ({mine}) imports {imp.target} ({theirs})")
    assert not upward, _report(
        "imports of a higher room (order: " + " <- ".join(ROOMS) + ")", upward
    )


# --- (b), (h) cycles -----------------------------------------------------------------------------


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _shortest_cycle(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``members`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph.get(node, set()) & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parents:
                    parents[succ] = node
                    nxt.append(succ)
        frontier = nxt
    return [start]


def _cycles(folders: tuple[str, ...]) -> list[str]:
    found, _ = imports(folders)
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for imp in found:
        graph[imp.importer].add(imp.target)
        where[imp.importer, imp.target].append(imp.where())
    problems = []
    for component in _strongly_connected(graph):
        members = set(component)
        cycle = _shortest_cycle(component[0], graph, members)
        edges = [
            f"    {a} -> {b}: {', '.join(sorted(set(where[a, b])))}"
            for a in component
            for b in sorted(graph[a] & members)
        ]
        problems.append(
            f"a cycle through {len(component)} modules, e.g. {' -> '.join(cycle)}; "
            "its imports:\n" + "\n".join(edges)
        )
    return problems


def test_no_import_cycles() -> None:
    problems = _cycles(PROJECT)
    assert not problems, "import cycles (function-local imports count):\n" + "\n".join(problems)


def test_benchmarks_have_no_import_cycles() -> None:
    problems = _cycles(("benchmarks",))
    assert not problems, "import cycles among benchmarks/ modules:\n" + "\n".join(problems)


# --- (c) private names ---------------------------------------------------------------------------


def test_no_private_names_across_modules() -> None:
    found, _ = imports(PROJECT)
    private = [
        f"{imp.where()}: {imp.importer} imports {imp.target}.{imp.name}"
        for imp in found
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")
    ]
    assert not private, _report(
        "private names imported from another module (make them public or move them)", private
    )


# --- (d) function-local imports say why --------------------------------------------------------


@cache
def _comment_lines(path: Path) -> tuple[frozenset[int], frozenset[int]]:
    """Lines holding a comment, and lines holding nothing but a comment."""
    text = path.read_text()
    comments = {
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = text.splitlines()
    only = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    return frozenset(comments), frozenset(only)


def test_function_local_imports_say_why() -> None:
    found, _ = imports(PROJECT)
    known = modules(PROJECT)
    # Statement starts per file, so that one comment above a run of local imports covers the run.
    by_file: dict[str, dict[int, int]] = defaultdict(dict)  # path -> {end line: start line}
    for imp in found:
        if imp.local:
            by_file[imp.path][imp.end_line] = imp.line
    silent = []
    for imp in found:
        if not imp.local:
            continue
        comments, only = _comment_lines(known[imp.importer])
        if any(n in comments for n in range(imp.line, imp.end_line + 1)):
            continue
        first = imp.line
        while first - 1 in by_file[imp.path]:  # the import right above is another local import
            first = by_file[imp.path][first - 1]
        if first - 1 in only:
            continue
        silent.append(f"{imp.where()}: {imp.importer} imports {imp.target}")
    assert not silent, _report(
        "function-local imports of project modules without a comment saying why "
        "(only a deferred heavy dependency justifies one)",
        silent,
    )


# --- (e) module length, (f) complexity -----------------------------------------------------------


def test_modules_are_short() -> None:
    long = []
    for path in modules(PROJECT).values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, _report(f"modules over {MAX_LINES} lines", long)


def _functions(blocks: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(qualified name, line, complexity) of every function, method and closure.

    radon lists a class's methods both in the class and beside it: they are taken from the class.
    """
    for block in blocks:
        if getattr(block, "is_method", False):
            continue
        name = prefix + block.name
        if hasattr(block, "methods"):  # a class
            yield from _functions([m._replace(is_method=False) for m in block.methods], name + ".")
            yield from _functions(block.inner_classes, name + ".")
        else:
            yield name, block.lineno, block.complexity
            yield from _functions(block.closures, name + ".")


def test_functions_are_simple() -> None:
    complex_ = []
    for path in modules(PROJECT).values():
        for name, line, complexity in _functions(cc_visit(path.read_text())):
            if complexity > MAX_COMPLEXITY:
                complex_.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} has complexity {complexity}"
                )
    assert not complex_, _report(
        f"functions with cyclomatic complexity over {MAX_COMPLEXITY} (radon)", complex_
    )


# --- (g) Prefect stays in orchestration ----------------------------------------------------------


def test_no_prefect_below_orchestration() -> None:
    _, external = imports(PROJECT)
    wrong = []
    for imp in external:
        room = room_of(imp.importer)
        forbidden = PLANNING_FORBIDDEN if room == "planning" else PREFECT_PACKAGES
        if room in NO_PREFECT_ROOMS and imp.package in forbidden:
            wrong.append(f"{imp.path}:{imp.line}: {imp.importer} ({room}) imports {imp.package}")
    assert not wrong, _report(
        "Prefect imported below orchestration (or an execution framework in planning)", wrong
    )


def test_the_pictures_are_current() -> None:
    """docs/img's house and request-flow pictures are what the code draws now."""
    stale = [
        str(path.relative_to(ROOT))
        for path, picture in _HOUSE.pictures().items()
        if not path.exists() or path.read_text() != picture
    ]
    assert not stale, f"stale pictures: {stale}; run python scripts/draw_house.py"
