"""Decode regrouping: the pooled KV cache keeps every row's keys, values, mask and
positions; greedy tokens equal generating each prompt alone, whatever the grouping; groups
partition the pool every round; bad input is refused before any work."""

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from expertflow_compile.tools.regroup import GROUP_BY, PooledKV, _Signatures, generate_regrouped, order_groups
from expertflow_compile.tools.schedule import form_batches
from expertflow_compile.testing.tiny_models import build_tiny_model


def _prefilled_batch(g, rows: int, lengths: list[int], layers: int, heads: int, dims: tuple[int, int]):
    """A left-padded batch as a prefill leaves it: per layer (keys, values), and its mask."""
    width = max(lengths)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    kv = [(torch.randn(rows, heads, width, dims[0], generator=g), torch.randn(rows, heads, width, dims[1], generator=g))
          for _ in range(layers)]
    return kv, mask


@given(seed=st.integers(0, 10_000), n_batches=st.integers(1, 3), rows=st.integers(1, 4), layers=st.integers(1, 3),
       steps=st.integers(0, 4), kdim=st.sampled_from([4, 6]), vdim=st.sampled_from([4, 5]))
@settings(max_examples=40, deadline=None)
def test_pooled_kv_keeps_each_rows_real_columns_through_any_regrouping(seed, n_batches, rows, layers, steps, kdim, vdim):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    parts = [_prefilled_batch(g, rows, [rng.randint(1, 7) for _ in range(rows)], layers, 2, (kdim, vdim))
             for _ in range(n_batches)]
    # what each row must keep: its real columns, in order
    expect = []
    for kv, mask in parts:
        for r in range(mask.shape[0]):
            real = mask[r].bool()
            expect.append([(k[r][:, real], v[r][:, real]) for k, v in kv])
    pool = PooledKV.from_batches(parts, capacity_extra=steps)
    n = len(expect)
    for _ in range(steps):
        order = list(range(n))
        rng.shuffle(order)
        cut = rng.randint(1, n)
        for group in (order[:cut], order[cut:]):
            if not group:
                continue
            rows_t = torch.tensor(group)
            cache, mask = pool.gather(rows_t, config=None)
            assert mask.shape == (len(group), pool.width + 1) and bool(mask[:, -1].all())
            new = [(torch.randn(len(group), 2, 1, kdim, generator=g), torch.randn(len(group), 2, 1, vdim, generator=g))
                   for _ in range(layers)]
            for li, (k, v) in enumerate(new):
                cache.update(k, v, li)        # what the model's attention does during the step
            pool.put_step(rows_t, cache)
            for j, r in enumerate(group):
                expect[r] = [(torch.cat([ek, k[j]], dim=1), torch.cat([ev, v[j]], dim=1))
                             for (ek, ev), (k, v) in zip(expect[r], new)]
        pool.advance()
    every = torch.arange(n)
    cache, mask = pool.gather(every, config=None)
    for r in range(n):
        real = mask[r, :-1].bool()
        assert int(real.sum()) == expect[r][0][0].shape[1]
        assert bool(real[-int(real.sum()):].all())      # rows stay right-aligned
        for (k, v, *_), (ek, ev) in zip(cache, expect[r]):
            assert torch.equal(k[r][:, real], ek) and torch.equal(v[r][:, real], ev)


def _prompts(seed: int, n: int, vocab: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(k),), generator=g) for k in torch.randint(2, 10, (n,), generator=g)]


def _alone(model, prompts, new):
    return [model.generate(p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)[0, p.numel():] for p in prompts]


@pytest.mark.parametrize("family,seed", [("mixtral", 3), ("qwen2_moe", 11)])
def test_regrouped_tokens_equal_each_prompt_generated_alone(family, seed):
    rng = random.Random(seed)
    batch, pools, new = rng.randint(2, 3), rng.randint(2, 3), rng.randint(4, 6)
    n = batch * pools + rng.randint(1, batch)          # a full pool and a partial one
    model = build_tiny_model(family, num_layers=2, num_experts=rng.choice([8, 12]), top_k=2, seed=seed)
    prompts = _prompts(seed, n)
    singles = _alone(model, prompts, new)
    model.compile(backend="expertflow", options={"expert_budget": "50%"})
    for group_by in GROUP_BY:
        res = generate_regrouped(model, prompts, batch_size=batch, pool_batches=pools, group_by=group_by,
                                 max_new_tokens=new)
        for i, (out, ref) in enumerate(zip(res.outputs, singles)):
            assert torch.equal(out, ref), (group_by, i)
        assert len(res.groups) == (new - 1) * -(-n // (batch * pools))
        for round_groups in res.groups:           # each round: a partition of its pool, groups <= batch
            members = sorted(i for g in round_groups for i in g)
            assert members == list(range(members[0], members[0] + len(members)))
            assert all(1 <= len(g) <= batch for g in round_groups)
        if group_by == "arrival":
            assert all(g == list(range(g[0], g[0] + len(g))) for r in res.groups for g in r)
        else:                                      # the routing signatures moved some sequence
            assert any(g != list(range(g[0], g[0] + len(g))) for r in res.groups for g in r)


def test_token_signature_names_the_experts_a_token_was_routed_to_and_falls_back_to_last_step():
    sig = _Signatures(num_rows=3, layers=[0, 1], num_experts=6, top_k=2)
    # one prefill of 3 rows x 2 positions; row 2's first position is padding
    tokens = torch.tensor([[5, 7], [5, 9], [0, 7]])
    ids = {0: torch.tensor([[0, 1], [2, 3], [0, 1], [4, 5], [5, 4], [2, 3]]),
           1: torch.tensor([[1, 2], [3, 4], [1, 2], [0, 5], [0, 1], [3, 4]])}
    sig.observe([0, 1, 2], tokens, ids, real=torch.tensor([[1, 1], [1, 1], [0, 1]]))
    s = sig.next_step([0, 1, 2], [5, 7, 9], "token")
    assert torch.equal(s[0, 0] > 0, torch.tensor([True, True, False, False, False, False]))   # token 5 at layer 0
    assert torch.equal(s[1, 1] > 0, torch.tensor([False, False, False, True, True, False]))   # token 7 at layer 1
    assert torch.equal(s[2, 0] > 0, torch.tensor([False, False, False, False, True, True]))   # token 9
    assert torch.allclose(s.sum(-1), torch.ones(3, 2))
    unseen = sig.next_step([0, 1, 2], [42, 42, 42], "token")
    assert torch.equal(unseen, sig.next_step([0, 1, 2], [42, 42, 42], "last"))
    assert torch.equal(unseen[1, 0] > 0, torch.tensor([False, False, False, False, True, True]))   # row 1's last
    assert int(tokens[2, 0]) not in sig.by_token                                                  # pads not learnt


def test_regrouping_by_routing_groups_sequences_that_route_alike():
    # two kinds of rows, interleaved in arrival order; their tokens route to disjoint experts
    sig = _Signatures(num_rows=8, layers=[0], num_experts=8, top_k=2)
    tokens = torch.tensor([[1 + r % 2] for r in range(8)])
    ids = {0: torch.tensor([[0, 1] if r % 2 == 0 else [6, 7] for r in range(8)])}
    sig.observe(list(range(8)), tokens, ids)
    groups = form_batches(sig.next_step(list(range(8)), tokens[:, 0].tolist(), "token"), 4)
    assert sorted(groups) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_generate_regrouped_rejects_bad_input_before_any_work():
    model = build_tiny_model("mixtral", num_layers=1)
    p = [torch.ones(3, dtype=torch.long)]
    with pytest.raises(ValueError, match="'token', 'last', 'arrival'"):
        generate_regrouped(model, p, batch_size=2, group_by="fifo")
    with pytest.raises(ValueError, match="pool_batches must be >= 1"):
        generate_regrouped(model, p, batch_size=2, pool_batches=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_regrouped(model, p, batch_size=2, max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate_regrouped(model, [torch.ones(0, dtype=torch.long)], batch_size=2)
    with pytest.raises(ValueError, match="generate_regrouped needs a model compiled with backend='expertflow'"):
        generate_regrouped(model, p, batch_size=2)
    sliding = build_tiny_model("gpt_oss", num_layers=2)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        generate_regrouped(sliding, p, batch_size=2)


def test_order_groups_chains_each_group_to_the_one_sharing_most_experts():
    # rows 0-1 use experts {0,1}, rows 2-3 {2,3}, rows 4-5 {3,4}; the last forward used {4, 5}
    predicted = torch.zeros(6, 1, 6)
    for r, experts in enumerate([(0, 1), (0, 1), (2, 3), (2, 3), (3, 4), (3, 4)]):
        predicted[r, 0, list(experts)] = 0.5
    last = torch.zeros(1, 6, dtype=torch.bool)
    last[0, [4, 5]] = True
    groups = [[0, 1], [2, 3], [4, 5]]
    assert order_groups(groups, predicted, last) == [[4, 5], [2, 3], [0, 1]]
    assert sorted(order_groups(groups, predicted, torch.zeros(1, 6, dtype=torch.bool))) == sorted(groups)


@pytest.mark.slow
def test_regrouped_tokens_on_the_shipped_fine_grained_model_equal_each_prompt_alone():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import expertflow_compile as ef
    from expertflow_compile.assets import HELDOUT_TEXT, shipped_model_path

    path = shipped_model_path("tiny_qwen2_moe")
    tok = AutoTokenizer.from_pretrained(path)
    lines = [ln for ln in open(HELDOUT_TEXT, encoding="utf-8").read().splitlines() if len(ln.split()) >= 6]
    prompts = [tok(ln, return_tensors="pt").input_ids[0][:12] for ln in random.Random(0).sample(lines, 16)]
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    singles = _alone(eager, prompts, 8)
    model = ef.from_pretrained(path, dtype=torch.float32)
    model.compile(backend="expertflow", options={"expert_budget": "25%"})
    res = generate_regrouped(model, prompts, batch_size=4, pool_batches=4, group_by="token", max_new_tokens=8)
    assert all(torch.equal(o, r) for o, r in zip(res.outputs, singles))
    assert any(g != list(range(g[0], g[0] + len(g))) for r in res.groups for g in r)
