"""The oracle predictor: replays a recorded routing trace (the true experts), for upper bounds.

:class:`OraclePredictor` hands out the trace's experts of the next tokens, in the order the
trace holds them (the model must see the same token stream, e.g. the trace's batches in
order). At the first MoE layer it advances over the ``B * S`` tokens of the call (wrapping
around at the trace's end).
"""

from __future__ import annotations

import torch

from ..trace import RoutingTrace
from .common import ModelView, Ranked, ranked_votes

__all__ = ["OraclePredictor"]


class OraclePredictor:
    def __init__(self, trace: RoutingTrace):
        self.trace = trace
        self._pos = 0
        self._span = (0, 0)

    def predict(self, view: ModelView, layer: int, hidden: torch.Tensor) -> list[Ranked]:
        if layer == view.first:
            n = max(1, hidden.numel() // hidden.shape[-1])
            if self._pos + n > self.trace.num_tokens:
                self._pos = 0
            self._span = (self._pos, min(self._pos + n, self.trace.num_tokens))
            self._pos += n
        a, b = self._span
        out: list[Ranked] = []
        for target in view.window(layer):
            ids = self.trace.ids.get(target)
            if ids is None:
                continue
            experts, votes = ranked_votes(ids[a:b], view.num_experts[target])
            out.append(Ranked(target, experts, votes))
        return out
