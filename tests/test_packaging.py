"""A fresh machine has only what pyproject.toml installs: every third-party package the
tests import, directly or through the package, is a dependency or in the ``test`` extra;
the package's own optional imports are guarded; ``.ci/run`` runs the README's test
command in a virtual environment of its own."""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ or the package is not installed here
DIST = {"yaml": "pyyaml", "PIL": "pillow"}
OPTIONAL_IN_PACKAGE = {"matplotlib"}     # imported inside try/except ImportError (bench extra)
# optional packages the package imports that a test needs at run time (not visible in the tests' imports)
NEEDED_BY_TESTS = {"matplotlib": "tests/test_cli.py::test_bench_small_table_json_png checks bench.png"}
# packages transformers imports at run time for what the package does (not visible in any import):
# its FP8 / MXFP4 quantizers' validate_environment refuses to load a pre-quantized release without
# accelerate, so expertflow_compile.from_pretrained of DeepSeek-V3's FP8 or GPT-OSS's MXFP4 needs it
NEEDED_BY_THE_PACKAGE = {"accelerate": "loading pre-quantized releases (transformers' FP8/MXFP4 quantizers)"}


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements) -> set[str]:
    return {re.split(r"[ <>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _third_party_imports(folder: str) -> dict[str, list[str]]:
    """Top-level third-party module names imported anywhere in ``folder``'s .py files."""
    found: dict[str, list[str]] = {}
    local = {"expertflow_compile", "tests", "helpers", "conftest"}
    for root, _dirs, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, []).append(os.path.relpath(path, ROOT))
    return found


def _guarded_imports(folder: str) -> set[str]:
    """Modules imported inside a ``try: ... except ImportError`` block."""
    guarded = set()
    for root, _dirs, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(root, name), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Try) and any(
                            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                            for h in node.handlers):
                        for sub in node.body:
                            for n in ast.walk(sub):
                                if isinstance(n, ast.Import):
                                    guarded.update(a.name.split(".")[0] for a in n.names)
                                elif isinstance(n, ast.ImportFrom) and n.module:
                                    guarded.add(n.module.split(".")[0])
    return guarded


def test_every_package_the_tests_import_is_installed_by_the_test_extra():
    project = _project()
    core = _names(project["dependencies"])
    test = _names(project["optional-dependencies"]["test"])
    missing = {}
    for mod, where in _third_party_imports("tests").items():
        dist = DIST.get(mod, mod).lower().replace("_", "-")
        if dist not in core | test:
            missing[mod] = sorted(set(where))
    for mod, why in NEEDED_BY_TESTS.items():
        if DIST.get(mod, mod) not in test:
            missing[mod] = [why]
    assert not missing, f"imported by tests but not in dependencies or the test extra: {missing}"


def test_what_transformers_needs_for_our_loading_is_a_dependency():
    core = _names(_project()["dependencies"])
    missing = {mod: why for mod, why in NEEDED_BY_THE_PACKAGE.items() if DIST.get(mod, mod) not in core}
    assert not missing, f"needed at run time but not in dependencies: {missing}"


def test_fp8_quantizer_accepts_this_environment():
    """What the CI failure was: transformers' FP8 quantizer checks for accelerate before loading."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    FineGrainedFP8HfQuantizer(FineGrainedFP8Config(dequantize=True)).validate_environment(device_map=None)


def test_the_package_imports_only_its_dependencies_or_guards_the_rest():
    project = _project()
    core = _names(project["dependencies"])
    guarded = _guarded_imports("expertflow_compile")
    bad = {}
    for mod, where in _third_party_imports("expertflow_compile").items():
        dist = DIST.get(mod, mod).lower().replace("_", "-")
        if dist in core:
            continue
        if mod in OPTIONAL_IN_PACKAGE and mod in guarded:
            assert dist in _names(project["optional-dependencies"]["bench"]), mod
            continue
        bad[mod] = sorted(set(where))
    assert not bad, f"the package imports {bad} without declaring or guarding them"


def test_ci_runs_the_readme_test_command_in_its_own_venv():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    marker = next(i for i, line in enumerate(readme) if line.startswith("# the tests (what .ci/run calls)"))
    command = readme[marker + 1].strip()
    assert command.startswith('python3 -m pip install "torch==2.13.0" && ') and "pytest" in command
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert command in [line.strip() for line in ci], "the README's test command is not what .ci/run runs"
    run_at = [line.strip() for line in ci].index(command)
    before = "\n".join(ci[:run_at])
    assert "python3 -m venv" in before and "/bin/activate" in before   # a fresh venv, used by the command


@pytest.mark.parametrize("extra", ["test", "bench"])
def test_extras_named_in_the_readme_exist(extra):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f".[{extra}]" in readme or f"[{extra}]" in readme
    assert extra in _project()["optional-dependencies"]
