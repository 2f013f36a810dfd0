"""What every predictor shares: the model's layers as predictors see them, ranked
predictions, the vote that ranks experts, the window of coming layers, and the codes the
``expertflow::predict`` op carries.

A predictor implements ``predict(view, layer, hidden) -> list[Ranked]``: for the MoE layer
call about to run (``layer``; ``hidden`` is what that layer's predict op receives) the
experts it expects in coming layers, most urgent layer first, each layer's experts most
voted first. It never touches the engine: :class:`ModelView` tells it the layers, their
expert counts and top-k, the routers (for lookahead) and the options that shape a
prediction (``depth`` layers ahead, ``extra`` candidates beyond top-k per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["LAYER_SHIFT", "Ranked", "ModelView", "ranked_votes", "encode", "decode", "cap"]

LAYER_SHIFT = 20  # predicted ids are encoded layer << LAYER_SHIFT | expert
_EXPERT_MASK = (1 << LAYER_SHIFT) - 1
_SMALL = 64       # vote in Python below this many candidates (decode), with torch above


class Ranked(NamedTuple):
    """Predicted experts of one MoE layer, most voted first; ``votes[i]``: how many tokens
    (candidate lists) named ``experts[i]``."""

    layer: int
    experts: list[int]
    votes: list[int]


@dataclass(frozen=True)
class ModelView:
    """The compiled model's MoE layers as predictors see them."""

    order: tuple[int, ...]                    # MoE layers in execution order
    num_experts: dict[int, int]
    top_k: dict[int, int]
    depth: int = 1                            # layers l .. l + depth - 1 are predicted at layer l
    extra: int = 0                            # candidates beyond top-k per token
    routers: dict = field(default_factory=dict, compare=False)   # layer -> (fn(h, *params) -> logits, params)
    rankers: dict = field(default_factory=dict, compare=False)   # layer -> fn(h) -> logits in the router's order
    _pos: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._pos.update({l: i for i, l in enumerate(self.order)})

    @property
    def first(self) -> int | None:
        return self.order[0] if self.order else None

    def window(self, layer: int) -> tuple[int, ...]:
        """The layers predicted at ``layer``: ``layer`` and the ``depth - 1`` after it."""
        i = self._pos.get(layer)
        return () if i is None else self.order[i:i + self.depth]

    def candidates(self, layer: int) -> int:
        """Candidates per token for ``layer``: top-k + extra (at most its expert count)."""
        return min(self.top_k[layer] + self.extra, self.num_experts[layer])


def ranked_votes(top: torch.Tensor, num_experts: int | None = None) -> tuple[list[int], list[int]]:
    """Union of per-token candidate lists ``top`` [T, c] (any shape), most voted first,
    ties by first appearance (row-major: with one token, its own rank order - the position
    a prediction's measured precision is kept for): ``(experts, votes)``. One host transfer."""
    flat = top.reshape(-1)
    n = flat.numel()
    if n == 0:
        return [], []
    if top.dim() == 2 and top.shape[0] == 1:   # one token: its own list, in its order
        experts = flat.tolist()
        if len(set(experts)) == n:
            return experts, [1] * n
    if n <= _SMALL:
        counts: dict[int, int] = {}
        for e in flat.tolist():
            counts[e] = counts.get(e, 0) + 1
        experts = sorted(counts, key=lambda e: -counts[e])     # stable: first appearance among ties
        return experts, [counts[e] for e in experts]
    uniq, inverse, votes = torch.unique(flat, return_inverse=True, return_counts=True)
    first = torch.full_like(uniq, n).scatter_reduce_(0, inverse, torch.arange(n, device=flat.device), "amin")
    o = torch.argsort(first - votes * (n + 1))
    both = torch.stack([uniq[o], votes[o]]).tolist()
    return both[0], both[1]


def encode(predictions, width: int) -> list[int]:
    """Codes ``layer << LAYER_SHIFT | expert`` of ``predictions`` (in order), at most ``width``."""
    codes: list[int] = []
    for r in predictions:
        base = r.layer << LAYER_SHIFT
        codes.extend(base | e for e in r.experts)
        if len(codes) >= width:
            return codes[:width]
    return codes


def decode(codes) -> list[Ranked]:
    """The inverse of :func:`encode` (``-1`` padding skipped), in order of first appearance."""
    by: dict[int, list[int]] = {}
    for c in codes:
        if c >= 0:
            by.setdefault(c >> LAYER_SHIFT, []).append(c & _EXPERT_MASK)
    return [Ranked(l, es, [1] * len(es)) for l, es in by.items()]


def cap(predictions, width: int) -> list[Ranked]:
    """``predictions`` cut to the first ``width`` experts in order (what :func:`encode` keeps)."""
    out: list[Ranked] = []
    left = width
    for r in predictions:
        if left <= 0:
            break
        if len(r.experts) > left:
            r = Ranked(r.layer, r.experts[:left], r.votes[:left])
        out.append(r)
        left -= len(r.experts)
    return out
