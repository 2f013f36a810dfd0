"""The routing side of the matcher: the routed inputs of the experts and the router behind them.

:func:`_routed_inputs` tells (hidden states, top-k ids, routing weights) apart among what
flows into a dispatch region; :func:`_routing` finds the router linear over an ``[E, H]``
weight behind the ids (or a hash table looked up by token ids) and describes the routing
math. The routing itself is never rewritten. Refusals raise :class:`.region.NoMatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .expert_gemms import _ExpertGemms
from .fx_utils import ancestors, call_name, descendants, input_nodes_of, is_op, node_value, tensor_meta
from .region import NoMatch, NotRouted, _order, _real_param, _strip

__all__: list[str] = []


# ops that keep the identity of a top-k id tensor
_IDS_VIEW_OPS = ("reshape", "view", "to", "contiguous", "long", "int", "clone", "flatten")


def _routed_inputs(region: set[fx.Node], output: fx.Node, experts: _ExpertGemms, scope: str):
    """(hidden, ids, weights, consts): what flows into the experts besides their weights,
    told apart by dtype and shape; ``consts`` are 1-D parameters the experts' own
    elementwise math reads (a post-expert norm's weight)."""
    ext = input_nodes_of(region)
    tensors = [n for n in ext if tensor_meta(n) is not None and n not in experts.params]
    others = [n for n in ext if tensor_meta(n) is None and not isinstance(node_value(n), (int, torch.SymInt))]
    if others:
        raise NoMatch(f"the dispatch region reads non-tensor values {[n.name for n in others]}")
    consts = {n for n in tensors if n.op == "placeholder" and tensor_meta(n).is_floating_point()
              and tensor_meta(n).dim() == 1 and _real_param(n) is not None}
    tensors = [n for n in tensors if n not in consts]
    ints = [n for n in tensors if not tensor_meta(n).is_floating_point()]
    floats = [n for n in tensors if tensor_meta(n).is_floating_point()]
    if not ints:
        raise NotRouted(f"no expert ids flow into {scope}: dense batched weights, not routed experts")
    if len(ints) != 1 or len(floats) != 2:
        raise NoMatch(f"expected (hidden, ids, weights) and expert weights into the experts, found "
                      f"{[n.name for n in tensors]} besides the expert weights")
    ids = ints[0]
    ids_v = tensor_meta(ids)
    if ids_v.dim() != 2:
        raise NoMatch(f"top-k ids {ids.name} are not [tokens, k]")
    weights = [n for n in floats if tuple(tensor_meta(n).shape) == tuple(ids_v.shape)]
    hidden = [n for n in floats if n not in weights]
    if len(weights) != 1 or len(hidden) != 1:
        raise NoMatch("could not tell the routing weights from the hidden states")
    weights, hidden = weights[0], hidden[0]
    h_v, out_v = tensor_meta(hidden), tensor_meta(output)
    if h_v.dim() != 2 or out_v is None or tuple(out_v.shape) != tuple(h_v.shape) or out_v.dtype != h_v.dtype:
        raise NoMatch("the experts' output does not have the hidden states' shape and dtype")
    for n in region:   # the region may only mutate its own tensors
        cname = call_name(n)
        if (cname.endswith("_") and not cname.endswith("__")) or cname == "operator.setitem":
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in region:
                raise NoMatch(f"{n.name} mutates {n.args[0].name}, which lives outside the experts")
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
        raise NoMatch("the routing weights do not come from the router")
    return _Routing(router, router_w, _routing_description(ids, weights, router))


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
    raise NoMatch(f"the expert ids ({ids.name}) are not computed from a router linear over an [E, H] weight")


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
    raise NoMatch("the routing weights do not come from a router linear over an [E, H] weight")
