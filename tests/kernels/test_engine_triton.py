"""The grouped_gemm op through the fused Triton kernels (kernels="triton"), end to end
through a compiled HF model, under the Triton interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import expertflow_compile as ef  # noqa: E402
from expertflow_compile.kernels import triton_moe as tm  # noqa: E402
from expertflow_compile.testing.tiny_models import build_tiny_model  # noqa: E402

if not tm._triton_imported_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("budget", [None, "50%"])
def test_compiled_model_through_triton_kernels_is_exact(family, budget, monkeypatch):
    calls = []
    original = tm.triton_grouped_experts

    def counting(*args, **kwargs):
        calls.append(kwargs["kind"].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(tm, "triton_grouped_experts", counting)
    torch._dynamo.reset()
    model = build_tiny_model(family, num_layers=2, hidden=16, inter=16)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend="expertflow",
                            options={"kernels": "triton", "expert_budget": budget})(x).logits
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * scale
    assert calls == [{"mixtral": "silu_glu", "gpt_oss": "swiglu_oai"}[family]] * 2
    s = ef.stats(model)
    assert s["hits"] + s["misses"] > 0
