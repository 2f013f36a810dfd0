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
