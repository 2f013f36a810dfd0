"""The lookahead predictor: the coming layers' routers applied to the current hidden state.

At MoE layer ``l`` (its predict op sits before ``l``'s attention, on the residual
stream), the routers of ``l .. l + depth - 1`` (``view.routers``: the router chain each
layer's graph exposes, ``fn(hidden, *params) -> logits``) score ``hidden``; each token
names its top ``k + extra`` experts, and per layer the union is ranked by votes. No
training, nothing stored.

Only the order of a router's logits matters here, so where the compiler found the chain's
ranking form (:mod:`expertflow_compile.compiler.passes.router_rank`: the RMSNorm's positive
per-token scale dropped) a :class:`RankingRouter` (``view.rankers``) stands in for it:
three ops instead of about eleven, the same top-k up to near-ties. The exact chain still
runs where its logits are recorded (``on_logits``).
"""

from __future__ import annotations

import torch

from .common import ModelView, Ranked, ranked_votes

__all__ = ["LookaheadPredictor", "RankingRouter"]


class RankingRouter:
    """``h -> linear((h * scale).reshape(-1, H), weight)``: logits in the order of a router
    chain whose other ops only multiply each token's row by a positive number. Uses the
    chain's own parameters (no copy)."""

    __slots__ = ("weight", "scale", "hidden")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        self.weight = weight
        self.scale = scale
        self.hidden = weight.shape[-1]

    @classmethod
    def build(cls, params, weight: int, scale: int | None, hidden: int | None) -> "RankingRouter | None":
        """From a chain's params and its ranking form's indices; None when the tensors do not
        have the shapes the form needs, or in float16 (without the norm a residual's logits
        could overflow float16's range; bfloat16 and float32 have room)."""
        w = params[weight] if 0 <= weight < len(params) else None
        s = params[scale] if scale is not None and 0 <= scale < len(params) else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype == torch.float16:
            return None
        if hidden is not None and hidden != w.shape[1]:
            return None
        if scale is not None and (not isinstance(s, torch.Tensor) or tuple(s.shape) != (w.shape[1],)
                                  or s.dtype == torch.float16):
            return None
        return cls(w, s)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, self.hidden)
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        if self.scale is not None:
            x = x * self.scale
        return torch._C._nn.linear(x, self.weight)


class LookaheadPredictor:
    """See the module docstring. ``on_logits(layer, logits)``: called with ``layer``'s own
    router logits [T, E] at its predict op (routing-trace recording)."""

    def predict(self, view: ModelView, layer: int, hidden: torch.Tensor, on_logits=None) -> list[Ranked]:
        if torch.is_grad_enabled():              # (generate runs without grad: no context to enter)
            with torch.no_grad():
                return self._predict(view, layer, hidden, on_logits)
        return self._predict(view, layer, hidden, on_logits)

    @staticmethod
    def _predict(view: ModelView, layer: int, hidden: torch.Tensor, on_logits) -> list[Ranked]:
        out: list[Ranked] = []
        for target in view.window(layer):
            ranker = view.rankers.get(target)
            if ranker is not None and (on_logits is None or target != layer):
                logits = ranker(hidden)          # [T, E], the router's order
            else:
                router = view.routers.get(target)
                if router is None:
                    continue
                fn, params = router
                logits = fn(hidden, *params)
                logits = logits.reshape(-1, logits.shape[-1])
                if on_logits is not None and target == layer:
                    on_logits(target, logits.float())
            experts, votes = ranked_votes(logits.topk(view.candidates(target), dim=-1).indices)
            out.append(Ranked(target, experts, votes))
        return out
