"""Shared test helpers: capturing backends, graph op counts, the exactness rule."""

from __future__ import annotations

from expertflow_compile.compiler.backend import expertflow_backend

DISPATCH_OPS = ("grouped_mm_fallback", "_grouped_mm", "grouped_mm", "bmm")


class CapturingBackend:
    """Runs the expertflow backend and keeps every rewritten graph."""

    _expertflow_backend = True   # traceable.py: Dynamo traces the loop-free MoE forms for it

    def __init__(self, options=None):
        self.options = options or {}
        self.graphs = []

    def __call__(self, gm, example_inputs, options=None):
        fn = expertflow_backend(gm, example_inputs, options=options or self.options)
        self.graphs.append(gm)
        return fn


def op_names(gm) -> list[str]:
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            t = n.target
            names.append(t.name() if hasattr(t, "name") and callable(t.name) else getattr(t, "__name__", str(t)))
        elif n.op == "call_method":
            names.append(str(n.target))
    return names


def count(gm, suffix: str) -> int:
    return sum(1 for n in op_names(gm) if n == suffix or n.endswith("::" + suffix) or n.endswith("." + suffix)
               or n.split("::")[-1] == suffix)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_fp32_close(out, ref):
    """fp32 contract: max abs diff <= 1e-5 x max |eager|."""
    scale = ref.float().abs().max().item()
    diff = max_diff(out, ref)
    assert diff <= 1e-5 * scale, f"max |diff| {diff:.3g} > 1e-5 x {scale:.3g}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A circle in an import graph (``module -> modules it imports``) as a path ending where it
    began, or None when the graph is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None
