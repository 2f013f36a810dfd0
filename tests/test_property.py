"""Property test: random MoE shapes (experts, top-k, sizes, layers, batch, sequence)
compile to the same logits as eager."""

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from expertflow_compile.testing.tiny_models import build_tiny_model

from helpers import CapturingBackend, assert_fp32_close, count


@st.composite
def moe_configs(draw):
    family = draw(st.sampled_from(["mixtral", "qwen3_moe", "gpt_oss"]))
    E = draw(st.integers(2, 64))
    k = draw(st.integers(1, min(8, E)))
    hidden = draw(st.sampled_from([16, 24, 32]))
    # HF's own eager grouped_mm on CPU needs 16-byte strides: intermediate sizes in multiples of 4
    inter = 4 * draw(st.integers(1, 10))
    layers = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 1000))
    return family, dict(num_experts=E, top_k=k, hidden=hidden, inter=inter, num_layers=layers), batch, seq, seed


@given(moe_configs())
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_moe_compiles_exactly(cfg):
    family, sizes, batch, seq, seed = cfg
    torch._dynamo.reset()
    model = build_tiny_model(family, seed=seed, **sizes)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    backend = CapturingBackend()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x).logits
        ref = model(x).logits
    assert_fp32_close(out, ref)
    assert count(backend.graphs[0], "grouped_gemm") == sizes["num_layers"]
