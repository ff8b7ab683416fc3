"""Fail when the code's import graph has a cycle: Python modules and the dashboard's ES modules.

Python: every ``import`` and ``from ... import`` in a module counts, wherever it stands (module
level, inside a function, under ``if TYPE_CHECKING``), because a deferred import only postpones
a cycle: the two modules still cannot be understood, or moved, one without the other. Only
edges between the scanned modules count; ``from pkg import name`` is an edge to ``pkg.name``
when that is a module, else to ``pkg`` (its ``__init__``). Parent packages are not implied.

JavaScript: static ``import ... from "./x.js"``, ``import "./x.js"`` and ``export ... from
"./x.js"`` with a relative path; vendored files (any ``vendor`` folder) are not scanned.

Cycles are the strongly connected components of the graph (Tarjan's algorithm) with more than
one module, or one module importing itself. Usage: ``python -m tools.import_graph [ROOT]``.
"""

import ast
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# Folders whose modules are named from the repository root, and those named from inside them.
PYTHON_ROOTS: Final = ("services", "deploy", "bench")
PYTHON_SOURCE_ROOTS: Final = ("device_agent/src",)
JS_ROOTS: Final = ("services/api/dashboard/static/js",)

JS_IMPORT: Final = re.compile(
    r"""^\s*(?:import|export)\b[^;'"]*?(?:\bfrom\s*)?["'](\.{1,2}/[^"']+\.js)["']""",
    re.MULTILINE,
)

Graph = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class Cycle:
    """One strongly connected component, shown as one closed path through it."""

    language: str
    path: tuple[str, ...]
    members: tuple[str, ...]

    def __str__(self) -> str:
        others = sorted(set(self.members) - set(self.path))
        also = f" (the same knot also holds {', '.join(others)})" if others else ""
        return f"{self.language} import cycle: {' -> '.join(self.path)}{also}"


def python_modules(
    root: Path, folders: Iterable[str], source_folders: Iterable[str]
) -> dict[str, Path]:
    """Map each module's dotted name to its file, for packages and source folders under root."""
    modules: dict[str, Path] = {}
    bases = [(root / f, root) for f in folders] + [(root / f, root / f) for f in source_folders]
    for folder, base in bases:
        for file in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            parts = file.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = file
    return modules


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom
) -> Iterator[tuple[str, ...]]:
    """Per imported name, the dotted names it may be, most specific first."""
    if isinstance(node, ast.Import):
        yield from ((alias.name,) for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    for alias in node.names:
        yield (f"{base}.{alias.name}", base) if base else (alias.name,)


def python_graph(modules: Mapping[str, Path]) -> dict[str, frozenset[str]]:
    """Edges from each module to the scanned modules it imports."""
    graph: dict[str, frozenset[str]] = {}
    for name, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for candidates in _targets(name, file.name == "__init__.py", node):
                    edges.update([c for c in candidates if c in modules][:1])
        graph[name] = frozenset(edges)
    return graph


def js_graph(root: Path, folders: Iterable[str]) -> dict[str, frozenset[str]]:
    """Edges from each ES module (named by its path under root) to the modules it imports."""
    graph: dict[str, frozenset[str]] = {}
    for folder in (root / f for f in folders):
        files = sorted(folder.rglob("*.js")) if folder.is_dir() else []
        for file in (f for f in files if "vendor" not in f.relative_to(folder).parts):
            targets = set()
            for spec in JS_IMPORT.findall(file.read_text(encoding="utf-8")):
                target = (file.parent / spec).resolve()
                if target.is_file():
                    targets.add(target.relative_to(root.resolve()).as_posix())
            graph[file.resolve().relative_to(root.resolve()).as_posix()] = frozenset(targets)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in graph:
                    continue
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _closed_path(graph: Graph, component: list[str]) -> tuple[str, ...]:
    """A shortest cycle through the component's first module, staying inside the component."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & members):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return (*reversed(path), start)
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    return (start, start)


def cycles(graph: Graph, language: str) -> list[Cycle]:
    """Every cycle of the graph, one per strongly connected component."""
    return [
        Cycle(language, _closed_path(graph, component), tuple(component))
        for component in strongly_connected(graph)
        if len(component) > 1 or component[0] in graph[component[0]]
    ]


def check(root: Path) -> list[Cycle]:
    """The Python and JavaScript import cycles of the repository at root."""
    modules = python_modules(root, PYTHON_ROOTS, PYTHON_SOURCE_ROOTS)
    return cycles(python_graph(modules), "python") + cycles(js_graph(root, JS_ROOTS), "js")


def main(argv: list[str]) -> int:
    """Print each cycle and return 1, or say how much was checked and return 0."""
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    found = check(root)
    for cycle in found:
        print(cycle)
    if found:
        return 1
    python = len(python_modules(root, PYTHON_ROOTS, PYTHON_SOURCE_ROOTS))
    js = len(js_graph(root, JS_ROOTS))
    print(f"no import cycle among {python} Python modules and {js} ES modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
