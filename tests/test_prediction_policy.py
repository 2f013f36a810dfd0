"""The prefetching rules of the expert cache, as properties over random operation sequences.

* do no harm (Cao, Felten, Karlin and Li): a prefetch never evicts an expert predicted to be
  used no later than the soonest of the prefetched ones, nor one predicted within the
  caller's ``harm_limit``;
* predictions withheld: the predictive policy without its estimator makes exactly LRU's
  decisions (the same experts resident after every step);
(with the true experts prefetched the cache makes exactly Belady's MIN loads, every use ready:
tests/test_trace_predictors.py, on random traces.)
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertflow_compile.runtime.cache import ExpertCache
from expertflow_compile.runtime.policies import PredictivePolicy
from expertflow_compile.runtime.stats import RuntimeStats
from expertflow_compile.tools.replay import ByteStore

_op = st.tuples(st.sampled_from(["call", "hint", "prefetch"]), st.integers(0, 3), st.lists(st.integers(0, 7), min_size=1,
                max_size=4), st.integers(0, 6), st.one_of(st.none(), st.integers(0, 8)))


def _cache(num_layers, num_experts, slots, policy):
    store = ByteStore(dict.fromkeys(range(num_layers), num_experts))
    return ExpertCache(store, slots, policy=policy, prefetch="deferred", stats=RuntimeStats(routing_limit=0))


def _call(cache, layer, experts):
    lease = cache.acquire_layer(layer, experts, loads="lazy")
    try:
        for _e, _views in lease:
            pass
    finally:
        lease.release()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(1, 4), num_experts=st.integers(2, 8), slots=st.integers(1, 12),
       estimate=st.booleans(), ops=st.lists(_op, min_size=1, max_size=40))
def test_a_prefetch_never_evicts_an_expert_predicted_sooner(num_layers, num_experts, slots, estimate, ops):
    cache = _cache(num_layers, num_experts, slots, PredictivePolicy(estimate_unhinted=estimate))
    policy = cache.strategy
    last = None
    try:
        for kind, layer, experts, dist, harm in ops:
            layer %= num_layers
            experts = sorted({e % num_experts for e in experts})
            if kind == "call":
                _call(cache, layer, experts)
                last = layer
            elif kind == "hint":
                cache.set_predicted(layer, experts, dist)
            else:
                before = {key: policy.next_use(cache._table[key]) for key in cache.assigned()}
                # the soonest predicted use of the prefetched experts: their layer's distance, or an earlier hint
                limit = layer if last is None else (layer - last) % num_layers
                known = [policy.hints.get(layer, {}).get(e) for e in experts]
                known = [d - policy.clock for d in known if d is not None]
                if known:
                    limit = min(limit, max(0, min(known)))
                if harm is not None:
                    limit = max(limit, harm)
                cache.prefetch(layer, experts, harm_limit=harm)
                cache.run_prefetches()
                evicted = set(before) - set(cache.assigned())
                assert all(before[key] > limit for key in evicted), (limit, {k: before[k] for k in evicted})
            cache.check_consistency()
    finally:
        cache.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(1, 4), num_experts=st.integers(2, 8), slots=st.integers(1, 12),
       calls=st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 7), min_size=1, max_size=4)),
                      min_size=1, max_size=60))
def test_predictions_withheld_the_policy_makes_exactly_lrus_decisions(num_layers, num_experts, slots, calls):
    lru = _cache(num_layers, num_experts, slots, "lru")
    pred = _cache(num_layers, num_experts, slots, PredictivePolicy(estimate_unhinted=False))
    try:
        for layer, experts in calls:
            layer %= num_layers
            experts = sorted({e % num_experts for e in experts})
            if len(experts) > slots:
                experts = experts[:slots]
            for cache in (lru, pred):
                _call(cache, layer, experts)
            assert sorted(lru.assigned()) == sorted(pred.assigned())
        assert lru.stats.as_dict()["loads"] == pred.stats.as_dict()["loads"]
    finally:
        lru.close()
        pred.close()


_calls = st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 7), min_size=1, max_size=4)), min_size=1,
                  max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(1, 4), num_experts=st.integers(2, 8), slots=st.integers(2, 12),
       policy=st.sampled_from(["lru", "predictive"]), calls=_calls, layer=st.integers(0, 3),
       predicted=st.lists(st.integers(0, 7), min_size=1, max_size=4),
       routed=st.lists(st.integers(0, 7), min_size=1, max_size=4))
def test_prefetches_the_router_disagrees_with_are_the_first_victims(num_layers, num_experts, slots, policy, calls,
                                                                    layer, predicted, routed):
    """enter_layer(layer, routed=...): the layer's loaded prefetches the router did not choose
    are evicted before any other expert by the call's own misses (they give back the slot the
    prefetch took); when the router agrees with every prediction it changes nothing."""
    cache = _cache(num_layers, num_experts, slots, policy)
    twin = _cache(num_layers, num_experts, slots, policy)
    try:
        for c in (cache, twin):
            for l, experts in calls:
                _call(c, l % num_layers, sorted({e % num_experts for e in experts})[:slots])
        layer %= num_layers
        routed = sorted({e % num_experts for e in routed})[:slots]
        predicted = sorted({e % num_experts for e in predicted})
        before = set(cache.assigned())
        for c in (cache, twin):
            c.prefetch(layer, predicted)
            c.run_prefetches()
        loaded = set(cache.assigned()) - before
        cache.enter_layer(layer, routed=routed)
        twin.enter_layer(layer)
        demoted = {k for k in loaded if k[1] not in routed}
        start = set(cache.assigned())
        _call(cache, layer, routed)
        _call(twin, layer, routed)
        evicted = start - set(cache.assigned())
        assert len(evicted & demoted) == min(len(demoted), len(evicted)), (demoted, evicted)
        if set(predicted) <= set(routed):     # the router agreed with every prediction
            assert sorted(cache.assigned()) == sorted(twin.assigned())
        cache.check_consistency()
    finally:
        cache.close()
        twin.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(2, 4), num_experts=st.integers(3, 8), slots=st.integers(2, 12), calls=_calls,
       named=st.lists(st.integers(0, 7), min_size=1, max_size=3))
def test_a_complete_prediction_moves_the_layers_other_experts_a_pass_later(num_layers, num_experts, slots, calls,
                                                                          named):
    """set_predicted(..., complete=True): every cached unhinted expert of that layer is
    expected one whole pass later (it skips the predicted call); other layers' estimates stay."""
    cache = _cache(num_layers, num_experts, slots, PredictivePolicy())
    policy = cache.strategy
    try:
        for layer, experts in calls:
            _call(cache, layer % num_layers, sorted({e % num_experts for e in experts})[:slots])
        target = (cache._last_layer + 1) % num_layers
        named = sorted({e % num_experts for e in named})
        before = {key: policy.next_use(cache._table[key]) for key in cache.assigned()}
        cache.set_predicted(target, named, None, complete=True)
        after = {key: policy.next_use(cache._table[key]) for key in cache.assigned()}
        for key, d in before.items():
            if key[0] == target and key[1] not in named and not policy.hinted(key) and d != float("inf"):
                assert after[key] == d + num_layers
            elif key[0] != target:
                assert after[key] == d
        cache.check_consistency()
    finally:
        cache.close()


def test_explain_loads_accounts_for_every_use():
    """explain_loads: every use is resident, prefetched or loaded in its call; LRU without
    prefetches has no prefetch evictions, and MIN's resident uses match belady's count."""
    import torch

    from expertflow_compile.runtime.belady import min_loads
    from expertflow_compile.runtime.trace import RoutingTrace
    from expertflow_compile.tools.replay import (call_predictions, explain_loads, layer_calls, rank_precision,
                                                 replay)

    g = torch.Generator().manual_seed(3)
    layers, experts, k, n = 3, 8, 2, 96
    ids = {l: torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)]) for l in range(layers)}
    trace = RoutingTrace(layers=list(ids), num_experts=dict.fromkeys(ids, experts), top_k=dict.fromkeys(ids, k),
                         ids=ids, weights={l: torch.ones(n, k) / k for l in ids}, token_ids=torch.zeros(n, dtype=torch.long),
                         seq_offsets=torch.tensor([0, n]), batch_offsets=torch.tensor([0, n]),
                         lookahead_ids={l: torch.cat([v, torch.randint(0, experts, (n, 1), generator=g)], 1)
                                        for l, v in ids.items()})
    calls = layer_calls(trace, 1)
    cands = {l: trace.lookahead_ids[l] for l in ids}
    preds = call_predictions(trace, calls, cands, precision=rank_precision(trace, cands))
    sets = []
    min_l, min_res = min_loads([(c.layer, c.active) for c in calls], 6, resident_sets=sets)
    assert sum(len(s) for s in sets) == min_res
    for policy, p in (("lru", None), ("predictive", preds)):
        events = []
        r = replay(trace, calls, 6, policy, "none" if p is None else "lookahead", predictions=p, events=events)
        x = explain_loads(calls, events, sets, p)
        assert x["uses"] == r.uses == x["resident"] + x["prefetched"] + x["loaded_in_call"]
        assert x["min_resident"] == min_res
        assert x["resident"] == r.resident
        if p is None:
            assert x["prefetched"] == x["prefetch_evictions"] == x["wasted_prefetches"] == 0
        else:
            assert x["prefetched"] + x["wasted_prefetches"] > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(1, 4), num_experts=st.integers(3, 8), slots=st.integers(2, 12),
       threshold=st.floats(0.0, 1.0), steps=st.lists(st.tuples(st.integers(0, 3), st.permutations(range(8)),
                                                                 st.integers(1, 3)), min_size=1, max_size=40))
def test_the_precision_gate_loads_only_positions_that_earned_it(num_layers, num_experts, slots, threshold, steps):
    """prefetch(min_precision=): every candidate is hinted, only those at list positions whose
    measured precision (scored by enter_layer(routed=)) is >= the threshold are loaded; a
    cache that got the same candidates as plain hints with no prefetch makes the same
    decisions as long as the gate loads nothing."""
    gated = _cache(num_layers, num_experts, slots, PredictivePolicy())
    twin = _cache(num_layers, num_experts, slots, PredictivePolicy())
    policy = gated.strategy
    same = True
    try:
        for layer, perm, k in steps:
            layer %= num_layers
            order = [e for e in perm if e < num_experts]
            cands, routed = order[:k + 1], sorted(order[1:k + 1])   # the first candidate is always wrong
            earned = [e for i, e in enumerate(cands)
                      if max(policy.precision(layer, i), policy.load_precision(layer, i)) >= threshold]
            before = set(gated.assigned())
            gated.enter_layer(layer)
            twin.enter_layer(layer)
            n = gated.prefetch(layer, cands, harm_limit=num_layers, min_precision=threshold)
            gated.run_prefetches()
            loaded = {key[1] for key in set(gated.assigned()) - before}
            assert loaded <= set(earned) and n == len(loaded)
            same = same and n == 0     # the twin sees the same cache until the gate loads something
            if same:
                twin.set_predicted(layer, cands, 0)
                assert sorted(gated.assigned()) == sorted(twin.assigned())
            for c in (gated, twin):
                c.enter_layer(layer, routed=routed)
                _call(c, layer, routed)
        # position 0 is never chosen: its measured precision only falls
        seen = policy._position.get(steps[0][0] % num_layers)
        if seen and seen[0][1] > 0:
            assert seen[0][0] == 0
        gated.check_consistency()
    finally:
        gated.close()
        twin.close()


def test_live_compiled_run_with_the_gate_is_exact():
    """The live engine's rule (predictive policy, lookahead, the precision gate, demotion at
    the router) on a compiled model at a quarter of the experts: the same tokens as the
    uncompiled model, and the gate measured its positions and prefetched."""
    import torch

    import expertflow_compile as ef
    from expertflow_compile.runtime.engine import engines_for_module
    from expertflow_compile.testing.tiny_models import build_tiny_model

    model = build_tiny_model("mixtral", num_layers=4, seed=5)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    ref = model.generate(x, max_new_tokens=12, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "25%", "policy": "predictive",
                                                  "predictor": "lookahead", "prefetch_extra": 1,
                                                  "prefetch_min_precision": 0.5})
    assert torch.equal(model.generate(x, max_new_tokens=12, do_sample=False), ref)
    (engine,) = engines_for_module(model)
    positions = engine.cache.strategy._position
    assert positions and all(p[0][1] > 0 for p in positions.values())
    assert ef.stats(model)["prefetch_issued"] > 0
