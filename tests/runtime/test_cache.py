"""ExpertCache: contents, budget, policies, prefetch, faults, shutdown."""

import faulthandler
import gc
import logging
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from expertflow_compile.runtime import (
    VALID_POLICIES,
    ExpertCache,
    ExpertStore,
    FaultInjectingStore,
    RuntimeStats,
    SafetensorsExpertStore,
    TensorExpertStore,
    TensorSource,
)
from expertflow_compile.runtime.cache import WORKER_THREAD_NAME

TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _hang_guard():
    # a hang (deadlock, lost wake-up) kills the run with every thread's stack instead of blocking CI
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _workers():
    return [t for t in threading.enumerate() if t.name == WORKER_THREAD_NAME and t.is_alive()]


def _wait_no_workers(timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _workers()


def _layer(experts, rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 10).to(dtype)
    return {"up": mk(experts, 2 * rows, cols), "down": mk(experts, cols, rows), "up_bias": mk(experts, 2 * rows)}


# Layers of different sizes and dtypes share the slots (alignment, views per layout).
LAYERS = {
    0: _layer(5, 3, 4, torch.float32, 0),
    1: _layer(5, 5, 4, torch.bfloat16, 1),
    2: _layer(4, 2, 3, torch.float64, 2),
}
STORE = TensorExpertStore(LAYERS)
KEYS = [(l, e) for l, s in STORE.specs.items() for e in range(s.num_experts)]
TOTAL = len(KEYS)


def _check(views, layer, expert):
    assert set(views) == set(LAYERS[layer])
    for name, t in LAYERS[layer].items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape[1:]
        assert torch.equal(views[name], t[expert]), (layer, expert, name)


def _single(experts=6, **kw):
    store = TensorExpertStore({0: _layer(experts, 2, 2, torch.float32, 5)})
    return store, ExpertCache(store, **kw)


def _use(cache, layer, expert):
    cache.acquire(layer, expert)
    cache.release(layer, expert)


# ------------------------------------------------------------------ properties

op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(sorted(LAYERS)), st.lists(st.integers(0, 4), min_size=1,
                                                                               max_size=4, unique=True)),
    st.tuples(st.just("prefetch"), st.sampled_from(sorted(LAYERS)), st.lists(st.integers(0, 4), max_size=5)),
    st.tuples(st.just("hint"), st.sampled_from(sorted(LAYERS)), st.lists(st.integers(0, 4), max_size=3),
              st.integers(0, 3)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_slots=st.integers(1, TOTAL + 2),
    policy=st.sampled_from(VALID_POLICIES),
    prefetch=st.booleans(),
    faults=st.sets(st.sampled_from(KEYS), max_size=3),
    ops=st.lists(op, max_size=25),
)
def test_random_access_sequences(num_slots, policy, prefetch, faults, ops):
    # faults hit only the worker's reads: prefetches of those experts fail, demand loads succeed
    store = FaultInjectingStore(STORE, faults, thread_prefix=WORKER_THREAD_NAME)
    others = set(_workers())       # workers of caches other tests left for the garbage collector
    cache = ExpertCache(store, num_slots, policy=policy, prefetch=prefetch)
    acquires = 0
    try:
        assert cache.num_slots == min(num_slots, TOTAL)
        assert cache.budget_bytes == cache.num_slots * cache.slot_bytes
        for kind, layer, experts, *rest in ops:
            n = STORE.specs[layer].num_experts
            experts = [e % n for e in experts]
            if kind == "prefetch":
                issued = cache.prefetch(layer, experts)
                assert 0 <= issued <= len(set(experts))
                if not prefetch:
                    assert issued == 0
            elif kind == "hint":
                cache.set_predicted(layer, experts, rest[0])
            else:
                held = list(dict.fromkeys(experts))[: cache.num_slots]
                for e in held:
                    _check(cache.acquire(layer, e), layer, e)
                    acquires += 1
                    assert cache.is_resident(layer, e)
                for e in held:
                    assert e in cache.resident_experts(layer)
                    cache.release(layer, e)
            assert cache.allocated_bytes <= cache.budget_bytes
        assert cache.wait_idle(TIMEOUT)
        cache.check_consistency()
        # everything still resident holds the right weights
        for layer in LAYERS:
            for e in cache.resident_experts(layer):
                _check(cache.acquire(layer, e), layer, e)
                acquires += 1
                cache.release(layer, e)
        s = cache.stats.as_dict()
        assert s["hits"] + s["misses"] == acquires == s["uses"]
        assert s["inflight_waits"] <= s["hits"]
        assert s["peak_cache_bytes"] <= s["budget_bytes"] == cache.budget_bytes
        assert s["prefetch_used"] + s["prefetch_late"] + s["prefetch_wasted"] <= s["prefetch_issued"]
        assert s["prefetch_failed"] <= s["prefetch_wasted"]
        assert s["demand_loads"] == s["misses"]
        expert_bytes = {l: STORE.specs[l].expert_nbytes() for l in LAYERS}
        loads = 0
        for layer, per in s["per_layer"].items():
            assert per["bytes_moved"] % expert_bytes[layer] == 0
            loads += per["bytes_moved"] // expert_bytes[layer]
        assert loads == s["loads"] == s["demand_loads"] + s["prefetch_loads"]
        for key in ("hits", "misses", "inflight_waits", "prefetch_issued", "prefetch_used", "prefetch_late",
                    "prefetch_wasted", "bytes_moved"):
            assert s[key] == sum(p[key] for p in s["per_layer"].values()), key
        if num_slots >= TOTAL:
            assert s["evictions"] == 0
        if not faults:
            assert s["prefetch_failed"] == 0
    finally:
        cache.close()
    assert set(_workers()) <= others


def test_staging_path():
    # the path device caches use (CUDA: pinned staging + side-stream copy), run on CPU with blocking copies
    cache = ExpertCache(STORE, 3, staging=True)
    for l, e in KEYS:
        cache.prefetch(l, [(e + 1) % STORE.specs[l].num_experts])
        _check(cache.acquire(l, e), l, e)
        cache.release(l, e)
    assert cache.wait_idle(TIMEOUT)
    assert cache.stats.prefetch_loads > 0 and cache.stats.demand_loads > 0
    cache.close()


def test_concurrent_acquires_from_threads():
    cache = ExpertCache(STORE, 4, policy="lru")
    errors = []

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(60):
                layer, e = KEYS[int(torch.randint(TOTAL, (1,), generator=g))]
                if int(torch.randint(3, (1,), generator=g)) == 0:
                    cache.prefetch(layer, [e, (e + 1) % STORE.specs[layer].num_experts])
                _check(cache.acquire(layer, e), layer, e)
                cache.release(layer, e)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    assert cache.wait_idle(TIMEOUT)
    s = cache.stats.as_dict()
    assert s["hits"] + s["misses"] == 4 * 60
    assert s["peak_cache_bytes"] <= cache.budget_bytes
    cache.close()


# -------------------------------------------------------------------- policies


def test_lru_evicts_least_recently_used():
    _, cache = _single(num_slots=2, policy="lru", prefetch=False)
    for e in (0, 1, 0):
        _use(cache, 0, e)
    _use(cache, 0, 2)                        # 1 is least recent
    assert cache.resident_experts(0) == {0, 2}
    _use(cache, 0, 1)                        # now 0 is
    assert cache.resident_experts(0) == {1, 2}
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 4, 2)


def test_lfu_evicts_least_frequently_used():
    _, cache = _single(num_slots=2, policy="lfu", prefetch=False)
    for e in (0, 0, 0, 1):
        _use(cache, 0, e)
    _use(cache, 0, 2)                        # 1 (1 use) goes although 0 is older
    assert cache.resident_experts(0) == {0, 2}
    _use(cache, 0, 2)
    _use(cache, 0, 1)                        # counts: 0:3, 2:2 -> evict 2
    assert cache.resident_experts(0) == {0, 1}
    _use(cache, 0, 1)
    _use(cache, 0, 1)                        # counts survive eviction: 1 has 4 now
    _use(cache, 0, 3)                        # 0:3 < 1:4 -> evict 0
    assert cache.resident_experts(0) == {1, 3}


def test_predictive_follows_hints_and_falls_back_to_lru():
    _, cache = _single(num_slots=2, policy="predictive", prefetch=False)
    _use(cache, 0, 0)
    _use(cache, 0, 1)
    cache.set_predicted(0, [0], 1)           # 0 is needed again soon, 1 is not
    _use(cache, 0, 2)
    assert cache.resident_experts(0) == {0, 2}
    _use(cache, 0, 0)                        # consumes the hint
    _use(cache, 0, 3)                        # no hints left: LRU -> evict 2
    assert cache.resident_experts(0) == {0, 3}
    cache.set_predicted(0, [3], 5)
    cache.set_predicted(0, [0], 2)           # 3 is needed later than 0 -> 3 goes first
    _use(cache, 0, 4)
    assert cache.resident_experts(0) == {0, 4}


def test_predictive_uses_layer_distance_and_drops_stale_hints():
    store = TensorExpertStore({l: _layer(4, 2, 2, torch.float32, l) for l in range(3)})
    cache = ExpertCache(store, 3, policy="predictive", prefetch=False)
    _use(cache, 0, 0)
    cache.prefetch(1, [0])                   # prefetch off, but its hint counts: layer 1 is 1 ahead
    cache.prefetch(2, [0])                   # 2 ahead
    _use(cache, 1, 0)                        # consumes (1, 0)'s hint
    _use(cache, 2, 0)                        # consumes (2, 0)'s hint; all slots used
    cache.set_predicted(0, [0], 1)
    cache.set_predicted(1, [0], 2)
    _use(cache, 2, 1)                        # evicts (2, 0): the only expert without a hint
    assert cache.resident_experts(2) == {1} and cache.resident_experts(0) == {0}
    _use(cache, 0, 1)                        # unhinted (2, 1) goes before the hinted (0, 0) and (1, 0)
    assert cache.resident_experts(2) == set() and cache.resident_experts(1) == {0}
    # leaving layer 0 drops the unused hint of (0, 0): it is now the least recent unhinted expert
    _use(cache, 1, 1)
    assert cache.resident_experts(0) == {1} and cache.resident_experts(1) == {0, 1}


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown expert cache policy 'fifo'; valid policies: lru, lfu, predictive"):
        ExpertCache(STORE, 2, policy="fifo")
    with pytest.raises(ValueError, match="num_slots"):
        ExpertCache(STORE, 0)


# -------------------------------------------------------------------- prefetch


class GatedStore(ExpertStore):
    """Reads of chosen experts block until ``gate`` is set; ``started`` tells when one began."""

    def __init__(self, inner, gated):
        self.inner, self.specs, self.gated = inner, inner.specs, set(gated)
        self.gate, self.started = threading.Event(), threading.Event()

    def read_into(self, layer, expert, out):
        if (layer, expert) in self.gated:
            self.started.set()
            assert self.gate.wait(TIMEOUT), "gate never opened"
        self.inner.read_into(layer, expert, out)


def test_prefetch_then_acquire_is_a_prefetch_hit():
    cache = ExpertCache(STORE, 4)
    assert cache.prefetch(1, [2, 3, 2]) == 2
    assert cache.wait_idle(TIMEOUT)
    assert cache.is_resident(1, 2) and cache.is_resident(1, 3)
    assert cache.prefetch(1, [2, 3]) == 0                  # already resident
    _check(cache.acquire(1, 2), 1, 2)
    cache.release(1, 2)
    s = cache.stats.as_dict()
    assert (s["hits"], s["misses"], s["prefetch_issued"], s["prefetch_used"]) == (1, 0, 2, 1)
    assert s["ready_rate"] == 1.0 and s["prefetch_loads"] == 2 and s["demand_loads"] == 0
    assert s["per_layer"][1]["prefetch_used"] == 1
    cache.close()


def test_acquire_waits_for_an_inflight_load():
    store = GatedStore(STORE, {(0, 1)})
    cache = ExpertCache(store, 3)
    assert cache.prefetch(0, [1]) == 1
    assert store.started.wait(TIMEOUT)                     # the worker is inside the read
    assert not cache.is_resident(0, 1)
    threading.Timer(0.2, store.gate.set).start()
    t0 = time.perf_counter()
    _check(cache.acquire(0, 1), 0, 1)
    assert time.perf_counter() - t0 >= 0.1
    cache.release(0, 1)
    s = cache.stats.as_dict()
    assert (s["hits"], s["misses"], s["inflight_waits"], s["prefetch_used"]) == (1, 0, 1, 1)
    assert s["stall_seconds"] >= 0.1 and s["ready_rate"] == 0.0 and s["resident_rate"] == 0.0
    cache.close()


def test_acquire_takes_over_a_queued_prefetch():
    store = GatedStore(STORE, {(0, 0)})
    cache = ExpertCache(store, 3)
    assert cache.prefetch(0, [0, 1]) == 2                  # worker blocks on 0, 1 waits in the queue
    assert store.started.wait(TIMEOUT)
    _check(cache.acquire(0, 1), 0, 1)                      # loaded here, not behind the blocked worker
    cache.release(0, 1)
    store.gate.set()
    assert cache.wait_idle(TIMEOUT)
    s = cache.stats.as_dict()
    # the prefetch of 1 saved nothing: a miss, and a late (not used, not wasted) prefetch
    assert (s["hits"], s["misses"], s["inflight_waits"]) == (0, 1, 0)
    assert (s["prefetch_loads"], s["demand_loads"], s["prefetch_late"], s["prefetch_used"]) == (1, 1, 1, 0)
    assert s["prefetch_wasted"] == 0 and s["prefetch_precision"] == 0.5
    cache.close()


def test_prefetch_never_evicts_pinned_inflight_or_same_request():
    cache = ExpertCache(STORE, 2)
    cache.acquire(0, 0)
    cache.acquire(0, 1)                                    # both slots pinned
    assert cache.prefetch(0, [2, 3]) == 0
    cache.release(0, 1)
    assert cache.prefetch(0, [2, 3]) == 1                  # one slot freed; 3 cannot evict 2 (same request)
    assert cache.wait_idle(TIMEOUT)
    assert cache.resident_experts(0) == {0, 2}
    cache.release(0, 0)
    cache.close()
    # an expert of the same request is never the victim, even when it is the least recent
    cache = ExpertCache(STORE, 2)
    _use(cache, 0, 1)
    _use(cache, 0, 0)
    assert cache.prefetch(0, [2, 1]) == 1
    assert cache.wait_idle(TIMEOUT)
    assert cache.resident_experts(0) == {1, 2}
    cache.close()
    # nor another prefetch that is still expected (its layer has not run yet)
    cache = ExpertCache(STORE, 2)
    assert cache.prefetch(1, [0, 1]) == 2
    assert cache.prefetch(2, [0]) == 0
    assert cache.wait_idle(TIMEOUT)
    _use(cache, 1, 0)
    # layer 1 ran without using (1, 1): a misprediction, so it makes room
    _use(cache, 2, 0)
    assert cache.resident_experts(2) == {0}
    cache.close()


def test_all_slots_pinned_raises():
    cache = ExpertCache(STORE, 2, prefetch=False)
    cache.acquire(0, 0)
    cache.acquire(1, 0)
    with pytest.raises(RuntimeError, match="all 2 expert cache slots are pinned"):
        cache.acquire(2, 0)
    cache.release(1, 0)
    _check(cache.acquire(2, 0), 2, 0)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        cache.release(1, 0)
    with pytest.raises(IndexError):
        cache.acquire(2, 9)
    with pytest.raises(KeyError):
        cache.prefetch(7, [0])


def test_everything_fits():
    cache = ExpertCache(STORE, 10**6, prefetch=False)
    assert cache.num_slots == TOTAL
    for l, e in KEYS * 2:
        _use(cache, l, e)
    s = cache.stats.as_dict()
    assert (s["misses"], s["hits"], s["evictions"]) == (TOTAL, TOTAL, 0)
    assert s["peak_cache_bytes"] == s["budget_bytes"] == TOTAL * cache.slot_bytes


def test_prefetched_unused_experts_are_evicted_last_and_counted_wasted():
    cache = ExpertCache(STORE, 2, policy="lru")
    _use(cache, 0, 0)
    assert cache.prefetch(0, [1]) == 1
    assert cache.wait_idle(TIMEOUT)
    _use(cache, 0, 2)                        # evicts (0, 0), not the older unused prefetch (0, 1)
    assert cache.resident_experts(0) == {1, 2}
    _use(cache, 0, 3)
    assert cache.resident_experts(0) == {1, 3}
    assert cache.stats.prefetch_wasted == 0
    _use(cache, 1, 0)                        # layer 0 ran without using (0, 1): now plain LRU, and it is oldest
    assert cache.resident_experts(0) == {3}
    s = cache.stats.as_dict()
    assert (s["prefetch_wasted"], s["prefetch_used"], s["evictions"]) == (1, 0, 3)
    cache.close()


# ---------------------------------------------------------------------- faults


def test_worker_fault_is_logged_once_and_demand_loaded(caplog):
    store = FaultInjectingStore(STORE, {(0, 1): 1, (0, 2): 1, (1, 3): 1}, thread_prefix=WORKER_THREAD_NAME)
    cache = ExpertCache(store, 4)
    with caplog.at_level(logging.DEBUG, logger="expertflow_compile"):
        assert cache.prefetch(0, [1, 2]) == 2
        assert cache.prefetch(1, [3]) == 1
        assert cache.wait_idle(TIMEOUT)                    # no hang
        assert cache.resident_experts(0) == set()
        for l, e in ((0, 1), (0, 2), (1, 3)):
            _check(cache.acquire(l, e), l, e)
            cache.release(l, e)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "prefetching expert" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    s = cache.stats.as_dict()
    assert (s["misses"], s["prefetch_failed"], s["prefetch_wasted"], s["prefetch_used"]) == (3, 3, 3, 0)
    assert cache.in_flight() == 0
    cache.close()


def test_demand_load_failure_raises_and_frees_the_slot():
    store = FaultInjectingStore(STORE, [(0, 1)])           # fails everywhere
    cache = ExpertCache(store, 2)
    assert cache.prefetch(0, [1]) == 1
    assert cache.wait_idle(TIMEOUT)
    with pytest.raises(RuntimeError, match="loading expert 1 of layer 0 .* failed") as info:
        cache.acquire(0, 1)
    assert isinstance(info.value.__cause__, OSError)
    # no slot leaked: both slots still usable at once
    _check(cache.acquire(0, 2), 0, 2)
    _check(cache.acquire(0, 3), 0, 3)
    cache.release(0, 2)
    cache.release(0, 3)
    cache.close()


def test_queued_prefetch_failure_during_takeover_falls_back_to_demand():
    store = FaultInjectingStore(GatedStore(STORE, {(0, 0)}), {(0, 1): 1})
    cache = ExpertCache(store, 3)
    assert cache.prefetch(0, [0, 1]) == 2
    assert store.inner.started.wait(TIMEOUT)
    _check(cache.acquire(0, 1), 0, 1)                      # takeover read fails once, demand read works
    cache.release(0, 1)
    store.inner.gate.set()
    assert cache.wait_idle(TIMEOUT)
    assert cache.stats.misses == 1 and cache.stats.prefetch_failed == 1
    cache.close()


# -------------------------------------------------------------------- shutdown


def test_close_joins_the_worker_and_is_idempotent():
    before = len(_workers())
    cache = ExpertCache(STORE, 3)
    assert len(_workers()) == before + 1
    cache.prefetch(0, [0, 1])
    cache.close()
    cache.close()
    assert len(_workers()) == before
    assert cache.prefetch(0, [2]) == 0                     # closed: no prefetch, demand still works
    _check(cache.acquire(0, 2), 0, 2)


def test_close_drops_queued_prefetches():
    store = GatedStore(STORE, {(0, 0)})
    others = set(_workers())
    cache = ExpertCache(store, 4)
    assert cache.prefetch(0, [0, 1, 2]) == 3
    assert store.started.wait(TIMEOUT)
    closer = threading.Thread(target=cache.close)
    closer.start()
    time.sleep(0.05)
    store.gate.set()                                       # the running load finishes, the rest are dropped
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert cache.in_flight() == 0 and cache.resident_experts(0) <= {0}
    assert set(_workers()) <= others


def test_dropped_cache_stops_its_worker():
    cache = ExpertCache(STORE, 3)
    cache.prefetch(0, [0])
    cache.wait_idle(TIMEOUT)
    del cache
    gc.collect()
    assert _wait_no_workers()


def test_stats_object_is_shared_and_resettable():
    stats = RuntimeStats()
    cache = ExpertCache(STORE, 2, stats=stats, prefetch=False)
    _use(cache, 0, 0)
    assert stats.misses == 1 and stats.budget_bytes == cache.budget_bytes
    stats.reset()
    assert stats.misses == 0 and stats.budget_bytes == cache.budget_bytes
    assert stats.peak_cache_bytes == cache.slot_bytes       # what is allocated now
    assert "resident_rate" in stats.as_dict() and "RuntimeStats(" in repr(stats)


def test_with_a_safetensors_store(tmp_path):
    f = str(tmp_path / "m.safetensors")
    save_file({f"l{l}.{n}": t for l, d in LAYERS.items() for n, t in d.items()}, f)
    store = SafetensorsExpertStore({l: {n: TensorSource(fused=(f, f"l{l}.{n}")) for n in d} for l, d in LAYERS.items()})
    with ExpertCache(store, 3, policy="lfu") as cache:
        for l, e in KEYS:
            cache.prefetch(l, [(e + 1) % store.specs[l].num_experts])
            _check(cache.acquire(l, e), l, e)
            cache.release(l, e)
        assert cache.stats.peak_cache_bytes <= cache.budget_bytes
    store.close()


# ------------------------------------------------------------------ batched layer calls

lease_op = st.tuples(
    st.just("layer"), st.sampled_from(sorted(LAYERS)), st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True),
    st.sampled_from(["issue", "lazy"]), st.booleans(), st.sampled_from(["iterate", "wait_all", "break", "hold"]),
)
batched_ops = st.lists(st.one_of(op, lease_op, st.tuples(st.just("run"))), max_size=20)


def _check_slot_table(cache):
    table = cache.slot_table
    for layer in LAYERS:
        row = cache.pool.row[layer]
        shown = {e for e in range(STORE.specs[layer].num_experts) if int(table[row, e]) >= 0}
        assert shown == cache.resident_experts(layer)
        for e in shown:                  # the slot the table names holds that expert
            _check(cache.pool.views(int(table[row, e]), layer), layer, e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_slots=st.integers(1, TOTAL + 2),
    policy=st.sampled_from(VALID_POLICIES),
    prefetch=st.sampled_from([True, False, "deferred"]),
    worker_faults=st.sets(st.sampled_from(KEYS), max_size=3),
    caller_faults=st.sets(st.sampled_from(KEYS), max_size=2),
    interrupts=st.sets(st.sampled_from(KEYS), max_size=2),
    ops=batched_ops,
)
def test_random_batched_layer_calls(num_slots, policy, prefetch, worker_faults, caller_faults, interrupts, ops):
    # faults: OSError in the worker's reads (prefetch then demand), OSError and KeyboardInterrupt
    # in the caller's own reads (each once): the cache stays consistent and never hands out
    # a slot that is in flight, evicts a pinned one or leaves one pinned
    store = FaultInjectingStore(STORE, worker_faults, thread_prefix=WORKER_THREAD_NAME)
    store = FaultInjectingStore(store, dict.fromkeys(caller_faults, 1), thread_prefix="MainThread")
    store = FaultInjectingStore(store, dict.fromkeys(interrupts, 1), exc=KeyboardInterrupt, thread_prefix="MainThread")
    cache = ExpertCache(store, num_slots, policy=policy, prefetch=prefetch)
    held = None                      # a lease kept open across the next op: (lease, {expert: views})
    yielded = 0
    try:
        for kind, *rest in ops:
            if kind == "run":
                cache.run_prefetches()
                continue
            if kind != "layer":
                layer, experts = rest[0], [e % STORE.specs[rest[0]].num_experts for e in rest[1]]
                if kind == "prefetch":
                    cache.prefetch(layer, experts)
                elif kind == "hint":
                    cache.set_predicted(layer, experts, rest[2])
                else:
                    for e in list(dict.fromkeys(experts))[:1]:
                        try:
                            _check(cache.acquire(layer, e), layer, e)
                        except (RuntimeError, KeyboardInterrupt):
                            continue
                        yielded += 1
                        cache.release(layer, e)
                continue
            layer, experts, loads, first, how = rest
            experts = list(dict.fromkeys(e % STORE.specs[layer].num_experts for e in experts))
            open_pins = 0 if held is None else len(held[0].held)
            all_at_once = how in ("wait_all", "hold") and len(experts) <= cache.num_slots - open_pins
            if how in ("wait_all", "hold") and not all_at_once:
                how = "iterate"
            try:
                lease = cache.acquire_layer(layer, experts, loads=loads, resident_first=first,
                                            all_at_once=all_at_once)
            except KeyboardInterrupt:
                assert cache.pinned() == open_pins
                continue
            except RuntimeError as exc:
                # a failed caller read (OSError), or this thread's own open lease fills the cache
                assert isinstance(exc.__cause__, OSError) or "by this thread" in str(exc), exc
                assert cache.pinned() == open_pins
                continue
            got = {}
            try:
                if how in ("wait_all", "hold"):
                    got = lease.wait_all()
                    assert set(got) == set(experts)
                else:
                    for i, (e, views) in enumerate(lease):
                        _check(views, layer, e)      # never a slot still in flight
                        got[e] = views
                        if how == "break" and i == 0:
                            break
            except KeyboardInterrupt:
                pass
            except RuntimeError as exc:
                assert isinstance(exc.__cause__, OSError) or "by this thread" in str(exc), exc
            yielded += len(got)
            if how in ("wait_all", "hold"):
                for e, views in got.items():         # all held at once: none was evicted meanwhile
                    _check(views, layer, e)
            if held is not None:
                for e, views in held[1].items():     # an open lease's experts survive other calls
                    _check(views, held[0].layer, e)
                held[0].release()
                held = None
            if how == "hold" and len(got) == len(experts):
                held = (lease, got)
            else:
                lease.release()
                assert cache.pinned() == 0
            assert cache.allocated_bytes <= cache.budget_bytes
            if prefetch is not True:         # no worker running concurrently
                cache.check_consistency()
        if held is not None:
            held[0].release()
        assert cache.pinned() == 0
        if prefetch == "deferred":
            cache.run_prefetches()
        assert cache.wait_idle(TIMEOUT)
        assert cache.in_flight() == 0
        cache.check_consistency()
        _check_slot_table(cache)
        s = cache.stats.as_dict()
        assert s["uses"] >= yielded and s["hits"] + s["misses"] == s["uses"]
        assert s["demand_loads"] == s["misses"] and s["inflight_waits"] <= s["hits"]
        assert s["peak_cache_bytes"] <= s["budget_bytes"]
        assert s["prefetch_used"] + s["prefetch_late"] + s["prefetch_wasted"] <= s["prefetch_issued"] + \
            s["prefetch_failed"]
        expert_bytes = {l: STORE.specs[l].expert_nbytes() for l in LAYERS}
        assert s["bytes_moved"] == sum(per["bytes_moved"] for per in s["per_layer"].values())
        loads = sum(per["bytes_moved"] // expert_bytes[l] for l, per in s["per_layer"].items())
        assert loads == s["loads"]
    finally:
        cache.close()


def test_a_layer_call_larger_than_the_cache_runs_in_chunks():
    store = TensorExpertStore({0: _layer(12, 2, 2, torch.float32, 3)})
    layers = store._tensors
    cache = ExpertCache(store, 3, prefetch=False)
    lease = cache.acquire_layer(0, range(12))
    assert lease.chunked
    seen = []
    for e, views in lease:
        assert torch.equal(views["up"], layers[0]["up"][e])
        assert cache.pinned() <= 3
        seen.append(e)
    lease.release()
    assert sorted(seen) == list(range(12)) and cache.pinned() == 0
    assert cache.stats.peak_cache_bytes <= cache.budget_bytes
    with pytest.raises(RuntimeError, match="cannot be held at once in 3 expert cache slots"):
        cache.acquire_layer(0, range(4), all_at_once=True)


def test_lease_counts_like_per_expert_acquires():
    # the same sequence through leases and through acquire/release: same hits, misses, evictions
    def run(batched):
        cache = ExpertCache(STORE, 5, policy="lru", prefetch=False)
        g = torch.Generator().manual_seed(3)
        for _ in range(60):
            layer = int(torch.randint(3, (1,), generator=g))
            ex = sorted(set(torch.randint(STORE.specs[layer].num_experts, (3,), generator=g).tolist()))
            if batched:
                with cache.acquire_layer(layer, ex, loads="lazy") as lease:
                    for _e, _v in lease:
                        pass
            else:
                resident = [e for e in ex if cache.is_resident(layer, e)]
                for e in resident + [e for e in ex if e not in resident]:
                    cache.acquire(layer, e)
                    cache.release(layer, e)
        s = cache.stats.as_dict()
        return s["hits"], s["misses"], s["evictions"], sorted(cache.assigned())

    assert run(True) == run(False)


# ---------------------------------------------------------------------- threads and interrupts


def test_threads_take_turns_at_the_minimum_budget():
    # 4 threads, each holding 2 experts at once, on a cache of 2 slots: they wait for each
    # other instead of failing with "all slots are pinned"
    cache = ExpertCache(STORE, 2, prefetch=True)
    errors = []

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(25):
                layer = int(torch.randint(3, (1,), generator=g))
                n = STORE.specs[layer].num_experts
                ex = sorted(set(torch.randint(n, (2,), generator=g).tolist()))
                with cache.acquire_layer(layer, ex, all_at_once=True) as lease:
                    for e, views in lease.wait_all().items():
                        _check(views, layer, e)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    assert cache.pinned() == 0 and cache.stats.peak_cache_bytes <= cache.budget_bytes
    cache.close()


def test_waiting_for_other_threads_pins_is_bounded_and_names_the_cause():
    cache = ExpertCache(STORE, 2, prefetch=False, pin_timeout=0.3)
    holder = cache.acquire_layer(0, [0, 1])          # this thread holds both slots
    out = {}

    def other():
        try:
            cache.acquire_layer(1, [0], loads="lazy").wait_all()
        except RuntimeError as exc:
            out["error"] = exc

    t = threading.Thread(target=other)
    t0 = time.perf_counter()
    t.start()
    t.join(TIMEOUT)
    assert time.perf_counter() - t0 >= 0.3
    assert "stayed pinned by other threads" in str(out["error"]) and "expert_budget" in str(out["error"])
    holder.release()
    # the holder's own thread is told at once: waiting for itself could never end
    with cache.acquire_layer(0, [0, 1]):
        with pytest.raises(RuntimeError, match="pinned .* by this thread"):
            cache.acquire_layer(1, [0], loads="lazy").wait_all()
    assert cache.pinned() == 0
    cache.close()


@pytest.mark.parametrize("how", ["demand", "batch", "takeover"])
def test_keyboard_interrupt_in_a_load_propagates_and_leaves_the_cache_consistent(how):
    inner = GatedStore(STORE, {(0, 0)}) if how == "takeover" else STORE
    store = FaultInjectingStore(inner, {(0, 1): 1}, exc=KeyboardInterrupt, thread_prefix="MainThread")
    cache = ExpertCache(store, 3, prefetch=how == "takeover")
    if how == "takeover":                  # the worker is busy with (0, 0); (0, 1) waits queued
        assert cache.prefetch(0, [0, 1]) == 2
        assert inner.started.wait(TIMEOUT)
    with pytest.raises(KeyboardInterrupt):
        if how == "demand":
            cache.acquire(0, 1)
        elif how == "batch":
            cache.acquire_layer(0, [2, 1])
        else:
            with cache.acquire_layer(0, [1], loads="lazy") as lease:
                lease.wait_all()
    assert cache.pinned() == 0
    assert not cache.is_resident(0, 1)
    if how == "takeover":
        inner.gate.set()
    assert cache.wait_idle(TIMEOUT) and cache.in_flight() == 0
    _check(cache.acquire(0, 1), 0, 1)      # the next call is exact
    cache.release(0, 1)
    assert cache.stats.prefetch_failed == 0      # an interrupt is no failed prefetch
    cache.close()
