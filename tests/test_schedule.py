"""Token scheduling: batches by routing, outputs in the caller's order, same tokens
whatever the schedule."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from expertflow_compile.tools.schedule import _expert_sets, batch_cost, form_batches, generate_batched
from expertflow_compile.testing.tiny_models import build_tiny_model


@given(n=st.integers(1, 20), b=st.integers(1, 6), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_form_batches_partitions_and_never_loses_to_arrival_on_clustered_routing(n, b, seed):
    g = torch.Generator().manual_seed(seed)
    # prompts from 3 "topics", each topic using its own experts per layer
    topics = torch.randint(0, 3, (n,), generator=g)
    sigs = torch.zeros(n, 2, 9)
    for i, t in enumerate(topics.tolist()):
        sigs[i, :, 3 * t:3 * t + 3] = torch.rand(2, 3, generator=g) + 0.1
    sigs = sigs / sigs.sum(-1, keepdim=True)
    batches = form_batches(sigs, b)
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert all(len(batch) <= b for batch in batches)
    arrival = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
    sets = _expert_sets(sigs, 0.9)
    assert batch_cost(sets, batches) <= batch_cost(sets, arrival)


def test_form_batches_groups_topics_together():
    sigs = torch.zeros(8, 1, 4)
    for i in range(8):
        sigs[i, 0, (i % 2) * 2:(i % 2) * 2 + 2] = 0.5   # even prompts: experts 0,1; odd: 2,3
    batches = form_batches(sigs, 4)
    assert sorted(map(sorted, batches)) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_generate_batched_same_tokens_whatever_the_schedule():
    model = build_tiny_model("mixtral", num_layers=2, seed=5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (int(n),), generator=g) for n in torch.randint(3, 9, (6,), generator=g)]
    singles = [model.generate(p[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[0, p.numel():]
               for p in prompts]
    model.compile(backend="expertflow", options={"expert_budget": "50%"})
    for schedule in ("arrival", "routing"):
        res = generate_batched(model, prompts, batch_size=4, schedule=schedule, max_new_tokens=5)
        assert sorted(i for b in res.batches for i in b) == list(range(6))
        for out, ref in zip(res.outputs, singles):
            assert torch.equal(out, ref), schedule


def test_generate_batched_rejects_bad_arguments():
    model = build_tiny_model("mixtral", num_layers=1)
    with pytest.raises(ValueError, match="'routing' or 'arrival'"):
        generate_batched(model, [torch.ones(3, dtype=torch.long)], batch_size=2, schedule="fifo")
    with pytest.raises(ValueError, match="compiled with backend='expertflow'"):
        generate_batched(model, [torch.ones(3, dtype=torch.long)], batch_size=2, schedule="routing")
