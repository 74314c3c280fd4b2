"""The services and the wire format sit below the client and workers, with no import cycle.

Imports inside functions and TYPE_CHECKING blocks count: they hide a cycle
from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

# package-dir folder -> package name (pyproject.toml)
TREES = {
    os.path.join(ROOT, "services"): "nanodist.services",
    os.path.join(ROOT, "protos", "nanodist", "wire"): "nanodist.wire",
}
SINGLE = {os.path.join(ROOT, "protos", "nanodist", "settings.py"): "nanodist.settings"}


def imports(path: str) -> set[str]:
    """Every module `path` imports, at any depth, with `from a import b` also naming a.b (b may be a module)."""
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


def modules() -> dict[str, set[str]]:
    """module name -> every module it imports."""
    graph = dict((name, imports(path)) for path, name in SINGLE.items())
    for top, package in TREES.items():
        for folder, _, files in os.walk(top):
            relative = os.path.relpath(folder, top)
            prefix = package if relative == "." else f"{package}.{relative.replace(os.sep, '.')}"
            for name in files:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    graph[module] = imports(os.path.join(folder, name))
    return graph


def offenders(graph: dict[str, set[str]], prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        module: sorted(i for i in imported if any(i == f or i.startswith(f + ".") for f in forbidden))
        for module, imported in graph.items()
        if module.startswith(prefix)
    }
    return {module: names for module, names in found.items() if names}


def test_services_import_neither_the_client_nor_the_workers() -> None:
    assert offenders(modules(), "nanodist.services", ("nanodist.client", "nanodist.workers")) == {}


def test_the_wire_format_imports_only_generated_code() -> None:
    forbidden = ("nanodist.client", "nanodist.workers", "nanodist.services")
    assert offenders(modules(), "nanodist.wire", forbidden) == {}


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    graph = modules()
    edges = {module: {i for i in found if i in graph and i != module} for module, found in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module) :], module])
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
