"""No import cycles between mountd's packages: the import graph of mountd/,
read from the source (ast), one node per package (mountd.config,
mountd.storage, mountd.fs, mountd.cache, mountd.transfer, mountd.run) or
top-level module (mountd.paths, mountd.journal, ...), must have no cycle.

Every import counts, those inside functions too: a lazy import hides a
dependency from the interpreter, not from the reader. Only imports under
`if TYPE_CHECKING:` are left out (annotations, never run).
"""

from __future__ import annotations

import ast
import os

import pytest

import mountd

ROOT = os.path.dirname(os.path.abspath(mountd.__file__))

# Edges (importer -> imported) of cycles through code this change does not
# own; each names the place that makes it and who owns it. Remove an entry
# once that code is reshaped: the test then holds the line.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _node(module: str) -> str:
    """The graph node a module belongs to: its package under mountd, or
    itself when it is a top-level module."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module, line) for each import of a mountd module in `tree`."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from mountd import errors` imports the module mountd.errors
                sub = f"{target}.{alias.name}"
                yield (sub if _exists(sub) else target), node.lineno


def _exists(module: str) -> bool:
    path = os.path.join(os.path.dirname(ROOT), *module.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """node -> {imported node: ["mountd/x.py:12", ...]} over all of mountd/."""
    graph: dict[str, dict[str, list[str]]] = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = _module_name(path)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            src = _node(module)
            edges = graph.setdefault(src, {})
            for target, line in _imports(tree, module, name == "__init__.py"):
                if target.split(".")[0] != "mountd" or target == "mountd":
                    continue
                dst = _node(target)
                if dst != src:
                    where = f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}"
                    edges.setdefault(dst, []).append(where)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one
    node (Tarjan's algorithm, then a shortest way back to the start)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, dict[str, list[str]]], component: list[str]) -> list[str]:
    """The shortest cycle through the component's first node (breadth first)."""
    start, members = component[0], set(component)
    came_from = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w == start:
                    path = [v]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def _describe(graph: dict[str, dict[str, list[str]]], cycle: list[str]) -> str:
    steps = [f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def _without_allowed(graph):
    return {a: {b: w for b, w in edges.items() if (a, b) not in ALLOWED} for a, edges in graph.items()}


def test_mountd_packages_import_each_other_without_cycles():
    graph = _without_allowed(import_graph())
    found = cycles(graph)
    assert not found, "import cycles between mountd's packages:\n" + "\n".join(_describe(graph, c) for c in found)


def test_allowed_edges_still_exist():
    """An allow-list entry for an edge that is gone would hide a future one."""
    graph = import_graph()
    stale = [edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"remove from ALLOWED, no longer imported: {stale}"


def test_the_path_helpers_are_a_leaf():
    """mountd.paths is below everything: it imports only mountd.errors."""
    assert set(import_graph()["mountd.paths"]) <= {"mountd.errors"}


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b": ["x"]}, "b": {"a": ["y"]}}, [["a", "b", "a"]]),
    ({"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}, "d": {"a": ["w"]}}, [["a", "b", "c", "a"]]),
    ({"a": {"b": ["x"]}, "b": {"c": ["y"]}}, []),
])
def test_the_check_finds_cycles(graph, expected):
    assert cycles(graph) == expected
