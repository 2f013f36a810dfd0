"""Decode regrouping: ExpertFlow's token scheduling *during* decode.

``schedule.generate_batched`` fixes each sequence's batch before generation. Here a
**pool** of ``pool_batches`` consecutive arrival batches (``batch_size`` sequences each)
is prefilled batch by batch (left-padded, as ``generate`` does) and then decodes in
**rounds**: in each round every sequence of the pool advances by exactly one token, in
groups of at most ``batch_size`` that are formed again before every round by predicted
routing similarity (``schedule.form_batches`` on a signature of the step to come), so
that each MoE layer of a group's step touches fewer distinct experts. Within a round the
groups run in an order that chains similar groups (``order_groups``): a pool interleaves
its groups' forwards, and without that order consecutive forwards share fewer experts in
the cache than a batch's consecutive steps do.

Signatures of a sequence's next step (``group_by``):

``"token"``
    the top-k experts per MoE layer that its input token (the token it just generated)
    was routed to so far in this pool, counted online from the pool's own prefill and
    decode routing (recorded by the engine); a token not seen yet in the pool falls back
    to ``"last"``. No training data and no model of its own.
``"last"``
    the experts the sequence's previous step used.
``"arrival"``
    no regrouping: the arrival batches stay together (the control, same code path).

KV cache invariants (``PooledKV``):

* the pool keeps, per attention layer, keys and values ``[P, H, W, D]`` left-padded to one
  width ``W``, and a 0/1 mask ``[P, W]`` of real positions. Every sequence gains one real
  token per round, so after each round the rows stay right-aligned and ``W`` grows by one;
* a group's step gathers its rows (any subset, in any order) into a fresh ``DynamicCache``,
  runs the model with those rows' mask (plus one column) and position ids equal to each
  row's count of real tokens, and writes the step's new key/value column back into those
  rows. Keys were rotated at their real positions when computed and padding columns are
  masked out, so each row sees what it would see generated alone;
* hence each sequence's greedy tokens do not depend on the grouping (tested against
  ``generate`` one sequence at a time). Like ``generate_batched`` every sequence gets
  exactly ``max_new_tokens`` tokens: end-of-sequence ids are suppressed
  (``min_new_tokens == max_new_tokens``).

Only full-attention dynamic caches are regrouped; a model whose cache has sliding-window
or other layer kinds is refused with the kinds it has.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..layer import unwrap_compiled
from .schedule import _engine_of, _pad_left, form_batches

__all__ = ["GROUP_BY", "PooledKV", "RegroupResult", "generate_regrouped", "order_groups"]

GROUP_BY = ("token", "last", "arrival")


class PooledKV:
    """The KV cache of a pool of sequences, rows right-aligned at one width (see module docstring)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, capacity: int):
        n, width = mask.shape
        self.width = width
        self.mask = torch.zeros(n, capacity, dtype=torch.long)
        self.mask[:, :width] = mask
        self.keys, self.values = [], []
        for k, v in layers:
            kk = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
            vv = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
            kk[:, :, :width], vv[:, :, :width] = k, v
            self.keys.append(kk)
            self.values.append(vv)

    @classmethod
    def from_batches(cls, parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]],
                     capacity_extra: int) -> "PooledKV":
        """Stack prefilled batches (each: per-layer (keys, values), mask), left-padding the narrower ones."""
        width = max(mask.shape[1] for _, mask in parts)
        layers = []
        for li in range(len(parts[0][0])):
            ks, vs = [], []
            for kv, mask in parts:
                k, v = kv[li]
                pad = width - k.shape[2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.cat(ks), torch.cat(vs)))
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in parts])
        return cls(layers, mask, width + capacity_extra)

    def gather(self, rows: torch.Tensor, config):
        """(DynamicCache of ``rows`` at the current width, their attention mask with one more column)."""
        from transformers import DynamicCache

        w = self.width
        data = [(k[rows, :, :w], v[rows, :, :w]) for k, v in zip(self.keys, self.values)]
        mask = torch.cat([self.mask[rows, :w], torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        return DynamicCache(data, config=config), mask

    def put_step(self, rows: torch.Tensor, cache) -> None:
        """Write the column a step appended to ``cache`` (a gathered group) back into ``rows``."""
        w = self.width
        for li, (k, v, *_rest) in enumerate(cache):
            if k.shape[2] != w + 1:
                raise RuntimeError(f"expertflow regroup: layer {li} cache has width {k.shape[2]}, expected {w + 1}")
            self.keys[li][rows, :, w] = k[:, :, w]
            self.values[li][rows, :, w] = v[:, :, w]
        self.mask[rows, w] = 1

    def advance(self) -> None:
        """End of a round: every row got its column at ``width``."""
        self.width += 1


def _check_cache_kind(cache) -> None:
    """ValueError unless ``cache`` is a DynamicCache whose layers are all full-attention ones."""
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if type(cache).__name__ != "DynamicCache" or kinds - {"DynamicLayer"}:
        raise ValueError(f"decode regrouping supports a DynamicCache of full-attention layers (DynamicLayer) only; "
                         f"this model's cache is {type(cache).__name__} with layers {', '.join(sorted(kinds))}")


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a full-attention DynamicCache."""
    _check_cache_kind(cache)
    return [(k, v) for k, v, *_ in cache]


class _RoutingLog:
    """Collects the engine's routing records of one forward: layer -> ids [tokens, K]."""

    def __init__(self, engine):
        self.engine = engine
        self.ids: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self.previous = self.engine.recorder

        def record(kind, layer, *tensors):
            if kind == "route":
                self.ids[layer] = tensors[0]
            if self.previous is not None:
                self.previous(kind, layer, *tensors)

        self.engine.recorder = record
        return self

    def __exit__(self, *exc):
        self.engine.recorder = self.previous


@dataclass
class _Signatures:
    """Per-pool routing memory: token -> expert counts per layer, and each row's last step's experts."""

    num_rows: int
    layers: list[int]
    num_experts: int
    top_k: int
    by_token: dict[int, torch.Tensor] = field(default_factory=dict)   # token -> [L, E] counts
    last: torch.Tensor | None = None                                   # [P, L, E] 0/1
    last_forward: torch.Tensor | None = None                           # [L, E] bool: experts of the latest forward

    def __post_init__(self):
        self.last = torch.zeros(self.num_rows, len(self.layers), self.num_experts)
        self.last_forward = torch.zeros(len(self.layers), self.num_experts, dtype=torch.bool)

    def observe(self, rows: list[int], tokens: torch.Tensor, ids: dict[int, torch.Tensor],
                real: torch.Tensor | None = None) -> None:
        """One forward's routing: ``tokens`` [g, s] input ids, ``ids[layer]`` [g*s, K]; ``real`` [g, s] masks pads."""
        g, s = tokens.shape
        hot = torch.zeros(g, s, len(self.layers), self.num_experts)
        for li, layer in enumerate(self.layers):
            if layer not in ids:
                raise RuntimeError(f"expertflow regroup: no routing recorded for MoE layer {layer}")
            hot[:, :, li].scatter_(-1, ids[layer].view(g, s, -1).long(), 1.0)
        real = torch.ones(g, s, dtype=torch.bool) if real is None else real.bool()
        self.last_forward = hot.flatten(0, 1).amax(0) > 0
        for r in range(g):
            for t in torch.nonzero(real[r]).flatten().tolist():
                tok = int(tokens[r, t])
                acc = self.by_token.get(tok)
                self.by_token[tok] = hot[r, t].clone() if acc is None else acc + hot[r, t]
            self.last[rows[r]] = hot[r, -1]

    def next_step(self, rows: list[int], tokens: list[int], group_by: str) -> torch.Tensor:
        """[len(rows), L, E]: predicted experts (0/1, normalised per layer) of each row's next step."""
        sig = self.last[rows].clone()
        if group_by == "token":
            for j, tok in enumerate(tokens):
                counts = self.by_token.get(tok)
                if counts is not None:
                    sig[j] = torch.zeros_like(counts).scatter_(-1, counts.topk(self.top_k, -1).indices, 1.0)
        return sig / sig.sum(-1, keepdim=True).clamp(min=1)


def order_groups(groups: list[list[int]], predicted: torch.Tensor, last_used: torch.Tensor) -> list[list[int]]:
    """Run order for one round's groups: each next group is the one whose predicted experts
    overlap most with the group run before it (the first: with ``last_used``, the experts
    of the forward that ran last), so consecutive forwards find more of their experts still
    in the cache. ``predicted`` [rows, L, E] 0/1 or shares; ``last_used`` [L, E] bool."""
    sets = [(predicted[g] > 0).any(0) for g in groups]
    left, order, current = list(range(len(groups))), [], last_used
    while left:
        nxt = max(left, key=lambda j: (int((sets[j] & current).sum()), -j))
        order.append(nxt)
        left.remove(nxt)
        current = sets[nxt]
    return [groups[j] for j in order]


@dataclass
class RegroupResult:
    outputs: list[torch.Tensor]              # per prompt, in the caller's order: generated token ids
    groups: list[list[list[int]]]            # per decode round (all pools), the prompt indices of each group
    schedule_seconds: float                  # deciding the groups (signatures + form_batches)
    kv_seconds: float                        # gathering / writing back KV rows
    generate_seconds: float                  # everything (prefill + decode), including the two above
    decode_steps: int = 0                    # group forwards at decode


def _suppress(logits: torch.Tensor, eos: list[int]) -> torch.Tensor:
    logits = logits[:, -1, :].float()
    if eos:
        logits[:, eos] = float("-inf")
    return logits


def _forward(model, ids, mask, positions, cache):
    """One forward, prefill or decode, always with the same keyword arguments (one Dynamo
    guard set for both: a process that also calls ``generate`` stays under the recompile limit)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                 return_dict=True)


def _eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def generate_regrouped(model, prompts: Sequence[torch.Tensor], *, batch_size: int, pool_batches: int = 2,
                       group_by: str = "token", max_new_tokens: int = 16, pad_token_id: int = 0,
                       coverage: float = 0.9) -> RegroupResult:
    """Greedy generation for many prompts (1-D token-id tensors) with decode regrouping.

    Consecutive ``pool_batches * batch_size`` prompts form a pool; each pool is prefilled
    in arrival batches of ``batch_size`` and then decoded in rounds whose groups of
    ``batch_size`` are re-formed before every round by ``group_by`` (see module docstring).
    ``model`` must be compiled with ``backend="expertflow"`` (routing comes from its engine).
    Outputs come back in the caller's order, each exactly ``max_new_tokens`` new ids.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r} is not valid; use one of {', '.join(map(repr, GROUP_BY))}")
    if batch_size < 1 or pool_batches < 1:
        raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from transformers import DynamicCache

    from ..runtime.engine import engines_for_module

    prompts = [p.reshape(-1) for p in prompts]
    if any(p.numel() == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    module = unwrap_compiled(model)
    _check_cache_kind(DynamicCache(config=module.config))     # before any work: refuse what we cannot regroup
    if prompts and not engines_for_module(module):    # compiled, not run yet: build the engine in our call style
        p0 = prompts[0].unsqueeze(0)
        with torch.no_grad():
            _forward(model, p0, torch.ones_like(p0), torch.arange(p0.shape[1]).unsqueeze(0),
                     DynamicCache(config=module.config))
    engine = _engine_of(model, None, what="generate_regrouped")
    layers = sorted(engine.layers)
    num_experts = max(engine.layers[l].num_experts for l in layers)
    top_k = max(engine.layers[l].top_k for l in layers)
    eos = _eos_ids(module)
    outputs: list[torch.Tensor | None] = [None] * len(prompts)
    all_groups: list[list[list[int]]] = []
    sched_s = kv_s = 0.0
    steps = 0
    t0 = time.perf_counter()
    pool_size = pool_batches * batch_size
    for start in range(0, len(prompts), pool_size):
        members = list(range(start, min(start + pool_size, len(prompts))))
        sigs = _Signatures(len(members), layers, num_experts, top_k)
        parts, first = [], []
        for b in range(0, len(members), batch_size):     # prefill, arrival batches
            rows = list(range(b, min(b + batch_size, len(members))))
            ids, mask = _pad_left([prompts[members[r]] for r in rows], pad_token_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad(), _RoutingLog(engine) as log:
                out = _forward(model, ids, mask, pos, DynamicCache(config=module.config))
            sigs.observe(rows, ids, log.ids, real=mask)
            parts.append((_cache_layers(out.cache), mask))
            first.append(_suppress(out.logits, eos).argmax(-1))
        t_kv = time.perf_counter()
        pool = PooledKV.from_batches(parts, max_new_tokens)
        kv_s += time.perf_counter() - t_kv
        tokens = torch.cat(first)                             # [P] each row's latest token
        lengths = pool.mask.sum(-1)                           # [P] real tokens so far
        generated = [tokens.clone()]
        groups = [list(range(b, min(b + batch_size, len(members)))) for b in range(0, len(members), batch_size)]
        for _ in range(max_new_tokens - 1):
            t_s = time.perf_counter()
            if group_by != "arrival" and len(members) > batch_size:
                sig = sigs.next_step(list(range(len(members))), tokens.tolist(), group_by)
                groups = order_groups(form_batches(sig, batch_size, coverage=coverage), sig, sigs.last_forward)
            sched_s += time.perf_counter() - t_s
            all_groups.append([[members[r] for r in g] for g in groups])
            new = tokens.clone()
            for g in groups:
                rows = torch.tensor(g)
                t_kv = time.perf_counter()
                cache, mask = pool.gather(rows, module.config)
                kv_s += time.perf_counter() - t_kv
                step_ids = tokens[rows].unsqueeze(1)
                with torch.no_grad(), _RoutingLog(engine) as log:
                    out = _forward(model, step_ids, mask, lengths[rows].unsqueeze(1), cache)
                t_kv = time.perf_counter()
                pool.put_step(rows, out.cache)
                kv_s += time.perf_counter() - t_kv
                sigs.observe(g, step_ids, log.ids)
                new[rows] = _suppress(out.logits, eos).argmax(-1)
                steps += 1
            pool.advance()
            lengths += 1
            tokens = new
            generated.append(tokens.clone())
        gen = torch.stack(generated, dim=1)                  # [P, max_new_tokens]
        for r, i in enumerate(members):
            outputs[i] = gen[r].clone()
    return RegroupResult(outputs, all_groups, sched_s, kv_s, time.perf_counter() - t0, steps)
