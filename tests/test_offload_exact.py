"""Offloading through the budgeted cache: exact at every budget and policy, peak
cache bytes within budget, too-small budgets refused with the minimum."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import expertflow_compile as ef
from expertflow_compile.testing.tiny_models import build_tiny_model

from helpers import assert_fp32_close

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
def test_offloaded_generate_is_exact(family, policy):
    model = build_tiny_model(family, num_layers=2)
    x = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(x).logits
    ref = model.generate(x, max_new_tokens=8, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "25%", "policy": policy})
    with torch.no_grad():
        assert_fp32_close(model(x).logits, ref_logits)
    assert torch.equal(model.generate(x, max_new_tokens=8, do_sample=False), ref)
    s = ef.stats(model)
    assert s["offloading"] and s["misses"] > 0 and s["bytes_moved"] > 0
    assert 0 < s["peak_cache_bytes"] <= s["budget_bytes"]


@given(slots=st.integers(2, 16), policy=st.sampled_from(["lru", "lfu", "predictive"]),
       prefetch=st.booleans(), seq=st.integers(1, 8), seed=st.integers(0, 50))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_budget_from_minimum_to_all(slots, policy, prefetch, seq, seed):
    """Int budgets (n x 2 layers slots, shared) from the minimum (n=1: 2 slots = one layer's
    top-2) to all 8 per layer: exact logits."""
    torch._dynamo.reset()
    model = build_tiny_model("mixtral", num_layers=2, seed=seed)
    per_layer = max(1, min(8, slots // 2))
    x = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend="expertflow",
                            options={"expert_budget": per_layer, "policy": policy, "prefetch": prefetch})(x).logits
    assert_fp32_close(out, ref)
    s = ef.stats(model)
    assert s["peak_cache_bytes"] <= s["budget_bytes"]


def test_budget_below_one_layer_is_refused_with_the_minimum():
    model = build_tiny_model("mixtral", num_layers=2)   # top-2 of 8 experts, 2 layers
    compiled = torch.compile(model, backend="expertflow", options={"expert_budget": "5%"})
    with pytest.raises(ef.OptionError) as exc:   # unwrapped by Dynamo (README: Options, errors)
        compiled(torch.zeros(1, 3, dtype=torch.long))
    msg = str(exc.value)
    assert "needs 2 resident experts at once" in msg and "expert_budget >=" in msg


def test_two_models_with_separate_budgets_in_one_process():
    a = build_tiny_model("mixtral", num_layers=2, seed=1)
    b = build_tiny_model("qwen3_moe", num_layers=2, seed=2)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ra, rb = a(x).logits, b(x).logits
    a.compile(backend="expertflow", options={"expert_budget": "25%"})
    b.compile(backend="expertflow", options={"expert_budget": "50%"})
    with torch.no_grad():
        assert_fp32_close(a(x).logits, ra)
        assert_fp32_close(b(x).logits, rb)
    sa, sb = ef.stats(a), ef.stats(b)
    assert sa["budget_bytes"] != sb["budget_bytes"]
    assert sa["budget_bytes"] > 0 and sb["budget_bytes"] > 0
    # Each model keeps its own counters: resetting one leaves the other as it was.
    assert sa["misses"] > 0 and sb["misses"] > 0
    ef.reset_stats(a)
    after_a, after_b = ef.stats(a), ef.stats(b)
    assert after_a["hits"] == 0 and after_a["misses"] == 0 and after_a["bytes_moved"] == 0
    assert (after_b["hits"], after_b["misses"], after_b["bytes_moved"]) == \
        (sb["hits"], sb["misses"], sb["bytes_moved"])
