"""The torch reference implementation of one layer's routed experts.

This is the CPU path of ``expertflow::grouped_gemm`` and the reference the Triton
kernels are tested against. It follows Hugging Face's own expert math step by step
(up projection, optional bias, the family's gating function, down projection,
optional bias, optional post-expert function, routing-weight multiply, combine
over top-k in token order) so that results match the uncompiled model.

Quantized experts (block FP8, MXFP4) arrive compressed, as the cache slot holds them
(``up`` + ``up_scale_inv``, or ``up_blocks`` + ``up_scales``, ... see
:mod:`expertflow_compile.kernels.dequant`); :func:`expert_forward` dequantizes each
weight to the dtype of the rows it multiplies, right before its matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..layer import ExpertMath
from .dequant import expert_weight

__all__ = ["expert_forward", "combine_topk", "combine_topk_inverse", "permute_math", "prescale_rows",
           "grouped_experts_reference"]


def permute_math(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``expertflow::permute`` op's computation: ``order`` (the flattened (token, k) pairs
    grouped by expert, stable within one) and ``offsets`` ([E+1]: expert e owns
    ``order[offsets[e]:offsets[e+1]]``); ids outside ``[0, num_experts)`` are in no expert."""
    flat = topk_ids.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def prescale_rows(rows: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows (in ``order``) multiplied by their routing weight, as a pre-scaling family does."""
    return rows * topk_weights.reshape(-1)[order].unsqueeze(-1).to(rows.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ (w if transposed else w.transpose(-2, -1))


def expert_forward(
    x: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    math: ExpertMath,
) -> torch.Tensor:
    """One expert on its rows ``x`` [S, H]; ``weights`` holds up/down (+ biases) of that expert,
    plain or compressed (then dequantized to ``x``'s dtype here)."""
    up = expert_weight(weights, "up", x.dtype)
    h = _linear(x.to(up.dtype), up, math.up_transposed)
    up2 = expert_weight(weights, "up2", x.dtype)
    if up2 is not None:   # separate gate and up weights: SplitGate takes both
        h = torch.cat([h, _linear(x.to(up.dtype), up2, math.up_transposed)], dim=-1)
    if weights.get("up_bias") is not None:
        h = h + weights["up_bias"]
    h = math.gate_fn(h)
    down = expert_weight(weights, "down", x.dtype)
    y = _linear(h.to(down.dtype), down, math.down_transposed)
    if weights.get("down_bias") is not None:
        y = y + weights["down_bias"]
    if math.post_fn is not None:
        y = math.post_fn(y)
    return y


def combine_topk(
    expert_rows: torch.Tensor,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Weight the expert outputs (rows in ``order``) and sum them per token.

    Mirrors HF: multiply by the routing weight, restore (token, k) order, sum over k.
    """
    num_tokens, top_k = topk_weights.shape
    weighted = expert_rows * topk_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(out_dtype)


def combine_topk_inverse(
    expert_rows: torch.Tensor,
    topk_weights: torch.Tensor,
    inverse: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`combine_topk` given the inverse of ``order`` (``inverse[order[j]] == j``): the rows
    are put back in (token, k) order first, then weighted - elementwise the same products, so
    the same result bit for bit, with one gather instead of a gather and a scatter."""
    num_tokens, top_k = topk_weights.shape
    weighted = expert_rows.index_select(0, inverse) * topk_weights.reshape(-1, 1)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(out_dtype)


def grouped_experts_reference(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    offsets: Iterable[int],
    expert_weights: Callable[[int], Mapping[str, torch.Tensor]],
    math: ExpertMath,
    out_features: int,
    rows_dtype: torch.dtype,
) -> torch.Tensor:
    """All experts of a layer with every expert's weights from ``expert_weights(e)``."""
    offs = list(offsets)
    top_k = topk_weights.shape[-1]
    rows = hidden[order // top_k]
    if math.prescale:
        rows = prescale_rows(rows, topk_weights, order)
    out_rows = torch.zeros(rows.shape[0], out_features, dtype=rows_dtype, device=hidden.device)
    for e in range(len(offs) - 1):
        start, end = offs[e], offs[e + 1]
        if start < end:
            out_rows[start:end] = expert_forward(rows[start:end], expert_weights(e), math)
    return combine_topk(out_rows, torch.ones_like(topk_weights) if math.prescale else topk_weights,
                        order, hidden.dtype)
