"""Packages import one way: the import graph between volpre's packages has no cycle, and the rules
each package's ``__init__`` docstring states hold (read from the source, as text)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "volpre"
IMPORT = re.compile(r"^\s*(?:from|import) volpre\.(\w+)", re.M)

FORBIDDEN = {
    "data": {"models", "objectives", "engine", "export", "evaluate", "demo", "bench", "commands", "cli"},
    "models": {"objectives", "engine", "export", "evaluate", "demo", "bench", "commands", "cli"},
    "survival": {"data", "models", "objectives", "engine", "export", "evaluate", "demo", "bench", "commands"},
    "objectives": {"engine", "export", "evaluate", "demo", "bench", "commands", "cli"},
    "engine": {"export", "evaluate", "demo", "bench", "commands", "cli"},
    "export": {"evaluate", "demo", "bench", "commands", "cli"},
    "evaluate": {"engine", "demo", "bench", "commands", "cli"},
    "files": {"config", "data", "models", "engine", "export"},
}


def _imports() -> dict[str, set[str]]:
    """Package (or top-level module) -> the volpre packages and modules it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        owner = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for target in IMPORT.findall(path.read_text()):
            if target != owner:
                graph[owner].add(target)
    return graph


def test_the_import_graph_between_packages_has_no_cycle():
    graph = _imports()
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + (node,))
        done.add(node)

    for node in sorted(graph):
        visit(node, ())


def test_each_layer_imports_only_what_is_below_it():
    graph = _imports()
    wrong = {package: sorted(graph[package] & forbidden) for package, forbidden in FORBIDDEN.items()
             if graph[package] & forbidden}
    assert wrong == {}
    assert {owner for owner, targets in graph.items() if "commands" in targets} == {"cli"}
    assert {owner for owner, targets in graph.items() if "bench" in targets} == {"commands"}
