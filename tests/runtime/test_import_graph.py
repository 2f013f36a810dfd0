"""The runtime reads top-down: no import circle, prediction imports nothing of the engine.

Every ``import`` of a runtime module by another (module level or inside a function, which
is a dependency too) is an edge; the graph must be acyclic and layered as the engine's
module docstring says.
"""

import ast
import importlib
import pathlib

import expertflow_compile.runtime as runtime
from helpers import find_cycle

ROOT = pathlib.Path(runtime.__file__).parent
PKG = "expertflow_compile.runtime"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PKG, *parts])


def _resolve(module: str, is_pkg: bool, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    names = [target]
    for a in node.names:        # "from . import x" imports the submodule x
        names.append(f"{target}.{a.name}")
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, path.name == "__init__.py", node):
                    if target in modules and target != name:
                        edges[name].add(target)
    return edges


def test_no_import_circle_in_the_runtime():
    edges = _graph()
    assert f"{PKG}.engine" in edges and f"{PKG}.prediction.path" in edges   # the walk sees the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_prediction_and_lower_layers_do_not_import_the_engine():
    edges = _graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in edges[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    top = {f"{PKG}.engine"}
    for name in edges:
        if name in top or name == PKG:
            continue
        assert not reach(name) & {f"{PKG}.engine"}, f"{name} reaches the engine"
    for name in (n for n in edges if n.startswith(f"{PKG}.prediction")):
        assert not reach(name) & {f"{PKG}.cache", f"{PKG}.policies", f"{PKG}.pool"}, \
            f"{name} depends on the cache"
    # the engine stands on all of them
    assert {f"{PKG}.cache", f"{PKG}.prediction", f"{PKG}.registry"} <= reach(f"{PKG}.engine")


def test_every_runtime_module_imports_on_its_own():
    for name in sorted(_graph()):
        importlib.import_module(name)


def test_one_list_of_policy_names():
    from expertflow_compile import config
    from expertflow_compile.runtime import cache, policies

    assert config.POLICIES is policies.POLICIES is cache.VALID_POLICIES
