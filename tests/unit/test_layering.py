"""The layers of the `nanodist` package, read from its source.

Generated code, the wire format and the settings sit at the bottom; the client
and the services side by side above them; the workers above the client; torch
only inside nanodist.torch. The import graph is built from every file that the
package-dir mapping of pyproject.toml installs, and counts imports inside
functions and TYPE_CHECKING blocks: they hide a cycle or a layer breach from
the interpreter, not from a reader.

"Never loads" follows imports transitively, through the parent packages that
Python runs first, so a failure names the whole chain that breaks the rule.
"""

from __future__ import annotations

import ast
import functools
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT


@dataclass(frozen=True)
class Graph:
    files: Mapping[str, str]  # module -> its file
    imports: Mapping[str, frozenset[str]]  # module -> every name it imports, nanodist or not

    def edges(self, prefixes: tuple[str, ...] = ("nanodist",)) -> dict[str, set[str]]:
        """module -> the modules of the graph it imports, both ends under one of `prefixes`."""
        inside = {m for m in self.files if under(m, prefixes)}
        return {m: {i for i in self.imports[m] if i in inside and i != m} for m in inside}

    def owner(self, name: str) -> str:
        """The module that `name` comes from: its longest prefix that is a module of the graph."""
        parts = name.split(".")
        return next((p for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if p in self.files), name)


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_names(path: str, module: str, known: Set[str]) -> frozenset[str]:
    """Every name the file imports, at any depth, relative imports resolved.

    `from a import b` names a.b, and also a unless a.b is one of the `known` modules:
    importing a submodule does not depend on what the package's __init__ defines,
    so nanodist.torch.optimizer may say `from nanodist.torch import runtime` while
    nanodist.torch imports the optimizer.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                found.add(f"{source}.{alias.name}")
                if f"{source}.{alias.name}" not in known:
                    found.add(source)
    return frozenset(found)


@functools.cache
def package_graph() -> Graph:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_dir: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    folders = {os.path.normpath(os.path.join(ROOT, folder)): package for package, folder in package_dir.items()}
    files: dict[str, str] = {}
    for top in folders:
        for folder, _, names in os.walk(top):
            # The deepest mapped folder names the module: workers/torch is nanodist.torch, not nanodist.workers.torch.
            mapped = max((f for f in folders if folder == f or folder.startswith(f + os.sep)), key=len)
            relative = os.path.relpath(folder, mapped)
            prefix = ".".join([folders[mapped], *(relative.split(os.sep) if relative != "." else [])])
            for name in names:
                if name.endswith(".py") and "_pb2" not in name:  # generated protobuf/gRPC code
                    files[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return Graph(files, {module: imported_names(path, module, files.keys()) for module, path in files.items()})


def cycles(edges: Mapping[str, set[str]]) -> list[str]:
    """One cycle per back edge of a depth-first walk: empty exactly when the graph has no cycle."""
    found: list[str] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return found


def modules(*prefixes: str) -> list[str]:
    return sorted(m for m in package_graph().files if under(m, prefixes))


def leaks(starts: Iterable[str], forbidden: Callable[[str], bool]) -> list[str]:
    """For each of `starts` that loads a forbidden name, the import chain that gets there."""
    graph = package_graph()
    edges = graph.edges()
    found = []
    for start in starts:
        came_from: dict[str, str] = {start: ""}
        shown = {start: start}  # a parent package is marked: Python runs it before any module inside
        queue = [start]
        for module in queue:  # breadth first, so the chain reported is a shortest one
            bad = sorted(name for name in graph.imports[module] if forbidden(name))
            if bad:
                chain = [bad[0]]
                while module:
                    chain.append(shown[module])
                    module = came_from[module]
                found.append(" -> ".join(reversed(chain)))
                break
            parts = module.split(".")
            packages = {".".join(parts[:n]) for n in range(1, len(parts))} & graph.files.keys()
            for target in sorted(edges[module] | packages):
                if target not in came_from:
                    came_from[target] = module
                    shown[target] = target if target in edges[module] else f"{target} (its package)"
                    queue.append(target)
    return found


def test_every_package_in_pyproject_is_in_the_import_graph() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    assert sorted(set(packages) - package_graph().files.keys()) == []


def test_no_import_cycle_anywhere_in_the_package() -> None:
    found = cycles(package_graph().edges())
    assert not found, "import cycles:\n" + "\n".join(found)


AREAS = {
    "services, wire format and settings": ("nanodist.services", "nanodist.wire", "nanodist.settings", "nanodist.ports"),
    "client": ("nanodist.client",),
    "workers": ("nanodist.workers",),
    "collectives": ("nanodist.workers.comm",),
    "torch": ("nanodist.torch",),
}


@pytest.mark.parametrize("area", AREAS)
def test_each_area_imports_its_own_modules_without_a_cycle(area: str) -> None:
    found = cycles(package_graph().edges(AREAS[area]))
    assert not found, f"import cycles in the {area}:\n" + "\n".join(found)


def test_the_wire_format_and_settings_load_only_generated_code_and_each_other() -> None:
    graph = package_graph()
    bottom = ("nanodist.v1", "nanodist.wire", "nanodist.settings", "nanodist.ports")

    def above(name: str) -> bool:
        module = graph.owner(name)
        return under(module, ("nanodist",)) and module != "nanodist" and not under(module, bottom)

    found = leaks(modules("nanodist.wire", "nanodist.settings", "nanodist.ports"), above)
    assert not found, "the bottom layer loads a module above it:\n" + "\n".join(found)


def test_the_services_never_load_the_client_or_the_workers() -> None:
    found = leaks(modules("nanodist.services"), lambda name: under(name, ("nanodist.client", "nanodist.workers")))
    assert not found, "a service loads the client or the workers:\n" + "\n".join(found)


def test_the_client_never_loads_the_services_or_the_workers() -> None:
    found = leaks(modules("nanodist.client"), lambda name: under(name, ("nanodist.services", "nanodist.workers")))
    assert not found, "the client loads a service or the workers:\n" + "\n".join(found)


def test_the_collectives_never_load_the_client() -> None:
    found = leaks(modules("nanodist.workers.comm"), lambda name: under(name, ("nanodist.client",)))
    assert not found, "workers/comm loads the client:\n" + "\n".join(found)


def test_the_numpy_path_never_imports_torch() -> None:
    """Only nanodist.torch may import torch: the numpy worker, the CLI and the services run without it."""
    outside = [m for m in modules("nanodist") if not under(m, ("nanodist.torch",))]
    found = leaks(outside, lambda name: under(name, ("torch", "nanodist.torch")))
    assert not found, "a module outside nanodist.torch loads torch:\n" + "\n".join(found)


def test_the_pipeline_worker_builds_on_the_worker_not_the_other_way_round() -> None:
    edges = package_graph().edges()
    assert "nanodist.workers.worker" in edges["nanodist.workers.pipeline_worker"]
    assert "nanodist.workers.pipeline_worker" not in edges["nanodist.workers.worker"]
    assert {"nanodist.workers.worker", "nanodist.workers.pipeline_worker"} <= edges["nanodist.workers.train"]
