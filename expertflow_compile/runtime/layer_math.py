"""One MoE layer's routed experts on the torch path, computed per layer.

:func:`layer_forward` runs the experts of one layer call on rows already grouped by
expert: each expert's up projection goes straight into one ``[rows, N_up]`` buffer
(``torch.mm(..., out=)``), the layer's gating runs once over all rows, each expert's down
projection goes into one ``[rows, H]`` buffer, then the post-expert function once. Per
expert that is two matrix products and (with biases) two in-place adds, against a whole
:func:`~expertflow_compile.kernels.reference.expert_forward` (gating included) per expert.

Every operation is the one ``expert_forward`` applies to the expert's rows, and the gating
and post functions are row-wise (they are extracted from the model's own grouped expert
code), so the result is bitwise the same as running ``expert_forward`` expert by expert
(tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..kernels.dequant import expert_weight, is_quantized_name
from ..layer import ExpertMath

__all__ = ["layer_forward"]


def _width(w: torch.Tensor, transposed: bool) -> int:
    return w.shape[-1] if transposed else w.shape[-2]


def _expert_gemms(xs: Sequence[torch.Tensor], weights: Sequence[Mapping], name: str, transposed: bool,
                  outs: Sequence[torch.Tensor]) -> None:
    """``outs[i] = xs[i] @ W_i`` for each expert's ``weights[i][name]`` (stored ``[in, out]`` when
    ``transposed``, else ``[out, in]``); the layout test is made once, not per expert."""
    mm = torch.mm
    if transposed:
        for xi, w, oi in zip(xs, weights, outs):
            mm(xi, w[name], out=oi)
    else:
        for xi, w, oi in zip(xs, weights, outs):
            mm(xi, w[name].t(), out=oi)


def _dequantized(w: Mapping, dtype: torch.dtype) -> dict:
    out = {k: w.get(k) for k in ("up_bias", "down_bias")}
    for name in ("up", "up2", "down"):
        out[name] = expert_weight(w, name, dtype)
    return out


def layer_forward(rows: torch.Tensor, spans: Sequence[tuple[int, int]], weights: Sequence[Mapping],
                  math: ExpertMath) -> torch.Tensor:
    """The experts' output rows ``[N, H]`` for ``rows`` ``[N, K]``: ``rows[a:b]`` belong to
    the expert whose tensors are ``weights[i]`` for ``spans[i] == (a, b)`` (spans cover the
    rows, in order). Compressed experts (FP8 / MXFP4 and their scales) are dequantized to
    ``rows``' dtype first, as ``expert_forward`` does."""
    first = weights[0]
    if any(is_quantized_name(k) for k in first):
        weights = [_dequantized(w, rows.dtype) for w in weights]
        first = weights[0]
    up = first["up"]
    n = rows.shape[0]
    x = rows.to(up.dtype)
    sizes = [b - a for a, b in spans]
    xs = x.split(sizes)
    up_t, down_t = math.up_transposed, math.down_transposed
    n_up = _width(up, up_t)
    up2 = first.get("up2")
    h = torch.empty((n, n_up), dtype=up.dtype, device=rows.device)
    hs = h.split(sizes)
    _expert_gemms(xs, weights, "up", up_t, hs)
    if up2 is not None:   # separate gate and up weights: SplitGate takes both halves
        h2 = torch.empty((n, _width(up2, up_t)), dtype=up.dtype, device=rows.device)
        _expert_gemms(xs, weights, "up2", up_t, h2.split(sizes))
        h = torch.cat([h, h2], dim=-1)
        hs = h.split(sizes)
    if first.get("up_bias") is not None:
        for w, hi in zip(weights, hs):
            hi += w["up_bias"]
    g = math.gate_fn(h)
    down = first["down"]
    g = g.to(down.dtype)
    y = torch.empty((n, _width(down, down_t)), dtype=down.dtype, device=rows.device)
    ys = y.split(sizes)
    _expert_gemms(g.split(sizes), weights, "down", down_t, ys)
    if first.get("down_bias") is not None:
        for w, yi in zip(weights, ys):
            yi += w["down_bias"]
    if math.post_fn is not None:
        y = math.post_fn(y)
    return y
