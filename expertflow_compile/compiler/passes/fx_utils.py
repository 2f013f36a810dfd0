"""Small FX helpers shared by the passes: values, reachability, op identity, subgraphs."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

__all__ = [
    "node_value", "tensor_meta", "ancestors", "descendants", "is_op", "call_name",
    "extract_subgraph", "input_nodes_of",
]


def node_value(node: fx.Node):
    """The example/fake value Dynamo (or a pass) recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta.get("example_value", meta.get("val"))


def tensor_meta(node) -> torch.Tensor | None:
    v = node_value(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _node_args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def ancestors(nodes: Iterable[fx.Node], stop: set[fx.Node] | None = None) -> set[fx.Node]:
    """All nodes that ``nodes`` depend on (not including themselves), not walking past ``stop``."""
    stop = stop or set()
    seen: set[fx.Node] = set()
    work = [a for n in nodes for a in _node_args(n)]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            work.extend(_node_args(n))
    return seen


def descendants(nodes: Iterable[fx.Node], limit: set[fx.Node] | None = None) -> set[fx.Node]:
    """All nodes that depend on ``nodes`` (not including themselves), optionally within ``limit``."""
    seen: set[fx.Node] = set()
    work = [u for n in nodes for u in n.users]
    while work:
        n = work.pop()
        if n in seen or (limit is not None and n not in limit):
            continue
        seen.add(n)
        work.extend(n.users)
    return seen


def call_name(node: fx.Node) -> str:
    """A readable, stable name for what ``node`` calls (``"torch.topk"``, ``"method:add_"``...)."""
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op == "call_function":
        t = node.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(t.name() if hasattr(t, "name") else t)
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        if t in (operator.getitem, operator.mul, operator.add, operator.truediv, operator.floordiv,
                 operator.setitem, operator.matmul, operator.itruediv, operator.iadd, operator.imul,
                 operator.sub):
            return f"operator.{name}"
        return f"{mod}.{name}" if mod else name
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def is_op(node: fx.Node, *names: str) -> bool:
    """Whether ``node`` calls one of ``names`` (matched on the end of :func:`call_name`).

    ``"topk"`` matches ``torch.topk`` and ``method:topk``; ``"method:add_"`` only the method.
    """
    if node.op not in ("call_function", "call_method"):
        return False
    cname = call_name(node)
    for name in names:
        if cname == name or cname.endswith("." + name) or cname == f"method:{name}":
            return True
        if cname.endswith("::" + name) or cname.split("::")[-1].split(".")[0] == name:
            return True
    return False


def input_nodes_of(region: set[fx.Node]) -> list[fx.Node]:
    """Nodes outside ``region`` that nodes inside it read, in graph order."""
    ext: dict[fx.Node, None] = {}
    for n in region:
        for a in _node_args(n):
            if a not in region:
                ext[a] = None
    if not ext:
        return []
    order = {n: i for i, n in enumerate(next(iter(ext)).graph.nodes)}
    return sorted(ext, key=order.__getitem__)


def extract_subgraph(
    region: Iterable[fx.Node], inputs: list[fx.Node], output: fx.Node | tuple[fx.Node, ...],
) -> fx.GraphModule:
    """Copy ``region`` (in graph order) into a new GraphModule whose placeholders are
    ``inputs`` (in that order) and whose output is ``output``."""
    region = set(region)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"in_{i}_{n.name}")
    any_node = next(iter(region)) if region else inputs[0]
    for n in any_node.graph.nodes:
        if n in region and n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    outs = output if isinstance(output, tuple) else (output,)
    g.output(tuple(env[o] for o in outs) if isinstance(output, tuple) else env[output])
    return fx.GraphModule(torch.nn.Module(), g)
