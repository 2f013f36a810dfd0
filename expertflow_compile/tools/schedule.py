"""Token scheduling: form batches whose sequences use the same experts.

ExpertFlow's third idea. With many prompts to serve, which prompts share a batch
decides how many distinct experts each MoE layer must have resident per step. We

1. measure each prompt's routing on its prefill (``routing_signatures``: the share of
   each layer's top-k assignments that went to each expert; one compiled prefill per
   prompt, which the generation would do anyway, counted as scheduling cost);
2. group prompts into batches of ``batch_size`` minimising the sum over layers of
   distinct experts per batch (``form_batches``: greedy seeding by the set of experts
   a prompt uses most, then pairwise swaps that lower the cost);
3. generate batch by batch (``generate_batched``) and return the outputs in the
   caller's order. Sequences keep their batch for the whole generation here;
   ``regroup.generate_regrouped`` regroups them during decode (ExpertFlow's other half).

Each sequence's greedy tokens do not depend on the schedule (tested).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..layer import unwrap_compiled

__all__ = ["ScheduleResult", "routing_signatures", "form_batches", "batch_cost", "generate_batched"]


def _engine_of(model, warm: torch.Tensor | None = None, what: str = "generate_batched(schedule='routing')"):
    """The expertflow engine of ``model``; a compiled model that has not run yet runs ``warm`` once
    to build it. ValueError naming ``what`` needs it when the model is not compiled with expertflow."""
    from ..runtime.engine import engines_for_module

    engines = engines_for_module(unwrap_compiled(model))
    if not engines and warm is not None:   # compiled but not run yet: the first call builds the engine
        with torch.no_grad():
            model(warm.reshape(1, -1))
        engines = engines_for_module(unwrap_compiled(model))
    if not engines:
        raise ValueError(f"{what} needs a model compiled with backend='expertflow' "
                         "(model.compile(backend='expertflow', options=...))")
    return engines[-1]


def routing_signatures(model, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, L, E]: per prompt, per MoE layer, the share of its top-k assignments per expert."""
    engine = _engine_of(model, inputs[0] if len(inputs) else None)
    sigs = []
    for ids in inputs:
        counts: dict[int, torch.Tensor] = {}

        def record(kind, layer, *tensors, counts=counts):
            if kind == "route":
                ids_ = tensors[0].reshape(-1)
                n = engine.layers[layer].num_experts
                counts[layer] = counts.get(layer, torch.zeros(n)) + torch.bincount(ids_, minlength=n).float()

        previous, engine.recorder = engine.recorder, record
        try:
            with torch.no_grad():
                model(ids if ids.dim() == 2 else ids.unsqueeze(0))
        finally:
            engine.recorder = previous
        layers = sorted(counts)
        sig = torch.stack([counts[l] / counts[l].sum().clamp(min=1) for l in layers])
        sigs.append(sig)
    return torch.stack(sigs)


def _expert_sets(sigs: torch.Tensor, coverage: float) -> list[set[tuple[int, int]]]:
    """Per prompt: the (layer, expert) pairs that cover ``coverage`` of each layer's assignments."""
    keep = _keep(sigs, coverage)
    return [{(int(l), int(e)) for l, e in torch.nonzero(k).tolist()} for k in keep]


def _keep(sigs: torch.Tensor, coverage: float) -> torch.Tensor:
    """[N, L, E] bool: the most used experts of each layer until ``coverage`` is reached."""
    vals, idx = torch.sort(sigs, dim=-1, descending=True)
    before = torch.cumsum(vals, -1) - vals          # share covered before this expert
    keep_sorted = (before < coverage) & (vals > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def batch_cost(sets: list[set], batches: list[list[int]]) -> int:
    """Sum over batches of distinct (layer, expert) pairs the batch uses."""
    return sum(len(set().union(*(sets[i] for i in b))) for b in batches)


def _union(masks: list[int], members: list[int]) -> int:
    m = 0
    for i in members:
        m |= masks[i]
    return m


def _without_each(masks: list[int], members: list[int]) -> list[int]:
    """For each position, the union of the other members' masks."""
    return [_union(masks, members[:k] + members[k + 1:]) for k in range(len(members))]


def form_batches(sigs: torch.Tensor, batch_size: int, *, coverage: float = 0.9,
                 swap_rounds: int = 3) -> list[list[int]]:
    """Group prompt indices into batches of ``batch_size`` (the last may be smaller)."""
    n = sigs.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep = _keep(sigs, coverage).reshape(n, -1).to(torch.uint8).numpy()
    masks = [int.from_bytes(np.packbits(row, bitorder="little").tobytes(), "little") for row in keep]
    left = set(range(n))
    batches: list[list[int]] = []
    while left:
        seed = max(left, key=lambda i: (masks[i].bit_count(), -i))
        batch, used = [seed], masks[seed]
        left.discard(seed)
        while len(batch) < batch_size and left:
            best = min(left, key=lambda i: ((masks[i] & ~used).bit_count(), i))
            batch.append(best)
            used |= masks[best]
            left.discard(best)
        batches.append(batch)
    for _ in range(swap_rounds):   # pairwise swaps between batches while they lower the cost
        improved = False
        for a in range(len(batches)):
            for b in range(a + 1, len(batches)):
                A, B = batches[a], batches[b]
                a_wo, b_wo = _without_each(masks, A), _without_each(masks, B)
                cost = _union(masks, A).bit_count() + _union(masks, B).bit_count()
                for i in range(len(A)):
                    for j in range(len(B)):
                        after = (a_wo[i] | masks[B[j]]).bit_count() + (b_wo[j] | masks[A[i]]).bit_count()
                        if after < cost:
                            A[i], B[j] = B[j], A[i]
                            a_wo, b_wo = _without_each(masks, A), _without_each(masks, B)
                            cost, improved = after, True
        if not improved:
            break
    return [sorted(b) for b in batches]


@dataclass
class ScheduleResult:
    outputs: list[torch.Tensor]          # per prompt, in the caller's order: generated token ids
    batches: list[list[int]]             # prompt indices per batch, in run order
    schedule_seconds: float              # time spent deciding (signatures + grouping)
    signature_seconds: float             # of which: measuring prefill routing
    generate_seconds: float


def _pad_left(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - s.numel():] = s
        mask[r, width - s.numel():] = 1
    return ids, mask


def generate_batched(model, prompts: Sequence[torch.Tensor], *, batch_size: int, schedule: str = "routing",
                     max_new_tokens: int = 16, pad_token_id: int = 0, coverage: float = 0.9,
                     batches: list[list[int]] | None = None) -> ScheduleResult:
    """Greedy generation for many prompts (1-D token-id tensors), ``batch_size`` at a time.

    ``schedule="arrival"`` batches prompts in the given order; ``"routing"`` groups prompts
    whose prefill routing uses the same experts (or pass ``batches`` decided earlier).
    Outputs come back in the caller's order, each the newly generated ids of its prompt.
    """
    if schedule not in ("routing", "arrival"):
        raise ValueError(f"schedule={schedule!r} is not valid; use 'routing' or 'arrival'")
    prompts = [p.reshape(-1) for p in prompts]
    t0 = time.perf_counter()
    sig_s = 0.0
    if batches is not None:
        if sorted(i for b in batches for i in b) != list(range(len(prompts))):
            raise ValueError("batches must hold every prompt index exactly once")
    elif schedule == "routing":
        sigs = routing_signatures(model, prompts)
        sig_s = time.perf_counter() - t0
        batches = form_batches(sigs, batch_size, coverage=coverage)
    else:
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    sched_s = time.perf_counter() - t0
    outputs: list[torch.Tensor | None] = [None] * len(prompts)
    t1 = time.perf_counter()
    for batch in batches:
        ids, mask = _pad_left([prompts[i] for i in batch], pad_token_id)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        for r, i in enumerate(batch):
            outputs[i] = out[r, ids.shape[1]:].clone()
    return ScheduleResult(outputs, batches, sched_s, sig_s, time.perf_counter() - t1)
