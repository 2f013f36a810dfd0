"""The pieces of one layer call on the fast path: host-side routing groups pairs exactly as
the ``permute`` op does, ``read_many`` (one by one or gathered) writes exactly what
``read_into`` writes and nothing else, the combine by the inverse permutation and the
per-layer expert loop are bitwise the reference ones, and the eager lowering keeps the
compiled model's outputs and its ``InferenceOnlyError``."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertflow_compile.kernels.reference import combine_topk, combine_topk_inverse, expert_forward, permute_math
from expertflow_compile.layer import ExpertMath
from expertflow_compile.runtime.engine import _host_route
from expertflow_compile.runtime.host_tensors import StackedTensorStore
from expertflow_compile.runtime.layer_math import layer_forward
from expertflow_compile.runtime.pool import SlotPool

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(t=st.integers(1, 40), k=st.integers(1, 8), e=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_host_route_groups_pairs_like_permute(t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t, k), generator=g)
    active, spans, pairs = _host_route(ids, 0, e)
    order, offsets = permute_math(ids, e)
    offs = offsets.tolist()
    assert active == [x for x in range(e) if offs[x + 1] > offs[x]]
    assert spans == [(offs[x], offs[x + 1]) for x in active]
    assert pairs == order.tolist()


@FAST
@given(t=st.integers(1, 6), k=st.integers(1, 4), bad=st.sampled_from([-1, 8, 100]), seed=st.integers(0, 2**16))
def test_host_route_refuses_ids_out_of_range(t, k, bad, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (t, k), generator=g)
    ids.view(-1)[int(torch.randint(0, t * k, (1,), generator=g))] = bad
    with pytest.raises(RuntimeError, match=r"outside \[0, 8\)"):
        _host_route(ids, 3, 8)


@FAST
@given(num_experts=st.integers(2, 40), n=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16), row_views=st.booleans())
def test_read_many_writes_what_read_into_writes(num_experts, n, dtype, seed, row_views):
    """Both paths (few experts: one copy each; many: one gather + scatter), with and without
    the pool's per-row views, against read_into; the slots not named stay as they were."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, num_experts)
    layers = {0: {"up": torch.randn(num_experts, 6, 4, generator=g).to(dtype),
                  "down": torch.randn(num_experts, 4, 3, generator=g).to(dtype)}}
    store = StackedTensorStore(layers)
    slots = n + 3
    pool = SlotPool(slots, store.specs[0].slot_nbytes(), torch.device("cpu"), store.specs)
    pool._buffer().fill_(7)
    before = pool.buf.clone()
    experts = torch.randperm(num_experts, generator=g)[:n].tolist()
    rows = torch.randperm(slots, generator=g)[:n].tolist()
    store.read_many(0, experts, pool.stacked(0), rows, pool.stacked_rows(0) if row_views else None)
    for e, r in zip(experts, rows):
        want = {name: torch.empty_like(t) for name, t in pool.views(r, 0).items()}
        store.read_into(0, e, want)
        for name, t in pool.views(r, 0).items():
            assert torch.equal(t, want[name])
    untouched = [r for r in range(slots) if r not in rows]
    for r in untouched:
        assert torch.equal(pool.slot_buffer(r), before.view(slots, -1)[r])


def test_read_many_refuses_bad_experts():
    store = StackedTensorStore({0: {"up": torch.zeros(4, 2, 2)}})
    pool = SlotPool(4, store.specs[0].slot_nbytes(), torch.device("cpu"), store.specs)
    for bad in ([4], [-1, 0]):
        with pytest.raises((IndexError, KeyError)):
            store.read_many(0, bad, pool.stacked(0), list(range(len(bad))))


@FAST
@given(t=st.integers(1, 12), k=st.integers(1, 8), h=st.integers(1, 16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_combine_by_inverse_is_bitwise_the_combine(t, k, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(t * k, h, generator=g).to(dtype)
    weights = torch.rand(t, k, generator=g)
    order = torch.randperm(t * k, generator=g)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(t * k)
    for out_dtype in (dtype, torch.float32):
        assert torch.equal(combine_topk_inverse(rows, weights, inverse, out_dtype),
                           combine_topk(rows, weights, order, out_dtype))


def _swiglu(h):
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


@FAST
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=9), transposed=st.booleans(),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_layer_forward_is_bitwise_expert_by_expert(sizes, transposed, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hdim, inter = 8, 6
    math = ExpertMath(up_transposed=transposed, down_transposed=transposed, gate_fn=_swiglu)
    weights = []
    for _ in sizes:
        up = torch.randn(2 * inter, hdim, generator=g).to(dtype)
        down = torch.randn(hdim, inter, generator=g).to(dtype)
        if transposed:
            up, down = up.t().contiguous(), down.t().contiguous()
        weights.append({"up": up, "down": down, "up2": None,
                        "up_bias": torch.randn(2 * inter, generator=g).to(dtype) if bias else None,
                        "down_bias": torch.randn(hdim, generator=g).to(dtype) if bias else None})
    rows = torch.randn(sum(sizes), hdim, generator=g).to(dtype)
    spans, a = [], 0
    for s in sizes:
        spans.append((a, a + s))
        a += s
    out = layer_forward(rows, spans, weights, math)
    ref = torch.cat([expert_forward(rows[a:b], w, math) for (a, b), w in zip(spans, weights)])
    assert torch.equal(out, ref)
