"""Region bounding for the matcher: which nodes of the graph one MoE block's rewrite replaces.

The dispatch region of a block is the nodes of the experts' module (Dynamo's module-scope
metadata, ``nn_module_stack``) minus size arithmetic that later code shares; it must
have exactly one output (:func:`_bound_region`). Within a region, :func:`_segment` gives
the nodes between two points, and :func:`_extract_fn` lifts such a segment out as a small
GraphModule (the gating and post-expert functions; parameters it reads are bound by
:class:`ParamBoundFn`).

Also the refusals every concern of the matcher raises: :class:`NoMatch` (left untouched,
reported with its reason) and :class:`NotRouted` (not an MoE dispatch at all). Names with
a leading underscore are private to ``compiler/passes``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import ancestors, call_name, descendants, extract_subgraph, input_nodes_of, is_op, node_value

__all__ = ["NoMatch", "NotRouted", "ParamBoundFn"]


class NoMatch(Exception):
    pass


class NotRouted(NoMatch):
    """3-D weights used by batched matmuls without routing (e.g. shared experts run on
    every token): not an MoE dispatch, so not reported as an unmatched one."""


def _strip(node, ops) -> fx.Node:
    """Follow ``node`` back through its first argument while it calls one of ``ops``."""
    while isinstance(node, fx.Node) and is_op(node, *ops) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_size(node: fx.Node) -> bool:
    return isinstance(node_value(node), (int, torch.SymInt)) and not isinstance(node_value(node), bool)


def _is_param(node: fx.Node) -> bool:
    """A module parameter placeholder (Dynamo names them ``..._parameters_<name>_``), not an
    activation that merely has a 2-D shape."""
    return "_parameters_" in str(node.target) or isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def _scope_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path)


def _in_scope(node: fx.Node, scope: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(str(v[0]) == scope for v in stack.values())


def _order(n: fx.Node) -> int:
    return n.meta.setdefault("_ef_order", 0)


def _number(graph: fx.Graph) -> None:
    for i, n in enumerate(graph.nodes):
        n.meta["_ef_order"] = i


def _segment(start: fx.Node, end: fx.Node, region: set[fx.Node], skip: set[fx.Node]) -> set[fx.Node]:
    """Nodes on the paths ``start`` -> ``end`` (``end`` included, ``start`` not)."""
    if end is start:
        return set()
    down = descendants([start], limit=region)
    up = ancestors([end]) | {end}
    return (down & up) - skip


class ParamBoundFn:
    """A function extracted from the graph that also reads module parameters (Muse-Spark's
    post-expert RMSNorm weight): called on the rows alone, it passes the parameters' real
    tensors (Dynamo's ``grapharg`` of their placeholders) after them."""

    def __init__(self, fn: fx.GraphModule, params: list[torch.Tensor]):
        self.fn, self.params = fn, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *[p if p.device == x.device else p.to(x.device) for p in self.params])


def _real_param(node: fx.Node) -> torch.Tensor | None:
    """The real tensor of a parameter placeholder (None where Dynamo kept none)."""
    arg = node.meta.get("grapharg")
    try:
        t = getattr(arg, "example", None)
    except Exception:   # noqa: BLE001 - a dead weak reference
        return None
    return t if isinstance(t, torch.Tensor) and _is_param(node) else None


def _const_math(consts: set[fx.Node], region: set[fx.Node], seg: set[fx.Node]) -> set[fx.Node]:
    """Region nodes computed from ``consts`` alone (``1 + norm.weight``) that ``seg`` reads."""
    out: set[fx.Node] = set()
    for n in sorted(region, key=_order):
        args = [a for a in n.all_input_nodes]
        if n not in seg and args and all(a in consts or a in out for a in args):
            out.add(n)
    used = ancestors(seg) & out
    return used


def _extract_fn(start: fx.Node, end: fx.Node, seg: set[fx.Node], what: str, consts: set[fx.Node] = frozenset()):
    ext = input_nodes_of(seg)
    bad = [n for n in ext if n is not start and n not in consts]
    if bad:
        raise NoMatch(f"the {what} reads more than the projection output: {[n.name for n in bad]}")
    used = [n for n in ext if n in consts]
    if not used:
        return extract_subgraph(seg, [start], end)
    return ParamBoundFn(extract_subgraph(seg, [start, *used], end), [_real_param(n) for n in used])


def _describe_fn(seg: set[fx.Node]) -> str:
    names = []
    for n in seg:
        c = call_name(n).split(".")[-1].replace("method:", "")
        if c not in ("getitem", "to", "chunk", "float") and c not in names:
            names.append(c)
    return "+".join(sorted(names)) or "identity"


def _bound_region(up: fx.Node, down: fx.Node) -> tuple[str, set[fx.Node], fx.Node]:
    """(scope, region, output) for the expert GEMM nodes ``up`` -> ``down``: the nodes of the
    experts' module that the rewrite replaces,
    bounded by Dynamo's module-scope metadata, with exactly one output."""
    scope = _scope_of(up)
    if scope is None:
        raise NoMatch("the graph carries no module-scope metadata to bound the dispatch region")
    graph = up.graph
    region = {n for n in graph.nodes if n.op not in ("placeholder", "output") and _in_scope(n, scope)}
    if down not in region:
        raise NoMatch("the two expert projections are in different modules")
    # size arithmetic (SymInts under dynamic shapes) computed here may be shared with
    # later code: it stays in the graph, as long as it does not read the experts' tensors
    shared_sizes = [n for n in region if _is_size(n) and any(u not in region for u in n.users)]
    keep = set(shared_sizes) | {a for a in ancestors(shared_sizes) if a in region}
    if any(not _is_size(n) for n in keep):
        raise NoMatch("size arithmetic shared with later code depends on the experts' tensors")
    region -= keep
    outs = [n for n in region if any(u not in region for u in n.users)]
    if len(outs) != 1:
        raise NoMatch(f"the dispatch region has {len(outs)} outputs ({[n.name for n in outs]}), expected 1")
    return scope, region, outs[0]
