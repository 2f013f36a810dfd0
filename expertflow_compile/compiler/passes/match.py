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
reason (:class:`.region.NoMatch`): region bounding (``region.py``: ``_bound_region``, the
nodes the rewrite replaces), the expert GEMMs (``expert_gemms.py``: ``_expert_gemms``,
weights, biases, a separate up projection; ``_dispatch_kind``, layouts), the routing
(``routing.py``: ``_routed_inputs``, hidden/ids/weights; ``_routing``, the router behind
them) and, here, the experts' math (``_gating``, ``_weighting``). The layer number it proposes comes from the
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
from .expert_gemms import (
    _dispatch_kind, _ExpertGemms, _expert_gemms, _find_gemms, _Gemm, _gemm_input, _gemm_output, _layout, _up_t,
)
from .fx_utils import ancestors, descendants, extract_subgraph, input_nodes_of, is_op, tensor_meta
from .region import (
    NoMatch, NotRouted, _bound_region, _const_math, _describe_fn, _extract_fn, _number, _order, _scope_of,
    _segment, _strip,
)
from .routing import _routed_inputs, _routing

__all__ = ["MoEBlock", "Unmatched", "MatchResult", "find_moe_blocks"]


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


# ----- the experts' math, and the composition: one (up, down) GEMM pair -> one MoEBlock -----

def _gating(experts: _ExpertGemms, region: set[fx.Node]) -> tuple[Callable, set[fx.Node]]:
    """(gate_fn, its nodes): the function between the up and the down projection."""
    d_in = _gemm_input(experts.down)
    gate_seg = _segment(experts.up_out, d_in, region, experts.bias_nodes)
    up2 = experts.up2
    if up2 is not None:
        up2_out = _gemm_output(up2)
        gate_seg |= _segment(up2_out, d_in, region, experts.bias_nodes)
    if not gate_seg:
        raise NoMatch("no gating/activation between the two projections")
    if up2 is None:
        return _extract_fn(experts.up_out, d_in, gate_seg, "gating function"), gate_seg
    bad = [n for n in input_nodes_of(gate_seg) if n not in (experts.up_out, up2_out)]
    if bad:
        raise NoMatch(f"the gating function reads more than the projection outputs: {[n.name for n in bad]}")
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
            raise NoMatch("no routing-weight multiply after the down projection (nor on the experts' "
                          "input rows)")
        prescale, post_fn = True, None
        if _segment(down_out, output, region, skip) - _combine_nodes(down_out, output, region):
            raise NoMatch("the pre-scaled experts' outputs go through more than a sum over top-k")
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
            raise NoMatch(f"the experts read parameters {stray} outside their post-expert function")
    return prescale, post_fn


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


def _match_pair(up: _Gemm, down: _Gemm, gemms: list[_Gemm] = ()) -> MoEBlock:
    """The MoE block whose experts are the ``up`` -> ``down`` GEMM pair (or NoMatch)."""
    scope, region, output = _bound_region(up.node, down.node)
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
        except NotRouted:   # the scope's other GEMMs (e.g. a third projection) are not experts either
            scope = _scope_of(g.node)
            used.update(x.node for x in gemms if _scope_of(x.node) == scope)
            continue
        except NoMatch as exc:
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
