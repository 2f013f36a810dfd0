"""Models that are not (fully) matchable stay exact and are reported."""

import torch
import torch.nn as nn

import expertflow_compile as ef
from expertflow_compile.testing.tiny_models import build_tiny_model

from helpers import CapturingBackend, assert_fp32_close, count


def test_dense_model_compiles_exactly_with_zero_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 6))
    compiled = torch.compile(model, backend=CapturingBackend())
    with torch.no_grad():
        assert_fp32_close(compiled(x).logits, model(x).logits)
    report = ef.explain(model, x)
    assert report.blocks == [] and report.untouched == []
    assert "0 MoE block(s) rewritten" in str(report)


def test_eager_expert_loop_is_traced_grouped_under_expertflow_and_left_alone_otherwise():
    """experts_implementation="eager" (HF's per-expert loop): under expertflow Dynamo
    traces HF's grouped form instead (traceable.py), so every layer is matched and
    offloaded; eager and other backends still run the loop (Dynamo splits it off)."""
    model = build_tiny_model("mixtral", experts_implementation="eager")
    x = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        ref = model(x).logits
        torch._dynamo.utils.counters.clear()
        assert_fp32_close(torch.compile(model, backend="aot_eager")(x).logits, ref)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) > 0, "the loop must still break"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="expertflow", options={"expert_budget": "50%"})
    with torch.no_grad():
        assert_fp32_close(compiled(x).logits, ref)
    s = ef.stats(compiled)
    assert s["layers"] == [0, 1] and s["bytes_moved"] > 0
    report = ef.explain(model, x)
    assert len(report.blocks) == 2 and report.untouched == []


class _OddExperts(nn.Module):
    """Looks like HF experts (3-D weights, grouped dispatch) but doubles every token's
    output after the combine: the structure matches, the numbers would not."""

    def __init__(self, E=4, H=16, I=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.1)

    def forward(self, x, ids, w):
        scale = torch.arange(1, ids.shape[0] + 1, dtype=x.dtype).unsqueeze(-1)
        return (_standard(self, x, ids, w) * scale).to(x.dtype)


class _OddMoE(nn.Module):
    def __init__(self, E=4, H=16):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = _OddExperts(E, H)

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        w, ids = torch.topk(probs, 2, dim=-1)
        return x + self.experts(x, ids, w)


def _compiled_matches_eager(model, x) -> CapturingBackend:
    backend = CapturingBackend()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        ref = model(x)
    assert_fp32_close(out, ref)
    return backend


def test_block_that_fails_the_self_check_is_left_untouched_and_exact():
    torch.manual_seed(0)
    model = _OddMoE().eval()
    x = torch.randn(5, 16)
    backend = _compiled_matches_eager(model, x)
    assert count(backend.graphs[0], "grouped_gemm") == 0
    report = ef.explain(model, x)
    assert len(report.untouched) == 1 and "disagrees" in report.untouched[0].reason


def test_custom_moe_with_standard_combine_is_matched():
    """The same module without the odd scaling is a plain MoE: matched and exact."""
    torch.manual_seed(0)
    model = _OddMoE().eval()
    model.experts.forward = lambda x, ids, w: _standard(model.experts, x, ids, w)
    x = torch.randn(5, 16)
    backend = _compiled_matches_eager(model, x)
    assert count(backend.graphs[0], "grouped_gemm") == 1


def _standard(self, x, ids, w):
    T, K = ids.shape
    rows = x.repeat_interleave(K, dim=0)
    flat = ids.reshape(-1)
    h = torch.bmm(self.gate_up_proj[flat], rows.unsqueeze(-1)).squeeze(-1)
    g, u = h.chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u
    y = torch.bmm(self.down_proj[flat], h.unsqueeze(-1)).squeeze(-1)
    y = y * w.reshape(-1).unsqueeze(-1)
    return y.view(T, K, -1).sum(1).to(x.dtype)


def test_prefetch_survives_dead_code_elimination():
    model = build_tiny_model("mixtral")
    backend = CapturingBackend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.zeros(1, 4, dtype=torch.long))
    gm = backend.graphs[0]
    before = count(gm, "prefetch")
    gm.graph.eliminate_dead_code()
    assert count(gm, "prefetch") == before == model.config.num_hidden_layers
    for n in gm.graph.nodes:
        if n.op == "call_function" and "prefetch" in str(n.target):
            assert any("grouped_gemm" in str(u.target) for u in n.users)


import pytest  # noqa: E402


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_rewritten_graph_runs_under_other_inner_backends(inner):
    from helpers import assert_fp32_close as close

    model = build_tiny_model("mixtral", num_layers=2)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend="expertflow",
                            options={"inner_backend": inner, "expert_budget": "50%"})(x).logits
    close(out, ref)
    assert ef.stats(model)["misses"] > 0


class _Experts(nn.Module):
    def __init__(self, E=4, H=16, I=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.1)

    def forward(self, x, ids, w):
        return _standard(self, x, ids, w)


class _BrokenLayer(nn.Module):
    """An MoE layer with a graph break inside: Dynamo compiles its frame once and runs
    the same graph for every layer instance."""

    def __init__(self, E=4, H=16):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = _Experts(E, H)

    def forward(self, x):
        w, ids = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        out = x + self.experts(x, ids, w)
        torch._dynamo.graph_break()
        return out


@pytest.mark.parametrize("budget", [None, 4])
def test_graph_shared_by_several_layers_stays_exact_when_offloading(budget):
    torch.manual_seed(0)
    net = nn.Sequential(_BrokenLayer(), _BrokenLayer(), _BrokenLayer()).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = net(x)
        out = torch.compile(net, backend="expertflow", options={"expert_budget": budget})(x)
    assert_fp32_close(out, ref)
    s = ef.stats(net)
    assert s["layers"] == [0, 1, 2]        # each module's experts bound as a layer of its own
    assert s["offloading"] == (budget is not None)
