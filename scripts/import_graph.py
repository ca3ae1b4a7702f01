"""The import graph of ``src/scaler_wizard``: cycles and upward arrows.

    python scripts/import_graph.py           # summary; exit 1 on a cycle or an upward arrow
    python scripts/import_graph.py --edges   # also every edge (``top`` or ``function``)
    python scripts/import_graph.py --json    # the graph as JSON

Every ``import`` / ``from ... import`` of a ``scaler_wizard`` module is an edge, read with
``ast`` (nothing is imported), marked

* ``top``: runs when the importing module is imported (module level, including ``try`` and
  ``if`` blocks, but not ``if TYPE_CHECKING:``);
* ``function``: inside a function or method body, so it runs only when that code is called
  (the lazy imports that keep torch and friends off the import path).

It fails on

* **cycles**: strongly connected components of the ``top`` edges (modules that need each other
  to finish importing);
* **upward arrows**: a library module importing ``scaler_wizard.pipeline`` or
  ``scaler_wizard.cli`` (at any level). The entry layer -- ``cli``, ``__main__`` and the
  ``*_cli`` command modules -- may import the pipeline; nothing but ``__main__`` imports ``cli``.

Cycles that close only through ``function`` edges are listed for information, not failed on.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scaler_wizard"
SRC = ROOT / "src" / PACKAGE
TOP_OF_STACK = (f"{PACKAGE}.pipeline", f"{PACKAGE}.cli")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # "top" or "function"
    line: int


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import node with its kind; ``if TYPE_CHECKING:`` blocks are skipped."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_one(sub, kind)
                continue
            visit_one(child, kind)

    def visit_one(child: ast.AST, kind: str) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append((child, kind))
        inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else kind
        visit(child, inner)

    visit(tree, "top")
    return found


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The scaler_wizard modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [_known(n, modules) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    if stem != PACKAGE and not stem.startswith(PACKAGE + "."):
        return []
    out = [_known(stem, modules)]
    for alias in node.names:  # ``from pkg import submodule`` loads the submodule too
        if f"{stem}.{alias.name}" in modules:
            out.append(f"{stem}.{alias.name}")
    return out


def _known(name: str, modules: set[str]) -> str:
    """The longest prefix of ``name`` that is a module of the package (``a.b.func`` -> ``a.b``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def build_graph(src: Path = SRC) -> tuple[set[str], list[Edge]]:
    files = sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, src) for p in files}
    edges: set[Edge] = set()
    for path in files:
        importer = module_name(path, src)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, kind in _imports(tree):
            for target in _targets(node, importer, path.name == "__init__.py", modules):
                if target != importer:
                    edges.add(Edge(importer, target, kind, node.lineno))
    return modules, sorted(edges, key=lambda e: (e.source, e.target, e.kind, e.line))


def strongly_connected(nodes: set[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one module, sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(components)


def a_cycle(component: list[str], edges: list[Edge]) -> list[str]:
    """One closed path through a component (breadth-first from its first module)."""
    members = set(component)
    graph: dict[str, list[str]] = defaultdict(list)
    for e in edges:
        if e.source in members and e.target in members:
            graph[e.source].append(e.target)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(set(graph[node])):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def is_entry_layer(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return module in (f"{PACKAGE}.cli", f"{PACKAGE}.__main__") or leaf.endswith("_cli")


def upward_arrows(edges: list[Edge]) -> list[Edge]:
    def upward(e: Edge) -> bool:
        if e.target == f"{PACKAGE}.cli":
            return e.source != f"{PACKAGE}.__main__"
        return e.target == f"{PACKAGE}.pipeline" and not is_entry_layer(e.source)

    return [e for e in edges if upward(e)]


def analyse(src: Path = SRC) -> dict:
    modules, edges = build_graph(src)
    top = [e for e in edges if e.kind == "top"]
    cycles = strongly_connected(modules, top)
    lazy = [c for c in strongly_connected(modules, edges) if c not in cycles]
    return {
        "modules": sorted(modules),
        "edges": edges,
        "cycles": [{"modules": c, "path": a_cycle(c, top)} for c in cycles],
        "function_level_cycles": [{"modules": c, "path": a_cycle(c, edges)} for c in lazy],
        "upward_arrows": upward_arrows(edges),
    }


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def report(result: dict, show_edges: bool = False) -> str:
    edges = result["edges"]
    n_top = sum(e.kind == "top" for e in edges)
    lines = [(f"{len(result['modules'])} modules, {len(edges)} imports of package modules "
              f"({n_top} top-level, {len(edges) - n_top} function-level)")]
    if show_edges:
        lines += [f"  {_short(e.source)} -> {_short(e.target)}  [{e.kind}, line {e.line}]" for e in edges]
    lines.append(f"cycles (top-level imports): {len(result['cycles'])}")
    for c in result["cycles"]:
        lines.append("  " + " -> ".join(map(_short, c["path"])) + f"  ({len(c['modules'])} modules in the component)")
    lines.append(f"upward arrows (library -> pipeline/cli): {len(result['upward_arrows'])}")
    for e in result["upward_arrows"]:
        lines.append(f"  {_short(e.source)} -> {_short(e.target)}  [{e.kind}, line {e.line}]")
    if result["function_level_cycles"]:
        lines.append(f"cycles closed only by function-level imports (not failed): "
                     f"{len(result['function_level_cycles'])}")
        for c in result["function_level_cycles"]:
            lines.append("  " + " -> ".join(map(_short, c["path"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="list every edge")
    parser.add_argument("--json", action="store_true", help="print the graph as JSON")
    args = parser.parse_args(argv)
    result = analyse()
    if args.json:
        print(json.dumps({**result, "edges": [e.__dict__ for e in result["edges"]],
                          "upward_arrows": [e.__dict__ for e in result["upward_arrows"]]}, indent=2))
    else:
        print(report(result, args.edges))
    return 1 if result["cycles"] or result["upward_arrows"] else 0


if __name__ == "__main__":
    sys.exit(main())
