"""The worker modules import each other without a cycle, counting imports inside functions."""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

WORKERS = os.path.join(ROOT, "workers")
PACKAGE = "nanodist.workers"


def module_names() -> dict[str, str]:
    """module name -> its file, for every module under workers/ (comm/ and any other subpackage included)."""
    found = {}
    for folder, _, files in os.walk(WORKERS):
        parts = os.path.relpath(folder, WORKERS).split(os.sep)
        prefix = ".".join([PACKAGE, *(p for p in parts if p != ".")])
        for name in files:
            if name.endswith(".py"):
                found[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return found


def imports(path: str, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports, at any depth; `from package import module` counts as module."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & known


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: imports(path, set(names)) - {module} for module, path in names.items()}


def test_worker_modules_import_each_other_without_a_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module) :], module])
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_pipeline_worker_builds_on_the_worker_not_the_other_way_round() -> None:
    edges = graph()
    assert "nanodist.workers.worker" in edges["nanodist.workers.pipeline_worker"]
    assert "nanodist.workers.pipeline_worker" not in edges["nanodist.workers.worker"]
    assert {"nanodist.workers.worker", "nanodist.workers.pipeline_worker"} <= edges["nanodist.workers.train"]
