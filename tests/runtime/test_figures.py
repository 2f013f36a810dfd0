"""The figures (runtime/stats.py's definitions) on sequences whose values are known by hand,
and their invariants on random sequences."""

from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow_compile.runtime.belady import min_loads
from expertflow_compile.runtime.cache import ExpertCache
from expertflow_compile.tools.replay import ByteStore
from expertflow_compile.runtime.stats import RuntimeStats

# one layer, 3 experts, 2 slots: 0 1 | 2 | 0 | 1
CALLS = [(0, [0, 1]), (0, [2]), (0, [0]), (0, [1])]


def _run(calls, slots, policy="lru", **kw):
    cache = ExpertCache(ByteStore({0: 4, 1: 4}), slots, policy=policy, prefetch="deferred", stats=RuntimeStats(), **kw)
    try:
        for layer, experts in calls:
            cache.acquire_layer(layer, experts).release()
        return cache.stats.as_dict()
    finally:
        cache.close()


def test_hand_built_sequence_lru_and_min():
    # MIN: loads 0, 1; 2 evicts 1 (next use furthest); 0 is resident; 1 is loaded: 4 loads, 1 resident
    assert min_loads(CALLS, 2) == (4, 1)
    # LRU: 2 evicts 0, 0 evicts 1, 1 evicts 2: every use is a load
    s = _run(CALLS, 2)
    assert (s["uses"], s["resident"], s["loads"], s["demand_loads"], s["prefetch_loads"]) == (5, 0, 5, 5, 0)
    assert s["resident_rate"] == s["ready_rate"] == 0.0 and s["min_loads"] == 4 and s["loads_over_min"] == 5 / 4
    assert s["wasted_loads"] == 0 and s["evictions"] == 3


def test_queued_misses_are_demand_loads_not_prefetches():
    cache = ExpertCache(ByteStore({0: 4}), 4, prefetch=True, queue_misses=True, stats=RuntimeStats())
    try:
        lease = cache.acquire_layer(0, [0, 1, 2])
        assert sorted(lease.wait_all()) == [0, 1, 2]
        lease.release()
        s = cache.stats.as_dict()
    finally:
        cache.close()
    assert (s["misses"], s["demand_loads"], s["prefetch_issued"], s["prefetch_loads"]) == (3, 3, 0, 0)
    assert s["resident"] == s["arrived"] == 0 and s["ready_rate"] == 0.0 and s["min_loads"] == 3


def test_a_landed_prefetch_is_ready_not_resident_and_an_unused_one_is_wasted():
    cache = ExpertCache(ByteStore({0: 4, 1: 4}), 2, prefetch="deferred", stats=RuntimeStats())
    try:
        cache.acquire_layer(0, [0]).release()           # demand load
        assert cache.prefetch(1, [1, 2]) == 2           # LRU predicts nothing: the prefetch may evict 0
        cache.run_prefetches()
        cache.acquire_layer(1, [1]).release()           # the prefetch landed: ready (arrived), not resident
        cache.acquire_layer(0, [3]).release()           # layer 1 ran without 2: 2 goes, loaded and never used
        s = cache.stats.as_dict()
    finally:
        cache.close()
    assert (s["demand_loads"], s["prefetch_loads"], s["loads"]) == (2, 2, 4)
    assert (s["resident"], s["arrived"], s["wasted_loads"], s["prefetch_used"], s["evictions"]) == (0, 1, 1, 1, 2)
    assert s["min_loads"] == 3 and s["resident_rate"] == 0.0 and s["ready_rate"] == 1 / 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
                min_size=1, max_size=30), st.integers(3, 8), st.sampled_from(["lru", "lfu", "predictive"]))
def test_counters_add_up_and_loads_never_beat_min(calls, slots, policy):
    s = _run(calls, slots, policy)
    uses = sum(len(e) for _, e in calls)
    assert s["uses"] == uses == s["hits"] + s["misses"]
    assert s["resident"] + s["arrived"] + s["inflight_waits"] == s["hits"]
    assert s["resident"] <= uses and s["loads"] == s["demand_loads"] + s["prefetch_loads"]
    assert s["min_loads"] == min_loads(calls, slots)[0] <= s["loads"]
    assert min_loads(calls, slots)[1] >= s["resident"]      # MIN keeps the most resident
