"""Where each MoE layer's experts can first be predicted, and how.

For MoE layer L the router's input is ``norm_L(r + attn_L(...))``: the residual
stream ``r`` after the previous layer plus this layer's attention. Applying layer
L's own router chain (its norm and router linear) to ``r`` itself, before layer L's
attention has run, predicts L's experts one attention block ahead (mixtral-offloading's
speculative gating; FACTS.md measured 86% recall with 2 candidates on a trained model,
95% with 3).

``plan_lookahead(blocks) -> {layer: LookaheadSource}`` finds, per block, the residual
node ``r`` and extracts the router chain as a small GraphModule ``fn(h, *params)``, with
its ranking form where it has one (:mod:`.router_rank`: fewer ops, the same order).
Blocks whose router input is not a norm of one residual add are simply left out (the
predict op then sits at the block's own hidden state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .fx_utils import ancestors, descendants, extract_subgraph, input_nodes_of, is_op, tensor_meta
from .match import MoEBlock
from .region import _is_param
from .router_rank import RankingForm, ranking_form

__all__ = ["LookaheadSource", "plan_lookahead"]

_MAX_CHAIN = 40


@dataclass
class LookaheadSource:
    layer: int
    source: fx.Node              # the residual stream before this layer's attention
    fn: fx.GraphModule           # fn(h, *params) -> router logits [tokens, E]
    params: list[fx.Node]        # placeholders the router chain reads (norm weight, router weight)
    ranking: RankingForm | None = None   # the chain's ranking form (.router_rank), None: use fn


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.op != "placeholder" and tensor_meta(a) is not None]


def _residual_add(x: fx.Node) -> fx.Node | None:
    """Walk back from the router input through single-stream ops to the residual add."""
    node = x
    for _ in range(_MAX_CHAIN):
        ins = _tensor_inputs(node)
        if is_op(node, "add") and len(ins) == 2:
            return node
        if not ins:
            return None
        # a norm reads its input more than once (x * rsqrt(mean(x^2))): follow the earliest
        node = min(ins, key=lambda a: a.meta.get("_ef_order", 0))
    return None


def _weight_prep(chain: set, add: fx.Node) -> set:
    """The nodes outside ``chain`` that feed it and compute from module parameters alone
    (DeepSeek-V3's router reads ``weight.type(torch.float32)``): they join the chain, so the
    router chain stays a function of the residual and parameters."""
    out: set = set()
    for n in input_nodes_of(chain):
        if n is add or n.op != "call_method" and n.op != "call_function":
            continue
        up = ancestors([n]) | {n}
        leaves = [a for a in up if a.op == "placeholder"]
        inner = [a for a in up if a.op != "placeholder"]
        if leaves and all(_is_param(a) for a in leaves) and all(a.op in ("call_method", "call_function")
                                                               for a in inner):
            out |= set(inner)
    return out


def _plan_one(block: MoEBlock) -> LookaheadSource | None:
    router = block.router
    if router is None or not router.args or not isinstance(router.args[0], fx.Node):
        return None
    add = _residual_add(router.args[0])
    if add is None:
        return None
    a, b = _tensor_inputs(add)
    if a in ancestors([b]):
        residual = a
    elif b in ancestors([a]):
        residual = b
    else:
        return None
    chain = (ancestors([router]) & descendants([add])) | {router}
    chain |= _weight_prep(chain, add)
    ext = input_nodes_of(chain)
    params = [n for n in ext if n.op == "placeholder" and tensor_meta(n) is not None]
    bad = [n for n in ext if n is not add and n not in params]
    if bad:  # sizes or other activations: not a pure function of the residual
        return None
    r_val, add_val = tensor_meta(residual), tensor_meta(add)
    if r_val is None or add_val is None or tuple(r_val.shape) != tuple(add_val.shape):
        return None
    fn = extract_subgraph(chain, [add] + params, router)
    return LookaheadSource(block.layer, residual, fn, params, ranking_form(fn))


def plan_lookahead(blocks: list[MoEBlock]) -> dict[int, LookaheadSource]:
    plans = {}
    for b in blocks:
        try:
            p = _plan_one(b)
        except Exception:  # noqa: BLE001 - a plan is an optimisation; never fail the compile for it
            p = None
        if p is not None:
            plans[b.layer] = p
    return plans
