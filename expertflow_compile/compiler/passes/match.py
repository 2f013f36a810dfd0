"""Find the MoE blocks of a Hugging Face model in Dynamo's FX graph.

``find_moe_blocks(gm) -> MatchResult`` recovers, for every MoE layer whose expert
dispatch is in the graph:

* the routing outputs (top-k expert ids and weights), whatever math produced them;
  the routing itself is never rewritten;
* the dispatch region: the nodes from (hidden, ids, weights) to the combined expert
  output, which the rewrite replaces;
* the experts: 3-D weight placeholders, biases, layout (transposed or not) and the
  family's gating function, extracted from the graph as a small GraphModule.

It works from the graph's structure: 3-D [E, ...] weight placeholders consumed by
grouped/batched matmuls, a top-k over a router linear with an [E, H] weight, and the
data flow between them. Dynamo's module-scope metadata only bounds the region; every
structural fact is re-checked, and anything unexpected leaves the block untouched
with the reason in ``MatchResult.unmatched``.

``find_moe_blocks`` pairs each expert GEMM with the next one in its module and hands the
pair to ``_match_pair``, which composes one function per concern, each refusing with its
reason: ``_bound_region`` (the nodes the rewrite replaces), ``_expert_gemms`` (weights,
biases, a separate up projection), ``_routed_inputs`` (hidden, ids, weights),
``_routing`` (the router behind them), ``_gating`` and ``_weighting`` (the experts'
math), ``_dispatch_kind`` (layouts). The layer number it proposes comes from the
weights' names (:func:`expertflow_compile.layer.layer_index`), else graph order; the
pipeline's bind pass decides the final number against the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...layer import TENSOR_ORDER, ExpertList, ExpertMath, LayerPlan, SplitGate, layer_index
from .fx_utils import (
    ancestors, call_name, descendants, extract_subgraph, input_nodes_of, is_op, node_value,
    tensor_meta,
)

__all__ = ["MoEBlock", "Unmatched", "MatchResult", "find_moe_blocks"]

GEMM_OPS = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback", "bmm", "matmul")
# ops a weight goes through between its placeholder and a GEMM
_WEIGHT_VIEW_OPS = ("transpose", "t", "to", "contiguous", "type", "float", "bfloat16", "half", "getitem")
# ops that turn a 2-D [E*N, K] parameter into the [E, N, K] expert view (DBRX)
_EXPERT_VIEW_OPS = ("view", "reshape", "_unsafe_view")
# ops that keep the identity of a top-k id tensor
_IDS_VIEW_OPS = ("reshape", "view", "to", "contiguous", "long", "int", "clone", "flatten")
_INPLACE_ADD = ("method:add_", "operator.iadd")


@dataclass
class MoEBlock:
    """One matched MoE layer (see the module docstring).

    The expert weights: ``up_weight`` is the first projection of the rows (gate and up
    fused, or the gate alone when ``up2_weight``, the separate up projection, is given:
    DBRX), ``down_weight`` the second; ``TENSOR_ORDER`` is the order of these tensors in
    every list of them (:data:`expertflow_compile.layer.TENSOR_ORDER`)."""

    layer: int
    scope: str
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    output: fx.Node
    region: set[fx.Node]
    up_weight: fx.Node
    down_weight: fx.Node
    up_bias: fx.Node | None
    down_bias: fx.Node | None
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    math: ExpertMath
    rows_dtype: torch.dtype
    out_features: int
    dispatch: str
    routing: str
    activation: str
    router_weight: fx.Node | None = None
    layout: str = ""
    router: fx.Node | None = None    # the router linear (its logits feed the routing math)
    up2_weight: fx.Node | None = None   # a separate up projection (gate and up not fused: DBRX)
    views: dict[str, tuple] = field(default_factory=dict)   # name -> [E, N, K] view of a 2-D weight
    lists: dict[str, list[fx.Node]] = field(default_factory=dict)   # name -> one placeholder per expert

    TENSOR_ORDER = TENSOR_ORDER   # the order of the expert tensors: up, down, up_bias, down_bias, up2

    def params(self) -> list[fx.Node]:
        """Every placeholder holding expert weights (a stacked weight's per-expert ones)."""
        out = []
        for name, n in zip(self.TENSOR_ORDER, self.weight_nodes()):
            if n is not None:
                out.extend(self.lists.get(name, [n]))
        return out

    def tensors(self, values: dict, viewed: bool = False) -> list:
        """The expert tensors in ``TENSOR_ORDER`` (None where absent), from placeholder
        ``values``: an ExpertList where the experts are one parameter each; with
        ``viewed``, 2-D parameters viewed as [E, N, K]."""
        out = []
        for name, node in zip(self.TENSOR_ORDER, self.weight_nodes()):
            if name in self.lists:
                out.append(ExpertList([values[m] for m in self.lists[name]]))
                continue
            t = values.get(node) if node is not None else None
            out.append(t.view(self.views[name]) if viewed and t is not None and name in self.views else t)
        return out

    def weight_nodes(self) -> list[fx.Node | None]:
        """The expert weight placeholders in ``TENSOR_ORDER``, None where absent."""
        return [self.up_weight, self.down_weight, self.up_bias, self.down_bias, self.up2_weight]

    def plan(self) -> LayerPlan:
        """The layer as the engine runs it (under the block's current ``layer`` number)."""
        return LayerPlan(
            layer=self.layer, num_experts=self.num_experts, top_k=self.top_k, hidden_size=self.hidden_size,
            math=self.math, rows_dtype=self.rows_dtype, out_features=self.out_features,
            has_up_bias=self.up_bias is not None, has_down_bias=self.down_bias is not None,
            has_up2=self.up2_weight is not None, views=tuple(sorted(self.views.items())),
        )

    def weight_names(self) -> list[str]:
        """The expert weights' placeholder names, for reports (a per-expert list as a range)."""
        names = []
        for name, node in zip(self.TENSOR_ORDER, self.weight_nodes()):
            members = self.lists.get(name)
            if members:
                names.append(f"{members[0].target} .. {members[-1].target} ({len(members)} tensors)")
            elif node is not None:
                names.append(str(node.target))
        return names


@dataclass
class Unmatched:
    """Something that looks like an MoE layer but was left untouched, and why."""

    layer: int | None
    where: str
    reason: str


@dataclass
class MatchResult:
    blocks: list[MoEBlock] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)


class _NoMatch(Exception):
    pass


class _NotRouted(_NoMatch):
    """3-D weights used by batched matmuls without routing (e.g. shared experts run on
    every token): not an MoE dispatch, so not reported as an unmatched one."""


def _strip(node, ops) -> fx.Node:
    """Follow ``node`` back through its first argument while it calls one of ``ops``."""
    while isinstance(node, fx.Node) and is_op(node, *ops) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _weight_source(arg) -> tuple[fx.Node, bool, bool, tuple | None] | None:
    """(expert weight placeholder, went through a transpose, was indexed by ids, the
    [E, N, K] view of a 2-D placeholder or None) for a GEMM operand."""
    transposed = indexed = False
    view = None
    node = arg
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_op(node, "stack") and _stacked_params(node) is not None:
            break     # one 2-D parameter per expert, stacked (ModuleDict experts): the stack stands for them
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if is_op(node, *_EXPERT_VIEW_OPS) and view is None:
            inner, out = tensor_meta(node.args[0]), tensor_meta(node)
            if (node.args[0].op != "placeholder" or not _is_param(node.args[0]) or inner is None
                    or out is None or inner.dim() != 2
                    or out.dim() != 3 or inner.numel() != out.numel() or out.shape[-1] != inner.shape[-1]):
                return None
            view = tuple(int(d) for d in out.shape)
        elif not is_op(node, *_WEIGHT_VIEW_OPS):
            return None
        if is_op(node, "transpose", "t"):
            transposed = not transposed
        if is_op(node, "getitem"):
            indexed = True
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    v = tensor_meta(node)
    if v is None or not v.is_floating_point() or v.dim() != (2 if view is not None else 3):
        return None
    return node, transposed, indexed, view


def _stacked_params(node: fx.Node) -> list[fx.Node] | None:
    """The per-expert 2-D parameter placeholders of ``torch.stack([...], dim=0)``, or None."""
    members = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 0 or not isinstance(members, (list, tuple)) or len(members) < 2:
        return None
    for m in members:
        v = tensor_meta(m) if isinstance(m, fx.Node) else None
        if v is None or m.op != "placeholder" or not _is_param(m) or v.dim() != 2 or not v.is_floating_point():
            return None
    return list(members)


def _is_param(node: fx.Node) -> bool:
    """A module parameter placeholder (Dynamo names them ``..._parameters_<name>_``), not an
    activation that merely has a 2-D shape."""
    return "_parameters_" in str(node.target) or isinstance(node.meta.get("example_value"), torch.nn.Parameter)


@dataclass
class _Gemm:
    node: fx.Node
    weight: fx.Node
    weight_transposed_view: bool   # the op saw weight.transpose(-2, -1)
    activation_operand: fx.Node
    weight_is_left: bool           # bmm(W, x): W @ x
    view: tuple | None = None      # [E, N, K] view of a 2-D [E*N, K] parameter


def _find_gemms(graph: fx.Graph) -> list[_Gemm]:
    gemms = []
    for n in graph.nodes:
        if not is_op(n, *GEMM_OPS) or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        src_b, src_a = _weight_source(b), _weight_source(a)
        if src_b is not None and isinstance(a, fx.Node):
            gemms.append(_Gemm(n, src_b[0], src_b[1], a, False, src_b[3]))
        elif src_a is not None and isinstance(b, fx.Node):
            gemms.append(_Gemm(n, src_a[0], src_a[1], b, True, src_a[3]))
    return gemms


def _is_size(node: fx.Node) -> bool:
    return isinstance(node_value(node), (int, torch.SymInt)) and not isinstance(node_value(node), bool)


def _scope_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path)


def _in_scope(node: fx.Node, scope: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(str(v[0]) == scope for v in stack.values())


def _gemm_output(g: _Gemm) -> fx.Node:
    """The [S, N] result of a GEMM (bmm results are [S, 1, N] squeezed back)."""
    node = g.node
    users = list(node.users)
    if is_op(node, "bmm", "matmul") and len(users) == 1 and is_op(users[0], "squeeze", "view", "reshape"):
        return users[0]
    return node


def _gemm_input(g: _Gemm) -> fx.Node:
    """The [S, K] activation rows fed to a GEMM (bmm's unsqueeze removed)."""
    x = g.activation_operand
    if is_op(x, "unsqueeze", "view", "reshape") and isinstance(x.args[0], fx.Node):
        v, inner = tensor_meta(x), tensor_meta(x.args[0])
        if v is not None and inner is not None and v.dim() == inner.dim() + 1:
            return x.args[0]
    return x


def _bias_of(out: fx.Node, region: set[fx.Node]) -> tuple[fx.Node | None, set[fx.Node]]:
    """An in-place ``out += bias_param[ids]`` on a GEMM result: (bias placeholder, nodes)."""
    bias, nodes = None, set()
    for u in out.users:
        if u in region and call_name(u) in _INPLACE_ADD and u.args[0] is out:
            sel = u.args[1]
            if isinstance(sel, fx.Node) and is_op(sel, "getitem") and isinstance(sel.args[0], fx.Node):
                src = _strip(sel.args[0], ("to", "type"))
                v = tensor_meta(src)
                if src.op == "placeholder" and v is not None and v.dim() == 2:
                    if bias is not None:
                        raise _NoMatch("two bias additions on one expert projection")
                    bias, nodes = src, {u, sel}
                    continue
            raise _NoMatch(f"in-place add on an expert projection that is not a per-expert bias ({u.name})")
    return bias, nodes


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
        raise _NoMatch(f"the {what} reads more than the projection output: {[n.name for n in bad]}")
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


def _routing_description(ids: fx.Node, weights: fx.Node, router: fx.Node | None) -> str:
    region = ancestors([ids, weights]) | {ids, weights}
    if router is not None:
        region &= descendants([router]) | {router}
    ops = {call_name(n).split(".")[-1].replace("method:", "") for n in region}
    topks = sum(1 for n in region if is_op(n, "topk"))
    parts = ["linear"]
    if "sigmoid" in ops:
        parts.append("sigmoid")
    if "softmax" in ops and not _softmax_after_topk(region):
        parts.append("softmax")
    if any(is_op(n, "add") and any(isinstance(a, fx.Node) and a.op == "placeholder" and
                                    (tensor_meta(a) is not None and tensor_meta(a).dim() == 1)
                                    for a in n.args) for n in region):
        parts.append("correction bias")
    if topks > 1 or "scatter_" in ops or "masked_fill" in ops:
        parts.append("group-limited top-k")
    elif not topks and "argmax" in ops:
        parts.append("argmax (top-1)")
    else:
        parts.append("top-k")
    if "cumsum" in ops:
        parts.append("capacity mask")
    if _softmax_after_topk(region):
        parts.append("softmax over top-k")
    if "gather" in ops:
        parts.append("gather scores")
    if any(is_op(n, "truediv", "itruediv", "div", "div_") for n in region):
        parts.append("renormalize")
    if any(is_op(n, "mul") and any(isinstance(a, float) for a in n.args) for n in region):
        parts.append("scale")
    return " -> ".join(parts)


def _softmax_after_topk(region: set[fx.Node]) -> bool:
    for n in region:
        if is_op(n, "softmax"):
            if any(is_op(a, "topk") for a in ancestors([n]) & region):
                return True
    return False


def _find_router(ids: fx.Node, num_experts: int) -> tuple[fx.Node | None, fx.Node, fx.Node]:
    """(top-k node or None, router linear, router weight placeholder) behind the ids.

    The ids must be computed from a linear over an [E, H] weight (the router); a
    top-k is the usual selection but not required (PhiMoE's sparsemixer selects by
    argmax and masking).
    """
    src = _strip(ids, _IDS_VIEW_OPS)
    topk = None
    if is_op(src, "getitem") and src.args[1] == 1 and isinstance(src.args[0], fx.Node) and is_op(src.args[0], "topk"):
        topk = src.args[0]
    candidates = []
    for a in sorted(ancestors([ids]), key=lambda n: -_order(n)):
        if is_op(a, "linear", "matmul", "mm") and len(a.args) >= 2 and isinstance(a.args[1], fx.Node):
            w = _strip(a.args[1], ("to", "type", "float", "t", "transpose"))
            v = tensor_meta(w)
            if w.op == "placeholder" and v is not None and v.dim() == 2 and v.shape[0] >= num_experts:
                candidates.append((a, w, v.shape[0]))
    # exactly E rows first; more rows: scores of shared experts from the same router (Inkling)
    for a, w, rows in sorted(candidates, key=lambda c: c[2] != num_experts):
        if rows == num_experts or any(is_op(u, "topk", "argmax") for u in descendants([a])):
            return topk, a, w
    raise _NoMatch(f"the expert ids ({ids.name}) are not computed from a router linear over an [E, H] weight")


def _hash_table(ids: fx.Node) -> fx.Node | None:
    """Hash routing (DeepSeek-V4's first layers): the ids are rows of a fixed integer
    [vocab, k] table looked up by token ids. The table placeholder, or None."""
    src = _strip(ids, _IDS_VIEW_OPS)
    if is_op(src, "getitem") and isinstance(src.args[0], fx.Node):
        table = _strip(src.args[0], ("to", "long", "int"))
        v = tensor_meta(table)
        if table.op == "placeholder" and v is not None and v.dim() == 2 and not v.is_floating_point():
            return table
    return None


def _find_weights_router(weights: fx.Node, num_experts: int) -> tuple[fx.Node, fx.Node]:
    """(router linear, [E, H] weight) behind the routing weights."""
    for a in sorted(ancestors([weights]), key=lambda n: -_order(n)):
        if is_op(a, "linear", "matmul", "mm") and len(a.args) >= 2 and isinstance(a.args[1], fx.Node):
            w = _strip(a.args[1], ("to", "type", "float", "t", "transpose"))
            v = tensor_meta(w)
            if w.op == "placeholder" and v is not None and v.dim() == 2 and v.shape[0] == num_experts:
                return a, w
    raise _NoMatch("the routing weights do not come from a router linear over an [E, H] weight")


def _order(n: fx.Node) -> int:
    return n.meta.setdefault("_ef_order", 0)


def _number(graph: fx.Graph) -> None:
    for i, n in enumerate(graph.nodes):
        n.meta["_ef_order"] = i


def _up_t(g: _Gemm) -> bool:
    """Whether the stored up weight is [in, out] per expert (see ``_match_pair``)."""
    return (not g.weight_is_left) if is_op(g.node, "bmm", "matmul") else (not g.weight_transposed_view)


def _shape(g: _Gemm) -> tuple:
    return g.view if g.view is not None else tuple(tensor_meta(g.weight).shape)


def _second_up(up: _Gemm, down: _Gemm, region: set[fx.Node], gemms: list[_Gemm]) -> _Gemm | None:
    """A second expert GEMM on the same rows as ``up`` (separate gate and up weights)."""
    def source(g):   # grouped_mm casts its input per call: the same rows, two .to() nodes
        return _strip(_gemm_input(g), ("to", "contiguous", "type"))

    rows = source(up)
    for g in gemms:
        if g is up or g is down or g.node not in region or g.weight is up.weight:
            continue
        if source(g) is rows and g.node.target is up.node.target and g.weight_is_left == up.weight_is_left:
            return g
    return None


# ----- one (up, down) GEMM pair -> one MoEBlock ------------------------------------------
# _match_pair composes four concerns, each raising _NoMatch with the reason it refuses:
# the region (what the rewrite replaces), the expert GEMMs (weights, biases, layouts),
# the routed inputs and their router, and the experts' math (gating, weighting).


def _bound_region(up: _Gemm, down: _Gemm) -> tuple[str, set[fx.Node], fx.Node]:
    """(scope, region, output): the nodes of the experts' module that the rewrite replaces,
    bounded by Dynamo's module-scope metadata, with exactly one output."""
    scope = _scope_of(up.node)
    if scope is None:
        raise _NoMatch("the graph carries no module-scope metadata to bound the dispatch region")
    graph = up.node.graph
    region = {n for n in graph.nodes if n.op not in ("placeholder", "output") and _in_scope(n, scope)}
    if down.node not in region:
        raise _NoMatch("the two expert projections are in different modules")
    # size arithmetic (SymInts under dynamic shapes) computed here may be shared with
    # later code: it stays in the graph, as long as it does not read the experts' tensors
    shared_sizes = [n for n in region if _is_size(n) and any(u not in region for u in n.users)]
    keep = set(shared_sizes) | {a for a in ancestors(shared_sizes) if a in region}
    if any(not _is_size(n) for n in keep):
        raise _NoMatch("size arithmetic shared with later code depends on the experts' tensors")
    region -= keep
    outs = [n for n in region if any(u not in region for u in n.users)]
    if len(outs) != 1:
        raise _NoMatch(f"the dispatch region has {len(outs)} outputs ({[n.name for n in outs]}), expected 1")
    return scope, region, outs[0]


@dataclass
class _ExpertGemms:
    """The expert projections of one block as the graph holds them."""

    up: _Gemm
    down: _Gemm
    up2: _Gemm | None               # a separate up projection (the first one is then the gate)
    up_shape: tuple
    down_shape: tuple
    up_out: fx.Node
    down_out: fx.Node
    up_bias: fx.Node | None
    down_bias: fx.Node | None
    bias_nodes: set[fx.Node]        # the in-place bias additions (not part of any extracted function)
    lists: dict[str, list[fx.Node]]   # name -> one 2-D parameter per expert (stacked in the graph)
    params: set[fx.Node]            # every placeholder holding expert weights

    @property
    def num_experts(self) -> int:
        return self.down_shape[0]


def _expert_gemms(up: _Gemm, down: _Gemm, region: set[fx.Node], gemms: list[_Gemm]) -> _ExpertGemms:
    """The expert weights, biases and separate up projection of the (up, down) pair."""
    up2 = _second_up(up, down, region, gemms)
    up_shape, down_shape = _shape(up), _shape(down)
    if up2 is not None and (_shape(up2) != up_shape or up2.weight_transposed_view != up.weight_transposed_view):
        raise _NoMatch("the two up projections (gate and up) have different shapes or layouts")
    if up_shape[0] < down_shape[0]:
        raise _NoMatch("up and down expert weights disagree on the number of experts")
    # more up rows than down rows: rows for identity ("zero") experts that never run
    # their weights (LongCat-Flash); the ids the experts see must stay below E, which
    # the block check confirms on real inputs and grouped_gemm checks at every call
    up_out, down_out = _gemm_output(up), _gemm_output(down)
    b_up, up_bias_nodes = _bias_of(up_out, region)
    b_down, down_bias_nodes = _bias_of(down_out, region)
    params = {up.weight, down.weight, b_up, b_down} | ({up2.weight} if up2 is not None else set())
    lists = {name: _stacked_params(g.weight) for name, g in (("up", up), ("down", down))
             if is_op(g.weight, "stack")}
    if lists and (up2 is not None or len(lists) != 2):
        raise _NoMatch("only some expert weights are per-expert tensors")
    params |= {m for members in lists.values() for m in members}
    return _ExpertGemms(up, down, up2, up_shape, down_shape, up_out, down_out, b_up, b_down,
                        up_bias_nodes | down_bias_nodes, lists, params)


def _routed_inputs(region: set[fx.Node], output: fx.Node, experts: _ExpertGemms, scope: str):
    """(hidden, ids, weights, consts): what flows into the experts besides their weights,
    told apart by dtype and shape; ``consts`` are 1-D parameters the experts' own
    elementwise math reads (a post-expert norm's weight)."""
    ext = input_nodes_of(region)
    tensors = [n for n in ext if tensor_meta(n) is not None and n not in experts.params]
    others = [n for n in ext if tensor_meta(n) is None and not isinstance(node_value(n), (int, torch.SymInt))]
    if others:
        raise _NoMatch(f"the dispatch region reads non-tensor values {[n.name for n in others]}")
    consts = {n for n in tensors if n.op == "placeholder" and tensor_meta(n).is_floating_point()
              and tensor_meta(n).dim() == 1 and _real_param(n) is not None}
    tensors = [n for n in tensors if n not in consts]
    ints = [n for n in tensors if not tensor_meta(n).is_floating_point()]
    floats = [n for n in tensors if tensor_meta(n).is_floating_point()]
    if not ints:
        raise _NotRouted(f"no expert ids flow into {scope}: dense batched weights, not routed experts")
    if len(ints) != 1 or len(floats) != 2:
        raise _NoMatch(f"expected (hidden, ids, weights) and expert weights into the experts, found "
                       f"{[n.name for n in tensors]} besides the expert weights")
    ids = ints[0]
    ids_v = tensor_meta(ids)
    if ids_v.dim() != 2:
        raise _NoMatch(f"top-k ids {ids.name} are not [tokens, k]")
    weights = [n for n in floats if tuple(tensor_meta(n).shape) == tuple(ids_v.shape)]
    hidden = [n for n in floats if n not in weights]
    if len(weights) != 1 or len(hidden) != 1:
        raise _NoMatch("could not tell the routing weights from the hidden states")
    weights, hidden = weights[0], hidden[0]
    h_v, out_v = tensor_meta(hidden), tensor_meta(output)
    if h_v.dim() != 2 or out_v is None or tuple(out_v.shape) != tuple(h_v.shape) or out_v.dtype != h_v.dtype:
        raise _NoMatch("the experts' output does not have the hidden states' shape and dtype")
    for n in region:   # the region may only mutate its own tensors
        cname = call_name(n)
        if (cname.endswith("_") and not cname.endswith("__")) or cname == "operator.setitem":
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in region:
                raise _NoMatch(f"{n.name} mutates {n.args[0].name}, which lives outside the experts")
    return hidden, ids, weights, consts


@dataclass
class _Routing:
    router: fx.Node | None        # the router linear (None for hash routing: nothing to look ahead with)
    router_weight: fx.Node
    description: str


def _routing(ids: fx.Node, weights: fx.Node, num_experts: int) -> _Routing:
    """The router behind the routed inputs, and a description of the routing math."""
    if _hash_table(ids) is not None:   # hash-routed: no router behind the ids, so no lookahead either
        router, router_w = _find_weights_router(weights, num_experts)
        return _Routing(None, router_w,
                        "hash table[token ids] -> ids; " + _routing_description(weights, weights, router))
    _, router, router_w = _find_router(ids, num_experts)
    if router not in ancestors([weights]):
        raise _NoMatch("the routing weights do not come from the router")
    return _Routing(router, router_w, _routing_description(ids, weights, router))


def _gating(experts: _ExpertGemms, region: set[fx.Node]) -> tuple[Callable, set[fx.Node]]:
    """(gate_fn, its nodes): the function between the up and the down projection."""
    d_in = _gemm_input(experts.down)
    gate_seg = _segment(experts.up_out, d_in, region, experts.bias_nodes)
    up2 = experts.up2
    if up2 is not None:
        up2_out = _gemm_output(up2)
        gate_seg |= _segment(up2_out, d_in, region, experts.bias_nodes)
    if not gate_seg:
        raise _NoMatch("no gating/activation between the two projections")
    if up2 is None:
        return _extract_fn(experts.up_out, d_in, gate_seg, "gating function"), gate_seg
    bad = [n for n in input_nodes_of(gate_seg) if n not in (experts.up_out, up2_out)]
    if bad:
        raise _NoMatch(f"the gating function reads more than the projection outputs: {[n.name for n in bad]}")
    split = int(experts.up_shape[1 if not _up_t(experts.up) else 2])
    return SplitGate(extract_subgraph(gate_seg, [experts.up_out, up2_out], d_in), split), gate_seg


def _weighting(experts: _ExpertGemms, hidden: fx.Node, weights: fx.Node, output: fx.Node,
               region: set[fx.Node], consts: set[fx.Node]) -> tuple[bool, Callable | None]:
    """(prescale, post_fn): where the routing weight multiplies (the experts' output, or
    their input rows) and the function between the down projection and that multiply."""
    down_out, skip = experts.down_out, experts.bias_nodes
    after_down = descendants([down_out], limit=region) | {down_out}
    from_weights = descendants([weights], limit=region)
    mul = None
    for n in sorted(region, key=_order):
        if is_op(n, "mul") and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            a, b = n.args
            if a in after_down and b in from_weights and b not in after_down:
                mul = (n, a)
                break
            if b in after_down and a in from_weights and a not in after_down:
                mul = (n, b)
                break
    post_seg: set[fx.Node] = set()
    if mul is None:
        if _prescale_mul(experts.up, hidden, weights, region) is None:
            raise _NoMatch("no routing-weight multiply after the down projection (nor on the experts' "
                           "input rows)")
        prescale, post_fn = True, None
        if _segment(down_out, output, region, skip) - _combine_nodes(down_out, output, region):
            raise _NoMatch("the pre-scaled experts' outputs go through more than a sum over top-k")
    else:
        prescale = False
        post_seg = _segment(down_out, mul[1], region, skip)
        if post_seg and consts:
            post_seg |= _const_math(consts, region, post_seg)
        post_fn = _extract_fn(down_out, mul[1], post_seg, "post-expert function", consts) if post_seg else None
    if consts:   # the bound parameters may only feed the post-expert function
        stray = [c.name for c in consts if any(u in region and u not in post_seg for u in c.users)
                 or not any(u in post_seg for u in c.users)]
        if stray:
            raise _NoMatch(f"the experts read parameters {stray} outside their post-expert function")
    return prescale, post_fn


def _dispatch_kind(experts: _ExpertGemms, prescale: bool) -> tuple[bool, bool, str]:
    """(up stored [in, out], down stored [in, out], the dispatch's description)."""
    up, down = experts.up, experts.down
    if up.node.target is not down.node.target:
        raise _NoMatch("the two projections use different matmul kinds")
    if is_op(up.node, "bmm", "matmul"):
        up_t, down_t = not up.weight_is_left, not down.weight_is_left
        dispatch = "batched_mm (bmm over gathered expert weights)"
    else:
        up_t, down_t = not up.weight_transposed_view, not down.weight_transposed_view
        dispatch = "grouped_mm" if "fallback" not in call_name(up.node) else "grouped_mm_fallback"
    if prescale:
        dispatch += ", routing weight on the input rows"
    return up_t, down_t, dispatch


def _layout(experts: _ExpertGemms, up_t: bool, down_t: bool) -> str:
    up_shape, down_shape, n = experts.up_shape, experts.down_shape, experts.num_experts
    return (f"up {list(up_shape)}{' transposed' if up_t else ''}"
            f"{f' (first {n} used)' if up_shape[0] > n else ''}, down {list(down_shape)}"
            f"{' transposed' if down_t else ''}"
            + (", biases" if experts.up_bias is not None or experts.down_bias is not None else "")
            + (", gate and up separate" if experts.up2 is not None else "")
            + (", viewed from 2-D [E*N, K] parameters" if any(g.view for g in (experts.up, experts.down)) else "")
            + (", one module per expert" if experts.lists else ""))


def _match_pair(up: _Gemm, down: _Gemm, gemms: list[_Gemm] = ()) -> MoEBlock:
    """The MoE block whose experts are the ``up`` -> ``down`` GEMM pair (or _NoMatch)."""
    scope, region, output = _bound_region(up, down)
    experts = _expert_gemms(up, down, region, gemms)
    hidden, ids, weights, consts = _routed_inputs(region, output, experts, scope)
    routing = _routing(ids, weights, experts.num_experts)
    gate_fn, gate_seg = _gating(experts, region)
    prescale, post_fn = _weighting(experts, hidden, weights, output, region, consts)
    up_t, down_t, dispatch = _dispatch_kind(experts, prescale)
    down_shape = experts.down_shape
    layer = layer_index(up.weight.target if isinstance(up.weight.target, str) else "", scope)
    return MoEBlock(
        layer=layer if layer is not None else -1, scope=scope, hidden=hidden, topk_ids=ids,
        topk_weights=weights, output=output, region=region, up_weight=up.weight,
        down_weight=down.weight, up_bias=experts.up_bias, down_bias=experts.down_bias,
        num_experts=experts.num_experts, top_k=tensor_meta(ids).shape[1], hidden_size=tensor_meta(hidden).shape[-1],
        intermediate_size=down_shape[1] if not down_t else down_shape[2],
        math=ExpertMath(up_transposed=up_t, down_transposed=down_t, gate_fn=gate_fn, post_fn=post_fn,
                        prescale=prescale),
        rows_dtype=tensor_meta(experts.down_out).dtype, out_features=tensor_meta(experts.down_out).shape[-1],
        dispatch=dispatch, routing=routing.description, activation=_describe_fn(gate_seg),
        router_weight=routing.router_weight, layout=_layout(experts, up_t, down_t), router=routing.router,
        up2_weight=experts.up2.weight if experts.up2 is not None else None,
        views={name: g.view for name, g in (("up", up), ("down", down), ("up2", experts.up2))
               if g is not None and g.view is not None},
        lists=experts.lists,
    )


def _prescale_mul(up: _Gemm, hidden: fx.Node, weights: fx.Node, region: set[fx.Node]):
    """Llama-4 style ``expert(w * x)``: the multiply of the experts' input rows by the
    routing weights, on the way into the up projection (None if there is none)."""
    # only reshapes/gathers between: weights -> multiply, hidden -> multiply, multiply -> up GEMM
    moves = ("view", "reshape", "unsqueeze", "to", "getitem", "contiguous", "expand", "repeat_interleave",
             "index_select", "type")
    n = _strip(_gemm_input(up), moves)
    if n not in region or not is_op(n, "mul") or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    def back(x):   # follow the moves back, stopping at the region's inputs
        while isinstance(x, fx.Node) and x not in (weights, hidden) and is_op(x, *moves) and x.args \
                and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        return x

    if {back(x) for x in n.args} == {weights, hidden}:
        return n, None
    return None


def _combine_nodes(down_out: fx.Node, output: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    """Reshapes and sums between the down projection and the block output."""
    ok = ("view", "reshape", "sum", "to", "squeeze", "unsqueeze", "contiguous", "type",
          "getitem", "index_select")   # and the un-permutation back to (token, k) order
    seg = _segment(down_out, output, region, set())
    return {n for n in seg if is_op(n, *ok)}


def _unmatched_routers(graph: fx.Graph, used_routers: set[fx.Node]) -> list[Unmatched]:
    """Routers (top-k over an [E, H] linear) whose experts are not matched in this graph."""
    found, seen = [], set()
    for n in graph.nodes:
        if not is_op(n, "topk", "argmax"):   # argmax: top-1 routers (Switch, NLLB-MoE)
            continue
        for a in ancestors([n]):
            if not is_op(a, "linear") or len(a.args) < 2 or not isinstance(a.args[1], fx.Node):
                continue
            w = _strip(a.args[1], ("to", "type", "float"))
            v = tensor_meta(w)
            if w.op != "placeholder" or v is None or v.dim() != 2 or v.shape[0] > 4096 or v.shape[0] < 2:
                continue
            if a in seen or a in used_routers:
                break
            if re.search(r"attn|attention|indexer|weights_proj", _scope_of(a) or "", re.I):
                break   # a top-k inside attention (sparse-attention indexers and their per-head
                #         weights_proj, traced as a frame of its own) is not a router
            if tensor_meta(a) is None or tensor_meta(a).shape[-1] != v.shape[0]:
                continue
            seen.add(a)
            if _order(a) < _order(n) and _order(n) - _order(a) < 200:
                found.append(Unmatched(
                    layer=layer_index(str(w.target)), where=_scope_of(a) or a.name,
                    reason="router found, but its expert dispatch is not in this graph (a per-expert loop "
                           "that Dynamo splits off runs outside any graph, and this family has no traceable "
                           "form in expertflow_compile/compiler/traceable.py)"))
            break
    return found


def find_moe_blocks(gm: fx.GraphModule) -> MatchResult:
    """Every MoE block of ``gm`` (see the module docstring); never modifies ``gm``."""
    graph = gm.graph
    _number(graph)
    gemms = _find_gemms(graph)
    result = MatchResult()
    used: set[fx.Node] = set()
    tried_routers: set[fx.Node] = set()
    by_node = {g.node: g for g in gemms}
    for g in gemms:
        if g.node in used:
            continue
        later = descendants([g.node])
        scope = _scope_of(g.node)   # both expert projections live in one module (the experts)
        downs = sorted((by_node[n] for n in later if n in by_node and n not in used
                        and by_node[n].weight is not g.weight and _scope_of(n) == scope),
                       key=lambda x: _order(x.node))
        if not downs:
            continue
        down = downs[0]
        used.update({g.node, down.node})
        try:
            block = _match_pair(g, down, gemms)
            result.blocks.append(block)
            used.update(x.node for x in gemms if x.node in block.region)   # e.g. a separate up GEMM
        except _NotRouted:   # the scope's other GEMMs (e.g. a third projection) are not experts either
            scope = _scope_of(g.node)
            used.update(x.node for x in gemms if _scope_of(x.node) == scope)
            continue
        except _NoMatch as exc:
            tried_routers.update(a for a in ancestors([g.node]) if is_op(a, "linear", "matmul", "mm"))
            result.unmatched.append(Unmatched(
                layer=layer_index(str(g.weight.target)), where=_scope_of(g.node) or g.node.name, reason=str(exc)))
    used_routers = set(tried_routers)
    for b in result.blocks:
        for a in ancestors([b.topk_ids]):
            if is_op(a, "linear", "matmul", "mm"):
                used_routers.add(a)
    result.unmatched.extend(_unmatched_routers(graph, used_routers))
    result.blocks.sort(key=lambda b: _order(b.output))
    taken = {b.layer for b in result.blocks if b.layer >= 0}
    fresh = (i for i in range(10**6) if i not in taken)
    for b in result.blocks:   # no layer number in the names: number blocks in graph order
        if b.layer < 0:
            b.layer = next(fresh)
    return result
