"""Trace-driven expert-cache simulation with the real :class:`ExpertCache` policy code.

:func:`replay` drives an ``ExpertCache`` over a store of 1-byte experts, calling
``prefetch`` / ``acquire`` / ``release`` in the order the engine does, on the layer
calls of a recorded :class:`~expertflow_compile.runtime.trace.RoutingTrace`:

* **steps**: decode (``batch=1``: each token of each sequence, one after the other,
  goes through all MoE layers in order) or ``batch=b`` (``b`` sequences stepped
  together: a step's active set per layer is the union over the ``b`` tokens).
* **each layer call**: first ``prefetch`` the predicted experts (the predictor's codes
  for this layer call), then ``acquire`` + ``release`` every active expert, resident
  ones first.

Prefetches complete before the layer's experts are acquired (the cache runs with
``prefetch="deferred"`` and :meth:`ExpertCache.run_prefetches` performs them after the
prefetch calls, so a run is deterministic; only the cache's public interface is used): the
replay measures what a predictor's *choices* do to the cache under an unlimited-bandwidth
assumption, not transfer timing. Counters come from the cache's own
:class:`~expertflow_compile.runtime.stats.RuntimeStats`: ``loads = demand + prefetch``,
``ready_rate = hits / uses``.

:func:`belady_min` is Belady's MIN on the same layer calls and slot budget (offline
optimal demand paging; within a layer call, misses are loaded furthest-next-use first,
which never loses against any other order). The ``"oracle-distance"`` predictor runs the
predictive policy with every cached expert's true next-use distance as its hint and no
prefetch: it makes exactly MIN's loads (tests check it).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .cache import ExpertCache
from .policies import PredictivePolicy
from .prediction.common import ranked_votes
from .stats import RuntimeStats
from .store import ExpertSpec, ExpertStore

__all__ = ["LayerCall", "layer_calls", "replay", "belady_min", "bypass_bound", "ByteStore", "ReplayResult", "slots_for_share", "call_predictions",
           "candidate_sets"]


class ByteStore(ExpertStore):
    """A store of 1-byte experts (contents irrelevant) for simulations."""

    def __init__(self, num_experts: dict[int, int]):
        self.specs = {int(l): ExpertSpec(int(e), {"w": (1,)}, torch.uint8) for l, e in num_experts.items()}

    def read_into(self, layer, expert, out):
        out["w"].fill_(expert & 0xFF)


@dataclass
class LayerCall:
    step: int
    layer: int
    tokens: list[int]             # trace token indices of this step
    active: list[int]             # sorted distinct experts used


def layer_calls(trace, batch: int = 1, max_tokens: int | None = None) -> list[LayerCall]:
    """The MoE layer calls of replaying ``trace`` in decode (``batch=1``) or with ``batch``
    sequences stepped together (groups of consecutive sequences)."""
    seqs = trace.sequences()
    steps: list[list[int]] = []
    budget = math.inf if max_tokens is None else max_tokens
    used = 0
    for g in range(0, len(seqs), batch):
        group = seqs[g:g + batch]
        longest = max(b - a for a, b in group)
        for t in range(longest):
            toks = [a + t for a, b in group if a + t < b]
            if used + len(toks) > budget:
                break
            steps.append(toks)
            used += len(toks)
        if used >= budget:
            break
    calls = []
    ids = {l: trace.ids[l] for l in trace.layers}
    for s, toks in enumerate(steps):
        idx = torch.tensor(toks)
        for l in trace.layers:
            act = sorted(set(ids[l][idx].reshape(-1).tolist()))
            calls.append(LayerCall(s, l, toks, act))
    return calls


def slots_for_share(trace, share: float) -> int:
    """Slots for ``share`` of all experts (at least the largest top-k)."""
    total = sum(trace.num_experts[l] for l in trace.layers)
    return max(max(trace.top_k.values()), int(round(total * share)))


def _next_uses(calls: list[LayerCall]) -> dict[tuple[int, int], list[int]]:
    uses: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(calls):
        for e in c.active:
            uses.setdefault((c.layer, e), []).append(i)
    return uses


def _next_after(uses, key, i) -> float:
    lst = uses.get(key)
    if not lst:
        return math.inf
    j = bisect.bisect_right(lst, i)
    return lst[j] if j < len(lst) else math.inf


@dataclass
class ReplayResult:
    policy: str
    predictor: str
    slots: int
    uses: int
    hits: int
    loads: int
    demand_loads: int
    prefetch_loads: int
    tokens: int

    @property
    def ready_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def loads_per_token(self) -> float:
        return self.loads / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "predictor": self.predictor, "slots": self.slots, "uses": self.uses,
                "hits": self.hits, "loads": self.loads, "demand_loads": self.demand_loads,
                "prefetch_loads": self.prefetch_loads, "tokens": self.tokens, "ready_rate": self.ready_rate,
                "loads_per_token": self.loads_per_token}


def belady_min(calls: list[LayerCall], slots: int) -> ReplayResult:
    """Belady's MIN (demand paging with the true future) over ``calls`` with ``slots``
    slots shared by all layers, in the engine's sequential model: within a layer call the
    resident experts are used first, then the missing ones are loaded furthest-next-use
    first (the last one loaded, which stays cached, is then the one needed soonest); a load
    into a full cache evicts the expert whose next use is furthest (never used again:
    first), least recently used among ties - the rule the predictive policy applies to
    true next-use hints, so ``replay(..., "predictive", "oracle-distance")`` makes exactly
    these loads. :func:`bypass_bound` is a looser bound provable for any policy."""
    uses = _next_uses(calls)
    cached: dict = {}                  # key -> last use tick
    tick = hits = loads = n_uses = 0
    for i, c in enumerate(calls):
        keys = [(c.layer, e) for e in c.active]
        n_uses += len(keys)
        hit = [k for k in keys if k in cached]
        miss = sorted((k for k in keys if k not in cached), key=lambda k: -_next_after(uses, k, i))
        for k in hit:
            tick += 1
            cached[k] = tick
            hits += 1
        for k in miss:
            if len(cached) >= slots:
                victim = max(cached, key=lambda v: (_next_after(uses, v, i), -cached[v]))
                del cached[victim]
            tick += 1
            cached[k] = tick
            loads += 1
    tokens = len({t for c in calls for t in c.tokens})
    return ReplayResult("min", "none", slots, n_uses, hits, loads, loads, 0, tokens)


def bypass_bound(calls: list[LayerCall], slots: int) -> int:
    """A lower bound on the loads of ANY policy (prefetching or not, any order within a
    layer call): optimal paging with bypass, where after each layer call the cache keeps
    the ``slots`` experts of (cached | used now) needed soonest."""
    uses = _next_uses(calls)
    cached: set = set()
    loads = 0
    for i, c in enumerate(calls):
        keys = {(c.layer, e) for e in c.active}
        loads += len(keys - cached)
        pool = cached | keys
        cached = set(sorted(pool, key=lambda k: (_next_after(uses, k, i), k))[:slots])
        cached = {k for k in cached if _next_after(uses, k, i) != math.inf}
    return loads


def candidate_sets(trace, source: str, extra: int = 1, path_candidates: dict | None = None) -> dict[int, torch.Tensor]:
    """Per layer, each token's predicted candidates [N, c] for the predictor ``source``:
    ``"lookahead"`` (the trace's lookahead candidates, top k + extra), ``"path"``
    (``path_candidates`` from a PathPredictor, already top k + extra) or ``"oracle"``
    (the true experts)."""
    if source == "lookahead":
        if not trace.lookahead_ids:
            raise ValueError("this trace has no lookahead candidates")
        return {l: trace.lookahead_ids[l][:, :min(trace.top_k[l] + extra, trace.lookahead_ids[l].shape[1])]
                for l in trace.layers}
    if source == "path":
        if path_candidates is None:
            raise ValueError("predictor 'path' needs path_candidates")
        return path_candidates
    if source == "oracle":
        return {l: trace.ids[l] for l in trace.layers}
    raise ValueError(f"unknown prediction source {source!r}")


def call_predictions(trace, calls: list[LayerCall], candidates: dict[int, torch.Tensor], issue: str = "layer"):
    """Per layer call, the prefetches a predictor issues: ``[(target_layer, ranked experts)]``.

    ``candidates[layer]`` [N, c]: each token's predicted experts. ``issue="layer"``: each
    layer call prefetches its own layer's prediction before acquiring (the lookahead
    predictor's timing, and the engine's path predictor with ``lookahead_depth=1``);
    ``issue="first"``: the first MoE layer's call prefetches every layer's prediction."""
    layers = list(trace.layers)
    out = []
    for c in calls:
        idx = torch.tensor(c.tokens)
        targets = [c.layer] if issue == "layer" else (layers if c.layer == layers[0] else [])
        out.append([(t, ranked_votes(candidates[t][idx], trace.num_experts[t])[0]) for t in targets])
    return out


def replay(trace, calls: list[LayerCall], slots: int, policy: str, predictor: str = "none", *,
           candidates: dict[int, torch.Tensor] | None = None, issue: str = "layer",
           predictions: list | None = None, per_call: list | None = None) -> ReplayResult:
    """Replay ``calls`` through an ``ExpertCache(policy)`` with ``slots`` slots.

    ``predictor``: ``"none"`` (demand only), ``"oracle-distance"`` (predictive policy
    hints = true next-use distance of every cached expert, no prefetch), or a name whose
    prefetches are ``predictions`` (from :func:`call_predictions`) or computed from
    ``candidates`` and ``issue`` (see :func:`call_predictions`). ``per_call``: a list that
    receives ``(prefetch_loads, demand_loads)`` of every layer call (for cost models).
    """
    store = ByteStore({l: trace.num_experts[l] for l in trace.layers})
    oracle = predictor == "oracle-distance"
    # oracle: every future use is hinted, so an unhinted expert is never used again
    strategy = PredictivePolicy(estimate_unhinted=False) if oracle else policy
    cache = ExpertCache(store, slots, policy=strategy, prefetch="deferred", stats=RuntimeStats())
    if predictions is None and candidates is not None and predictor not in ("none", "oracle-distance"):
        predictions = call_predictions(trace, calls, candidates, issue)
    uses = _next_uses(calls) if oracle else None
    try:
        for i, c in enumerate(calls):
            if per_call is not None:
                before = (cache.stats.prefetch_loads, cache.stats.demand_loads)
            if predictions is not None:
                for t, ranked in predictions[i]:
                    if ranked:
                        cache.prefetch(t, ranked)
                cache.run_prefetches()
            order = c.active
            if oracle:
                cache.enter_layer(c.layer)       # as the first acquire would: hints set below survive
                _oracle_hints(cache, uses, i)
                resident = [e for e in c.active if cache.is_resident(c.layer, e)]
                missing = sorted((e for e in c.active if e not in set(resident)),
                                 key=lambda e: -_next_after(uses, (c.layer, e), i))
                order = resident + missing
            lease = cache.acquire_layer(c.layer, order, loads="lazy")
            try:
                for e, _views in lease:
                    if oracle:
                        nxt = _next_after(uses, (c.layer, e), i)
                        if nxt != math.inf:
                            cache.set_predicted(c.layer, [e], nxt - i)
            finally:
                lease.release()
            if per_call is not None:
                per_call.append((cache.stats.prefetch_loads - before[0], cache.stats.demand_loads - before[1]))
        s = cache.stats.as_dict()
    finally:
        cache.close()
    tokens = len({t for c in calls for t in c.tokens})
    return ReplayResult(policy, predictor, slots, s["hits"] + s["misses"], s["hits"] - s["inflight_waits"],
                        s["demand_loads"] + s["prefetch_loads"], s["demand_loads"], s["prefetch_loads"], tokens)


def _oracle_hints(cache: ExpertCache, uses, i: int) -> None:
    """Hint every cached expert with its true next use (distance in layer calls from call i)."""
    keys = cache.assigned()
    by: dict[tuple[int, int], list[int]] = {}
    for key in keys:
        nxt = _next_after(uses, key, i - 1)          # a use in call i itself counts (distance 0)
        if nxt != math.inf:
            by.setdefault((key[0], int(nxt - i)), []).append(key[1])
    for (layer, dist), experts in by.items():
        cache.set_predicted(layer, experts, dist)
