"""Every script in examples/ runs on the shipped model and exits 0 (each checks its own
tokens against the uncompiled model and exits 1 when they differ)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_"))


def test_every_example_is_listed_in_its_readme():
    readme = open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8").read()
    assert SCRIPTS and all(f"`{s}`" in readme for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if script != "inspect_graph.py":
        assert "same tokens as " in done.stdout and ": True" in done.stdout
    else:
        assert "rewritten" in done.stdout
