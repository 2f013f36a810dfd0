"""A router chain's ranking form: the few ops that order its logits the same way.

The lookahead predictor only needs the ORDER of a router's logits per token (its top-k),
not their values. A typical chain (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) is

    h -> cast -> x * rsqrt(mean(x^2, -1) + eps) -> cast -> w * x -> view/reshape -> linear(x, W)

eleven small ops per prediction. The RMSNorm's ``rsqrt(...)`` is one positive number per
token, and every op after it up to a bias-free linear is linear in the row (a per-channel
``w *``, casts, reshapes that keep the last dimension), so the logits of the chain equal that
positive number times ``linear(w * h, W)``: the same order, from three ops. Up to rounding
the top-k is the same; a near-tie may rank either way (a prediction, never the routing).

:func:`ranking_form` recognises exactly that shape on the extracted router chain
``fn(h, *params)`` (:mod:`.lookahead`) and answers which of its parameters are the router
weight ``W`` and the per-channel scale ``w`` (None without one), or None for any other chain
(a bias in the linear - GPT-OSS -, a LayerNorm with a bias - PhiMoE -, anything not
listed): the full chain is used there. The runtime builds the ranking router from the
indices (:class:`~expertflow_compile.runtime.prediction.lookahead.RankingRouter`); nothing is
copied, the parameters are the chain's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch.fx as fx

from .fx_utils import call_name, is_op

__all__ = ["RankingForm", "ranking_form"]

_CASTS = ("to", "type", "float")
_SHAPES = ("view", "reshape")


@dataclass(frozen=True)
class RankingForm:
    """``logits ~ linear((h * params[scale]).reshape(-1, hidden), params[weight])`` in order."""

    weight: int                  # index into the chain's params of the router weight W [E, H]
    scale: int | None            # index of the per-channel scale w [H] (None: none)
    hidden: int | None           # the last dimension the chain's reshapes keep (None: no reshape)


def _is_linear(n: fx.Node) -> bool:
    return n.op == "call_function" and call_name(n).split(".")[-1] == "linear"


def _strip_casts(n):
    """The node a run of dtype casts starts from."""
    while isinstance(n, fx.Node) and is_op(n, *_CASTS) and n.op == "call_method" and n.args:
        n = n.args[0]
    return n


def _is_mul(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and call_name(n).split(".")[-1].split(":")[-1] in ("mul", "mul_")


def _row_rsqrt_of(s, x) -> bool:
    """``s`` is ``rsqrt(mean(y ** 2, dim=-1, keepdim=True) + eps)`` with ``eps >= 0`` and ``y``
    the same tensor as ``x`` up to casts: one positive number per row of ``x``."""
    if not isinstance(s, fx.Node) or not is_op(s, "rsqrt") or len(s.args) != 1:
        return False
    add = s.args[0]
    if not isinstance(add, fx.Node) or not is_op(add, "add") or len(add.args) != 2:
        return False
    mean, eps = add.args
    if isinstance(eps, fx.Node):
        mean, eps = eps, mean
    if not isinstance(eps, Number) or eps < 0 or not isinstance(mean, fx.Node) or not is_op(mean, "mean"):
        return False
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims not in (-1, (-1,), [-1]) or keep is not True:
        return False
    sq = mean.args[0]
    if not isinstance(sq, fx.Node) or not is_op(sq, "pow") or len(sq.args) != 2 or sq.args[1] != 2:
        return False
    return _strip_casts(sq.args[0]) is _strip_casts(x)


def ranking_form(gm: fx.GraphModule) -> RankingForm | None:
    """The ranking form of the router chain ``gm`` (``fn(h, *params) -> logits``), or None."""
    nodes = list(gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    if len(ph) < 2 or len(outs) != 1 or not isinstance(outs[0].args[0], fx.Node):
        return None
    params = {n: i - 1 for i, n in enumerate(ph) if i}
    lin = outs[0].args[0]
    if not _is_linear(lin) or len(lin.args) < 2:
        return None
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    if bias is not None:
        return None                     # s * xW + b is not ordered like xW
    weight = params.get(_strip_casts(lin.args[1]))
    if weight is None:
        return None
    scale = hidden = None
    node = lin.args[0]
    for _ in range(32):                 # walk back to h through the ops that commute with a row scale
        if node is ph[0]:
            return RankingForm(weight, scale, hidden)
        if not isinstance(node, fx.Node) or not node.args:
            return None
        if node.op == "call_method" and is_op(node, *_CASTS):
            node = node.args[0]
        elif node.op == "call_method" and is_op(node, *_SHAPES):
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = shape[0]
            last = shape[-1] if shape else None
            if not isinstance(last, int) or last < 1 or hidden not in (None, last):
                return None             # a reshape that may move the last dimension
            hidden = last
            node = node.args[0]
        elif _is_mul(node) and len(node.args) == 2:
            a, b = node.args
            if _row_rsqrt_of(b, a):     # the norm's positive row scale: dropped
                node = a
            elif _row_rsqrt_of(a, b):
                node = b
            elif scale is None and params.get(_strip_casts(a)) is not None and isinstance(b, fx.Node):
                scale, node = params[_strip_casts(a)], b
            elif scale is None and params.get(_strip_casts(b)) is not None and isinstance(a, fx.Node):
                scale, node = params[_strip_casts(b)], a
            else:
                return None
        else:
            return None
    return None
