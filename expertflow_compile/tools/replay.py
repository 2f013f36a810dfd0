"""Trace-driven expert-cache simulation with the real :class:`ExpertCache` policy code.

:func:`replay` drives an ``ExpertCache`` over a store of 1-byte experts, calling
``prefetch`` / ``acquire`` / ``release`` in the order the engine does, on the layer
calls of a recorded :class:`~expertflow_compile.runtime.trace.RoutingTrace`:

* **steps**: decode (``batch=1``: each token of each sequence, one after the other,
  goes through all MoE layers in order) or ``batch=b`` (``b`` sequences stepped
  together: a step's active set per layer is the union over the ``b`` tokens).
* **each layer call** (the engine's sequential model: resident experts run first, then the
  missing ones one at a time, each released when done): first ``prefetch`` the predicted
  experts (the predictor's codes for this layer call), then the router's experts are
  ``acquire``-d + ``release``-d one by one, resident ones first.

Prefetches complete before the layer's experts are acquired (the cache runs with
``prefetch="deferred"`` and :meth:`ExpertCache.run_prefetches` performs them after the
prefetch calls, so a run is deterministic; only the cache's public interface is used): the
replay measures what a predictor's *choices* do to the cache under an unlimited-bandwidth
assumption, not transfer timing. A prediction for the layer about to run that finds no
victim predicted to be needed later than the slots the call itself will free (Belady's
victims: the call's own experts once used, their next use known to the oracle, else
estimated as the layer's next run) waits: when the router agrees with it, it is loaded
into the first slot the call frees, before its expert's turn (ready); when the router
disagrees, it is dropped before any transfer. Predictions already loaded that the router
disagrees with are wasted loads. Counters come from the cache's own
:class:`~expertflow_compile.runtime.stats.RuntimeStats` (the definitions are there): resident
and ready rates, ``loads = demand + prefetch``, wasted loads, and MIN loads on the same calls.

:func:`belady_min` is Belady's MIN on the same layer calls and slot budget (offline
optimal demand paging for the sequential model: within a layer call the resident experts
run first, then the misses furthest-next-use first; another order within a call can differ
by a hair - 2 loads in 64,730 on tiny_mixtral's held-out decode at 12.5%, found while the
oracle used another order - so MIN is the optimum *of that order*). The ``"oracle-distance"`` predictor runs the
predictive policy with every cached expert's true next-use distance as its hint and no
prefetch: it makes exactly MIN's loads (tests check it); ``"oracle"`` adds the prefetch of
every call's true experts by the rule above: MIN's loads, all of them ready.

``"next-call"`` is a *ceiling for next-token prediction*, not a predictor one can build: as
each layer call ends, the predictive policy is told that layer's true next call as a complete
prediction (``set_predicted(complete=True)``: its other experts go first), and nothing
further ahead; no prefetch. At batch 1 that is perfect knowledge of the next token's routing,
layer by layer, as early as a layer's own call; a real next-token predictor gets at most this
from the policy (the remaining gap to MIN needs routing further ahead than one token). Knowing
the rest of the CURRENT token's routing instead (``"rest-of-pass"``: at each step's first
layer call, every later layer's true experts of that step are hinted, which is what the path
predictor's all-layer candidates approximate) moves batch-1 loads by under 1% on both shipped
models: the victims that matter are experts whose next use is a later token.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from ..runtime.belady import min_loads
from ..runtime.cache import ExpertCache
from ..runtime.policies import PredictivePolicy
from ..runtime.prediction.common import ranked_votes
from ..runtime.stats import RuntimeStats
from ..runtime.store import ExpertSpec, ExpertStore

__all__ = ["LayerCall", "layer_calls", "replay", "belady_min", "bypass_bound", "ByteStore", "ReplayResult", "slots_for_share",
           "call_predictions", "candidate_sets", "rank_precision", "explain_loads"]


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
    """One replay's figures (definitions: :mod:`~expertflow_compile.runtime.stats`):
    ``resident`` uses found their expert cached when the call began, not brought in by a
    still unused prefetch, ``ready`` uses found it loaded when the call acquired it
    (resident, or a prefetch that landed), ``loads = demand_loads + prefetch_loads``, ``wasted_loads``
    prefetch loads evicted unused, ``min_loads`` Belady's MIN on the same calls and slots."""

    policy: str
    predictor: str
    slots: int
    uses: int
    resident: int
    ready: int
    loads: int
    demand_loads: int
    prefetch_loads: int
    wasted_loads: int
    tokens: int
    min_loads: int | None = None

    @property
    def resident_rate(self) -> float:
        return self.resident / self.uses if self.uses else 0.0

    @property
    def ready_rate(self) -> float:
        return self.ready / self.uses if self.uses else 0.0

    @property
    def loads_per_token(self) -> float:
        return self.loads / self.tokens if self.tokens else 0.0

    @property
    def loads_over_min(self) -> float | None:
        return self.loads / self.min_loads if self.min_loads else None

    def as_dict(self) -> dict:
        return {"policy": self.policy, "predictor": self.predictor, "slots": self.slots, "uses": self.uses,
                "resident": self.resident, "ready": self.ready, "loads": self.loads,
                "demand_loads": self.demand_loads, "prefetch_loads": self.prefetch_loads,
                "wasted_loads": self.wasted_loads, "tokens": self.tokens, "min_loads": self.min_loads,
                "resident_rate": self.resident_rate, "ready_rate": self.ready_rate,
                "loads_per_token": self.loads_per_token, "loads_over_min": self.loads_over_min}


def _as_pairs(calls: list[LayerCall]) -> list[tuple[int, list[int]]]:
    return [(c.layer, c.active) for c in calls]


def belady_min(calls: list[LayerCall], slots: int) -> ReplayResult:
    """Belady's MIN (demand paging with the true future) over ``calls`` with ``slots``
    slots shared by all layers (:func:`~expertflow_compile.runtime.belady.min_loads`: the
    engine's sequential model, furthest next use evicted first, least recently used among
    ties - the rule the predictive policy applies to true next-use hints, so
    ``replay(..., "predictive", "oracle-distance")`` makes exactly these loads).
    :func:`bypass_bound` is a looser bound provable for any policy."""
    loads, resident = min_loads(_as_pairs(calls), slots)
    n_uses = sum(len(c.active) for c in calls)
    tokens = len({t for c in calls for t in c.tokens})
    return ReplayResult("min", "none", slots, n_uses, resident, resident, loads, loads, 0, 0, tokens, loads)


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


def rank_precision(trace, candidates: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer, the measured precision of each candidate rank: ``p[layer][r]`` = share of
    tokens whose rank-``r`` candidate is one of the token's true experts (the confidence a
    prediction of that rank deserves)."""
    out = {}
    for l, cand in candidates.items():
        true = trace.ids[l]
        hit = (cand.unsqueeze(-1) == true.unsqueeze(1)).any(-1).float()     # [N, c]
        out[l] = hit.mean(0) if hit.shape[0] else torch.zeros(cand.shape[1])
    return out


def call_predictions(trace, calls: list[LayerCall], candidates: dict[int, torch.Tensor], issue: str = "layer",
                     precision: dict[int, torch.Tensor] | None = None):
    """Per layer call, the prefetches a predictor issues: ``[(target_layer, ranked experts,
    confidences)]``.

    ``candidates[layer]`` [N, c]: each token's predicted experts, best first. An expert's
    confidence is the chance that the call uses it: ``1 - prod(1 - p[rank])`` over the
    tokens naming it, with ``precision`` the measured precision per rank
    (:func:`rank_precision`; None: votes / tokens). Experts come most confident first.
    ``issue="layer"``: each layer call prefetches its own layer's prediction before
    acquiring (the lookahead predictor's timing, and the engine's path predictor with
    ``lookahead_depth=1``); ``issue="first"``: the first MoE layer's call prefetches every
    layer's prediction."""
    layers = list(trace.layers)
    logq = None if precision is None else {l: torch.log1p(-p.clamp(max=1 - 1e-9)) for l, p in precision.items()}
    out = []
    for c in calls:
        idx = torch.tensor(c.tokens)
        targets = [c.layer] if issue == "layer" else (layers if c.layer == layers[0] else [])
        preds = []
        for t in targets:
            cand = candidates[t][idx]
            if logq is None:
                experts, votes = ranked_votes(cand, trace.num_experts[t])
                preds.append((t, experts, [v / len(c.tokens) for v in votes]))
                continue
            q = torch.zeros(trace.num_experts[t], dtype=torch.float64)
            q.scatter_add_(0, cand.reshape(-1), logq[t][:cand.shape[1]].expand_as(cand).reshape(-1).double())
            conf = 1.0 - torch.exp(q)
            order = torch.argsort(conf, descending=True, stable=True)
            keep = order[conf[order] > 0]
            preds.append((t, keep.tolist(), conf[keep].tolist()))
        out.append(preds)
    return out


def replay(trace, calls: list[LayerCall], slots: int, policy: str, predictor: str = "none", *,
           candidates: dict[int, torch.Tensor] | None = None, issue: str = "layer",
           predictions: list | None = None, per_call: list | None = None,
           min_confidence: float = 0.0, stream: bool = True, demote: bool = True, complete: bool = False,
           max_prefetch: int | None = None, enter_first: bool = False, min_precision: float | None = None,
           events: list | None = None) -> ReplayResult:
    """Replay ``calls`` through an ``ExpertCache(policy)`` with ``slots`` slots.

    ``predictor``: ``"none"`` (demand only); ``"oracle-distance"`` (predictive policy hints
    = true next-use distance of every cached expert, no prefetch: exactly MIN's loads);
    ``"next-call"`` (each call's layer is told its true next call when the call ends, as a
    complete prediction, no prefetch: the ceiling of next-token prediction, module docstring);
    ``"rest-of-pass"`` (each step's first layer call hints the step's later calls' true
    experts, no prefetch);
    ``"oracle"`` (the same true hints, and each call prefetches its true experts: an
    optimal policy given the future); or a name whose prefetches are ``predictions`` (from
    :func:`call_predictions`) or computed from ``candidates`` and ``issue``. Only
    predictions with confidence ``>= min_confidence`` are prefetched (what is worth a load).
    Prefetches never evict an expert predicted to be used no later than the prefetched one
    (do no harm, in the cache); ``stream``: a prediction for the layer about to run also
    spares the slots the call frees and waits for them (the module docstring; False: each
    prefetch takes what it finds before the call, the rest is demand-loaded). ``demote``: the
    router's choice demotes the call's wrong prefetches before its misses load
    (``ExpertCache.enter_layer(routed=)``); ``complete``: each own-layer prediction's whole
    candidate list is hinted as complete (``set_predicted(complete=True)``); ``max_prefetch``:
    at most this many experts prefetched per prediction (the link's share of a layer's time;
    0: predictions are hints only). ``events``: a list that receives, per call, the cached
    experts at its start, after its prefetches and at its end (:func:`explain_loads`). ``per_call``: a list that receives ``(prefetch_loads,
    demand_loads)`` of every layer call (for cost models)."""
    store = ByteStore({l: trace.num_experts[l] for l in trace.layers})
    oracle = predictor in ("oracle-distance", "oracle")
    # oracle: every future use is hinted, so an unhinted expert is never used again
    strategy = PredictivePolicy(estimate_unhinted=False) if oracle else policy
    cache = ExpertCache(store, slots, policy=strategy, prefetch="deferred", stats=RuntimeStats(routing_limit=0))
    uses = _next_uses(calls) if oracle else None
    if predictor == "oracle" and predictions is None:   # the true experts, in the order the call uses its misses
        predictions = [[(c.layer, sorted(c.active, key=lambda e: -_next_after(uses, (c.layer, e), i)),
                         [1.0] * len(c.active))] for i, c in enumerate(calls)]
    if predictions is None and candidates is not None and predictor not in ("none", "oracle-distance"):
        predictions = call_predictions(trace, calls, candidates, issue)
    n_layers = len(trace.layers)
    following = _following_calls(calls) if predictor == "next-call" else None
    told = None                                  # next-call: (layer, its true next call's experts, that call's index)
    try:
        for i, c in enumerate(calls):
            if per_call is not None:
                before = (cache.stats.prefetch_loads, cache.stats.demand_loads)
            if events is not None:
                start = frozenset(cache.assigned())
            if oracle:
                cache.enter_layer(c.layer)       # as the first acquire would: hints set below survive
                _oracle_hints(cache, uses, i)
            if predictor == "rest-of-pass" and (i == 0 or calls[i - 1].step != c.step):
                cache.enter_layer(c.layer)
                for j in range(i + 1, len(calls)):
                    if calls[j].step != c.step:
                        break
                    cache.set_predicted(calls[j].layer, calls[j].active, j - i)
            if told is not None:                 # (set once the layer is left: leaving drops its hints)
                cache.enter_layer(c.layer)
                cache.set_predicted(told[0], told[1], told[2] - i, complete=True)
                told = None
            # the oracle takes MIN's order: the experts resident when the call began, then its misses
            # (landed prefetches included) furthest next use first
            resident_now = [e for e in c.active if cache.is_resident(c.layer, e)] if oracle else None
            waiting: set[int] = set()            # this layer's confident predictions that found no slot yet
            if enter_first and not oracle:       # the previous layer is done: its call's experts are a pass away
                cache.enter_layer(c.layer)
            if predictions is not None:
                for pred in predictions[i]:
                    t, ranked = pred[0], list(pred[1])
                    if min_confidence > 0 and len(pred) > 2:
                        ranked = [e for e, p in zip(ranked, pred[2]) if p >= min_confidence]
                    if max_prefetch is not None:
                        ranked = ranked[:max_prefetch]
                    if complete and t == c.layer and pred[1]:    # every candidate: the layer's others skip this call
                        cache.set_predicted(t, list(pred[1]), None, complete=True)
                    if ranked and min_precision is not None and not oracle:
                        own = stream and t == c.layer   # the whole list: the cache loads what its precision earns
                        cache.prefetch(t, ranked, harm_limit=_own_harm(c, i, uses, n_layers) if own else None,
                                       min_precision=min_precision)
                        if own:
                            waiting.update(cache.strategy.precise(t, ranked, min_precision)
                                           if cache.policy == "predictive" else ranked)
                    elif ranked:
                        own = stream and t == c.layer
                        cache.prefetch(t, ranked, harm_limit=_own_harm(c, i, uses, n_layers) if own else None)
                        if own:
                            waiting.update(ranked)
                cache.run_prefetches()
            if events is not None:
                after_prefetch = frozenset(cache.assigned())
            if demote:                           # the router ran: prefetches it disagrees with go first
                cache.enter_layer(c.layer, routed=c.active)
            if resident_now is None:             # the engine's order: what is ready when the call acquires, first
                resident_now = [e for e in c.active if cache.is_resident(c.layer, e)]
            here = set(resident_now)
            missing = [e for e in c.active if e not in here]
            if oracle:
                missing.sort(key=lambda e: -_next_after(uses, (c.layer, e), i))
            # the router ran: a waiting prediction it disagrees with is dropped before any transfer;
            # one it agrees with is loaded into the first slot the call frees, before its turn
            waiting &= set(missing)
            for group in ([resident_now] if resident_now else []) + [[e] for e in missing]:
                e = group[0]
                if e in waiting and not cache.is_resident(c.layer, e):
                    cache.prefetch(c.layer, [e])
                    cache.run_prefetches()
                lease = cache.acquire_layer(c.layer, group, loads="lazy")
                try:
                    for e, _views in lease:
                        if oracle:
                            nxt = _next_after(uses, (c.layer, e), i)
                            if nxt != math.inf:
                                cache.set_predicted(c.layer, [e], nxt - i)
                finally:
                    lease.release()
            if following is not None and following[i] is not None:
                told = (c.layer, calls[following[i]].active, following[i])
            if per_call is not None:
                per_call.append((cache.stats.prefetch_loads - before[0], cache.stats.demand_loads - before[1]))
            if events is not None:
                events.append((start, after_prefetch, frozenset(cache.assigned())))
        s = cache.stats.as_dict()
    finally:
        cache.close()
    tokens = len({t for c in calls for t in c.tokens})
    return ReplayResult(policy if not oracle else "predictive", predictor, slots, s["uses"], s["resident"],
                        s["resident"] + s["arrived"], s["loads"], s["demand_loads"], s["prefetch_loads"],
                        s["wasted_loads"], tokens, min_loads(_as_pairs(calls), slots)[0])


def _following_calls(calls: list[LayerCall]) -> list[int | None]:
    """``out[i]``: index of the next call of ``calls[i]``'s layer (None: it has none)."""
    out: list[int | None] = [None] * len(calls)
    last: dict[int, int] = {}
    for i, c in enumerate(calls):
        j = last.get(c.layer)
        if j is not None:
            out[j] = i
        last[c.layer] = i
    return out


def _own_harm(c: LayerCall, i: int, uses, n_layers: int) -> float:
    """How far the next use of an expert a prefetch for the layer about to run evicts must be:
    beyond the next use after this call of the call's own experts (the slots the call frees
    as it runs: Belady's victims). The oracle knows them; otherwise they are estimated as
    the layer's next run, ``n_layers`` moves away."""
    if uses is None:
        return float(n_layers)
    return max(_next_after(uses, (c.layer, e), i) - i for e in c.active)


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


def explain_loads(calls: list[LayerCall], events: list, min_sets: list, predictions: list | None = None,
                  min_confidence: float = 0.0) -> dict:
    """Where a replay's loads go: every expert use of ``calls`` classified from the replay's
    ``events`` (``replay(..., events=[])``: the cached experts at each call's start, after
    its prefetches, at its end) against Belady's MIN (``min_sets``: ``min_loads(...,
    resident_sets=[])``). Counts (one per use, or per load):

    * ``resident``: cached when the call began; ``prefetched``: loaded by a prefetch before
      the call (a right prediction); ``loaded_in_call``: loaded during the call (a demand
      load, or a prediction that waited for a slot the call freed), split by ``predicted``
      (the call's own confident prediction named it) and by why it was not cached: ``cold``
      (not cached at any call boundary before: a first use, or an expert loaded and evicted
      within one call), ``evicted_by_prefetch`` / ``evicted_by_demand`` (the last
      eviction of that expert), each also counted ``*_min_kept`` when MIN had it resident
      at that call (an eviction MIN avoids);
    * ``wasted_prefetches``: loaded before the call for this layer and not used by it
      (a wrong prediction), ``prefetch_evictions`` / ``prefetch_evictions_reloaded``:
      experts a prefetch evicted, and how many of them were loaded again later (its harm);
      ``prefetch_evictions_own_layer`` / ``_previous_layer``: of the call's own layer (its
      stale experts, what a demand load evicts) / of the layer that ran just before.
    """
    out = dict.fromkeys(["uses", "resident", "prefetched", "loaded_in_call", "predicted_in_call", "cold",
                         "evicted_by_prefetch", "evicted_by_demand", "evicted_by_prefetch_min_kept",
                         "evicted_by_demand_min_kept", "min_resident", "wasted_prefetches", "prefetch_evictions",
                         "prefetch_evictions_reloaded", "prefetch_evictions_own_layer",
                         "prefetch_evictions_previous_layer", "loads"], 0)
    gone: dict[tuple[int, int], str] = {}
    for i, (c, (start, after, end)) in enumerate(zip(calls, events)):
        own = set()
        if predictions is not None:
            for pred in predictions[i]:
                if pred[0] == c.layer:
                    own.update(e for e, p in zip(pred[1], pred[2] if len(pred) > 2 else [1.0] * len(pred[1]))
                               if p >= min_confidence)
        pre_loaded = after - start
        out["loads"] += len(pre_loaded) + len(end - after)
        prev = calls[i - 1].layer if i else None
        for key in start - after:
            gone[key] = "prefetch"
            out["prefetch_evictions"] += 1
            out["prefetch_evictions_own_layer"] += key[0] == c.layer
            out["prefetch_evictions_previous_layer"] += key[0] == prev != c.layer
        for key in pre_loaded:
            if key[0] == c.layer and key[1] not in c.active:
                out["wasted_prefetches"] += 1
        for e in c.active:
            key = (c.layer, e)
            out["uses"] += 1
            out["min_resident"] += e in min_sets[i]
            if key in start:
                out["resident"] += 1
            elif key in pre_loaded:
                out["prefetched"] += 1
            else:
                out["loaded_in_call"] += 1
                out["predicted_in_call"] += e in own
                why = gone.get(key)
                if why is None:
                    out["cold"] += 1
                else:
                    out[f"evicted_by_{why}"] += 1
                    out[f"evicted_by_{why}_min_kept"] += e in min_sets[i]
                    if why == "prefetch":
                        out["prefetch_evictions_reloaded"] += 1
        for key in after - end:
            gone[key] = "demand"
        for key in end - after:
            gone.pop(key, None)
        for key in pre_loaded:
            gone.pop(key, None)
    return out
