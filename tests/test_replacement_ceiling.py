"""The next-call ceiling (tools/replay.py's ``"next-call"``) and simulate's overlap bound.

``next-call`` tells the predictive policy each layer's true next call as a complete
prediction once the layer's call ends, and never prefetches: what a perfect next-token
routing predictor could give the replacement; ``rest-of-pass`` tells it, at each step's
first layer call, the step's later calls. Both are real runs of the cache, so they can
never beat Belady's MIN; they must use what they are told (fewer loads than the policy
alone on routing with locality); their figures must add up as every replay's do.
"""

import dataclasses
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow_compile.runtime.trace import RoutingTrace
from expertflow_compile.tools.replay import _following_calls, belady_min, layer_calls, replay
from expertflow_compile.tools.simulate import PROFILES, SHAPES, overlap_bound


def _trace(num_layers, num_experts, top_k, seq_lens, seed, skew=3.0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    n = sum(seq_lens)
    probs = torch.rand(num_layers, num_experts, generator=g) ** skew + 0.05
    ids = {l: torch.stack([torch.multinomial(probs[l], top_k, generator=g) for _ in range(n)]) for l in range(num_layers)}
    offs = torch.tensor([0] + list(seq_lens)).cumsum(0)
    return RoutingTrace(
        layers=list(range(num_layers)), num_experts=dict.fromkeys(range(num_layers), num_experts),
        top_k=dict.fromkeys(range(num_layers), top_k), ids=ids, weights={l: torch.ones(n, top_k) for l in ids},
        token_ids=torch.zeros(n, dtype=torch.long), seq_offsets=offs, batch_offsets=offs.clone())


def test_following_calls_names_each_layers_next_call():
    tr = _trace(3, 4, 1, [5, 4], seed=0)
    for batch in (1, 2):
        calls = layer_calls(tr, batch)
        nxt = _following_calls(calls)
        for i, j in enumerate(nxt):
            later = [k for k in range(i + 1, len(calls)) if calls[k].layer == calls[i].layer]
            assert j == (later[0] if later else None)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 4), experts=st.integers(2, 9), k=st.integers(1, 3), batch=st.sampled_from([1, 2]),
       share=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
def test_next_call_is_a_real_run_that_never_beats_min(layers, experts, k, batch, share, seed):
    k = min(k, experts)
    tr = _trace(layers, experts, k, [7, 5, 6], seed)
    calls = layer_calls(tr, batch)
    slots = max(k, min(layers * experts, int(round(share * layers * experts))))
    mn = belady_min(calls, slots)
    for ceiling in ("next-call", "rest-of-pass"):
        r = replay(tr, calls, slots, "predictive", ceiling)
        assert r.loads >= mn.loads and r.min_loads == mn.loads and r.uses == mn.uses
        assert r.prefetch_loads == 0 and r.wasted_loads == 0 and r.ready == r.resident     # it never prefetches
        assert r.loads == r.demand_loads == r.uses - r.resident
        if slots >= layers * experts:            # everything fits: only first uses load
            assert r.loads == len({(c.layer, e) for c in calls for e in c.active})
        # other policies ignore hints: LRU told the future is LRU
        assert replay(tr, calls, slots, "lru", ceiling).loads == replay(tr, calls, slots, "lru").loads


def test_next_call_uses_what_it_is_told():
    """On skewed routing at batch 1 and a tight budget, knowing each layer's next call saves
    loads over the policy alone (summed over seeded traces: equal totals mean the hints were
    ignored)."""
    told = rest = alone = 0
    for seed in range(12):
        tr = _trace(4, 8, 2, [40, 40], seed)
        calls = layer_calls(tr, 1)
        slots = 8
        told += replay(tr, calls, slots, "predictive", "next-call").loads
        rest += replay(tr, calls, slots, "predictive", "rest-of-pass").loads
        alone += replay(tr, calls, slots, "predictive").loads
    assert told < alone and rest < alone


def test_overlap_bound_is_compute_time_over_link_time():
    shape, prof = SHAPES["mixtral-8x7b"], PROFILES["rtx4090-pcie4"]
    per_layer = (shape.layer_dense_bytes() + shape.top_k * shape.expert_bytes) / (prof.mem_GBps * 1e9) \
        + prof.layer_overhead_us * 1e-6
    expected = shape.num_layers * per_layer / (shape.expert_bytes / (prof.link_GBps * 1e9))
    assert math.isclose(overlap_bound(shape, prof), expected, rel_tol=1e-9)
    assert math.isclose(overlap_bound(shape, prof, tokens=3), 3 * expected, rel_tol=1e-9)
    # leading dense layers are compute the link can overlap too (DeepSeek-V3: 3 of them)
    ds = SHAPES["deepseek-v3"]
    no_dense = dataclasses.replace(ds, dense_layers=0)
    assert overlap_bound(ds, prof) > overlap_bound(no_dense, prof)
    # twice the link moves twice the experts in the same compute time
    fast = dataclasses.replace(prof, link_GBps=2 * prof.link_GBps)
    assert math.isclose(overlap_bound(shape, fast), 2 * expected, rel_tol=1e-9)
