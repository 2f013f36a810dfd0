"""The lookahead predictor: the coming layers' routers applied to the current hidden state.

At MoE layer ``l`` (its predict op sits before ``l``'s attention, on the residual
stream), the routers of ``l .. l + depth - 1`` (``view.routers``: the router chain each
layer's graph exposes, ``fn(hidden, *params) -> logits``) score ``hidden``; each token
names its top ``k + extra`` experts, and per layer the union is ranked by votes. No
training, nothing stored.
"""

from __future__ import annotations

import torch

from .common import ModelView, Ranked, ranked_votes

__all__ = ["LookaheadPredictor"]


class LookaheadPredictor:
    """See the module docstring. ``on_logits(layer, logits)``: called with ``layer``'s own
    router logits [T, E] at its predict op (routing-trace recording)."""

    def predict(self, view: ModelView, layer: int, hidden: torch.Tensor, on_logits=None) -> list[Ranked]:
        out: list[Ranked] = []
        with torch.no_grad():
            for target in view.window(layer):
                router = view.routers.get(target)
                if router is None:
                    continue
                fn, params = router
                logits = fn(hidden, *params)
                logits = logits.reshape(-1, logits.shape[-1]).float()
                if on_logits is not None and target == layer:
                    on_logits(target, logits)
                k = view.candidates(target)
                experts, votes = ranked_votes(logits.topk(k, dim=-1).indices, view.num_experts[target])
                out.append(Ranked(target, experts, votes))
        return out
