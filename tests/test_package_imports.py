"""The package reads top-down: no import circle anywhere in ``expertflow_compile``.

Every import of one package module by another, at module level or inside a function (a
dependency too), is an edge: ``from X import y`` is an edge to ``X.y`` when that is a
module, else to ``X``; ``from . import y`` of a sibling module is an edge to that module
alone. The graph must be acyclic.
"""

from __future__ import annotations

import ast
import pathlib

import expertflow_compile
from helpers import find_cycle

ROOT = pathlib.Path(expertflow_compile.__file__).parent
PKG = "expertflow_compile"


def _module_name(path: pathlib.Path) -> str:
    parts = [p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__"]
    return ".".join([PKG, *parts])


def _targets(module: str, is_pkg: bool, node, modules) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = set()
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.add(sub if sub in modules else target)
    return {t for t in out if t in modules}


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name] |= _targets(name, path.name == "__init__.py", node, modules) - {name}
    return edges


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    edges = import_graph()
    assert len(edges) > 40 and edges[f"{PKG}.cli.main"] >= {f"{PKG}.cli.common", f"{PKG}.cli.predict"}
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# The package's top level: the public API modules, the ground floor (layer.py: the
# description of one MoE layer, which imports nothing of the package) and the wings.
API_MODULES = {"__init__.py", "api.py", "config.py", "errors.py"}
GROUND_FLOOR = {"layer.py"}
WINGS = {"compiler", "runtime", "loading", "kernels", "tools", "cli", "testing", "assets"}


def test_top_level_holds_only_the_api_and_the_wings():
    modules = {p.name for p in ROOT.glob("*.py")}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules == API_MODULES | GROUND_FLOOR, \
        f"loose modules at the top level: {sorted(modules - API_MODULES - GROUND_FLOOR)}"
    assert packages == WINGS, f"unexpected packages: {sorted(packages ^ WINGS)}"


def test_the_library_never_imports_the_tools_or_the_cli():
    edges = import_graph()
    offline = (f"{PKG}.tools", f"{PKG}.cli")
    library = [m for m in edges if not m.startswith(offline) and not m.startswith(f"{PKG}.testing")]
    for module in library:
        bad = {t for t in edges[module] if t.startswith(offline)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_ground_floor_imports_nothing_of_the_package():
    edges = import_graph()
    assert not edges[f"{PKG}.layer"], f"layer.py imports {sorted(edges[f'{PKG}.layer'])}"
    readers = {m for m, targets in edges.items() if f"{PKG}.layer" in targets}
    assert {f"{PKG}.runtime.engine", f"{PKG}.compiler.passes.match", f"{PKG}.kernels.reference"} <= readers
