"""workers/comm sits below the client and has no import cycle, counting imports inside functions."""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

COMM = os.path.join(ROOT, "workers", "comm")
PACKAGE = "nanodist.workers.comm"


def imports(path: str) -> set[str]:
    """Every module `path` imports, at any depth (functions, TYPE_CHECKING blocks included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def comm_modules() -> dict[str, set[str]]:
    """module name -> the modules of this package it imports (the package itself stands for __init__)."""
    graph = {}
    for name in sorted(os.listdir(COMM)):
        if not name.endswith(".py"):
            continue
        module = PACKAGE if name == "__init__.py" else f"{PACKAGE}.{name[:-3]}"
        graph[module] = imports(os.path.join(COMM, name))
    return graph


def test_no_comm_module_imports_the_client() -> None:
    offenders = {
        module: sorted(i for i in found if i == "nanodist.client" or i.startswith("nanodist.client."))
        for module, found in comm_modules().items()
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_comm_modules_import_each_other_without_a_cycle() -> None:
    graph = comm_modules()
    edges = {module: {i for i in found if i in graph and i != module} for module, found in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module) :], module])
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
