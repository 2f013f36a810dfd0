"""Pass-level tests: the matcher, the rewrite and the check, each called directly on the
FX graph Dynamo gives for small hand-written MoE modules (no HF model, no engine).

A wrong structural decision shows here as a wrong field or op count, not only after a
whole model compiled. The modules are written the way an MoE library writes them: a
router linear, top-k, and an experts submodule called as ``experts(x, ids, weights)``
that gathers each (token, k) pair's expert weights (the ``batched_mm`` form); configs are
drawn at random.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import expertflow_compile.compiler.ops  # noqa: F401 - registers torch.ops.expertflow
from expertflow_compile.compiler.passes.match import find_moe_blocks
from expertflow_compile.compiler.passes.rewrite import rewrite_moe_block
from expertflow_compile.compiler.passes.verify import check_blocks
from helpers import count


class Experts(nn.Module):
    def __init__(self, E, H, I, act, bias):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H) * 0.2)
        self.down = nn.Parameter(torch.randn(E, H, I) * 0.2)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * I) * 0.1) if bias else None
        self.down_bias = nn.Parameter(torch.randn(E, H) * 0.1) if bias else None
        self.act = act

    def forward(self, x, ids, w):
        T, H = x.shape
        K = ids.shape[-1]
        rows = x.repeat_interleave(K, dim=0)
        e = ids.reshape(-1)
        h = torch.bmm(self.gate_up[e], rows.unsqueeze(-1)).squeeze(-1)
        if self.gate_up_bias is not None:
            h.add_(self.gate_up_bias[e])   # HF's batched form adds the gathered bias in place
        g, u = h.chunk(2, dim=-1)
        h = (F.silu(g) if self.act == "silu" else F.gelu(g)) * u
        y = torch.bmm(self.down[e], h.unsqueeze(-1)).squeeze(-1)
        if self.down_bias is not None:
            y.add_(self.down_bias[e])
        y = y * w.reshape(-1).unsqueeze(-1)
        return y.view(T, K, H).sum(1)


class MoE(nn.Module):
    """Router -> top-k -> experts; ``softmax_first``: softmax over all logits then top-k
    (Mixtral/Qwen) rather than top-k then softmax; ``renorm``: weights renormalised."""

    def __init__(self, E=6, H=16, I=24, K=2, act="silu", renorm=True, softmax_first=True, bias=False):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = Experts(E, H, I, act, bias)
        self.K, self.renorm, self.softmax_first = K, renorm, softmax_first

    def route(self, x):
        logits = self.router(x)
        if self.softmax_first:
            w, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.K, dim=-1)
        else:
            w, ids = torch.topk(logits, self.K, dim=-1)
            w = F.softmax(w, dim=-1, dtype=torch.float)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), ids

    def forward(self, x):
        w, ids = self.route(x)
        return self.experts(x, ids, w)


class TwoLayers(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList([MoE(**kw), MoE(**kw)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class FlatMoE(MoE):
    """The same math with the experts inlined into the block's own forward: no module scope
    bounds the dispatch region."""

    def forward(self, x):
        w, ids = self.route(x)
        return Experts.forward(self.experts, x, ids, w)


class DenseMixture(MoE):
    """A router and top-k, but every expert computes on every token (no dispatch by id)."""

    def forward(self, x):
        w, ids = self.route(x)
        gates = torch.zeros(x.shape[0], self.router.out_features, dtype=x.dtype).scatter(1, ids, w)
        h = torch.einsum("th,enh->ten", x, self.experts.gate_up)
        g, u = h.chunk(2, dim=-1)
        y = torch.einsum("ten,ehn->teh", F.silu(g) * u, self.experts.down)
        return (y * gates.unsqueeze(-1)).sum(1)


class CaptureBackend:
    """A backend that keeps the graph Dynamo hands it and its example inputs, and runs it."""

    def __init__(self):
        self.graphs: list[tuple[fx.GraphModule, list]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def capture(module: nn.Module, *inputs) -> tuple[fx.GraphModule, list, dict]:
    """The one graph of ``module(*inputs)``, its example inputs and placeholder -> value."""
    torch._dynamo.reset()
    backend = CaptureBackend()
    with torch.no_grad():
        torch.compile(module, backend=backend, fullgraph=True)(*inputs)
    assert len(backend.graphs) == 1
    gm, example = backend.graphs[0]
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example))
    return gm, example, values


GROUPED = torch.ops.expertflow.grouped_gemm.default

configs = st.fixed_dictionaries({
    "E": st.integers(2, 12), "H": st.sampled_from([8, 16, 32]), "I": st.sampled_from([8, 24]),
    "act": st.sampled_from(["silu", "gelu"]), "renorm": st.booleans(), "softmax_first": st.booleans(),
    "bias": st.booleans(), "T": st.integers(1, 9),
}).flatmap(lambda c: st.builds(lambda k: {**c, "K": k}, st.integers(1, min(4, c["E"]))))


def _build(cfg, cls=MoE):
    kw = {k: v for k, v in cfg.items() if k != "T"}
    torch.manual_seed(0)
    return cls(**kw).eval(), torch.randn(cfg["T"], cfg["H"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_matcher_reads_the_block_as_written(cfg):
    module, x = _build(cfg)
    gm, _, values = capture(module, x)
    result = find_moe_blocks(gm)
    assert len(result.blocks) == 1 and not result.unmatched, result.unmatched
    b = result.blocks[0]
    assert (b.num_experts, b.top_k, b.hidden_size) == (cfg["E"], cfg["K"], cfg["H"])
    assert values[b.up_weight] is module.experts.gate_up and values[b.down_weight] is module.experts.down
    assert (b.up_bias is None) == (not cfg["bias"]) and (b.down_bias is None) == (not cfg["bias"])
    if cfg["bias"]:
        assert values[b.up_bias] is module.experts.gate_up_bias and values[b.down_bias] is module.experts.down_bias
    assert b.router is not None and b.dispatch.startswith("batched_mm")
    assert ("renormalize" in b.routing) == cfg["renorm"]
    assert b.routing.index("softmax") < b.routing.index("top-k") if cfg["softmax_first"] else \
        b.routing.index("top-k") < b.routing.index("softmax")
    assert cfg["act"] in b.activation
    assert not b.math.up_transposed and not b.math.down_transposed


def test_matcher_numbers_layers_from_their_names():
    module, x = MoE().eval(), torch.randn(4, 16)
    two = TwoLayers().eval()
    gm, _, values = capture(two, x)
    blocks = find_moe_blocks(gm).blocks
    assert [b.layer for b in blocks] == [0, 1]
    assert [values[b.up_weight] for b in blocks] == [two.layers[0].experts.gate_up, two.layers[1].experts.gate_up]
    assert find_moe_blocks(capture(module, x)[0]).blocks[0].layer == 0   # no number in the names: graph order


@pytest.mark.parametrize("cls,reason", [
    (FlatMoE, "module-scope"),
])
def test_matcher_refuses_with_a_reason(cls, reason):
    module, x = _build({"E": 6, "H": 16, "I": 24, "K": 2, "act": "silu", "renorm": True, "softmax_first": True,
                        "bias": False, "T": 5}, cls)
    gm, _, _ = capture(module, x)
    before = gm.code
    result = find_moe_blocks(gm)
    assert not result.blocks
    assert result.unmatched and any(reason in u.reason for u in result.unmatched), result.unmatched
    assert gm.code == before   # the matcher never modifies the graph


def test_matcher_reports_a_router_without_dispatch():
    module, x = _build({"E": 6, "H": 16, "I": 24, "K": 2, "act": "silu", "renorm": True, "softmax_first": True,
                        "bias": False, "T": 5}, DenseMixture)
    result = find_moe_blocks(capture(module, x)[0])
    assert not result.blocks
    assert result.unmatched, "a top-k router whose experts were not found must be reported, not ignored"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_rewrite_replaces_the_dispatch_and_keeps_the_routing(cfg):
    module, x = _build(cfg)
    gm, _, _ = capture(module, x)
    block = find_moe_blocks(gm).blocks[0]
    topk_before, bmm_before = count(gm, "topk"), count(gm, "bmm")
    assert (count(gm, "grouped_gemm"), bmm_before) == (0, 2)
    out = rewrite_moe_block(gm, block, engine_id=0, width=cfg["K"])
    gm.graph.lint()
    assert out.target is GROUPED
    assert count(gm, "grouped_gemm") == 1 and count(gm, "bmm") == 0
    assert count(gm, "topk") == topk_before   # routing nodes unchanged
    assert block.topk_ids in gm.graph.nodes and block.topk_weights in gm.graph.nodes
    assert out.args[0] is block.hidden and out.args[1] is block.topk_weights
    for op in ("predict", "prefetch", "permute"):
        assert count(gm, op) == 1


def test_rewrite_of_two_layers_gives_one_grouped_gemm_each():
    two, x = TwoLayers().eval(), torch.randn(4, 16)
    gm, _, _ = capture(two, x)
    for b in find_moe_blocks(gm).blocks:
        rewrite_moe_block(gm, b, engine_id=0, width=2)
    gm.graph.lint()
    assert count(gm, "grouped_gemm") == 2 and count(gm, "bmm") == 0


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_check_accepts_the_recovered_block_and_rejects_a_wrong_one(cfg):
    module, x = _build(cfg)
    gm, example, values = capture(module, x)
    block = find_moe_blocks(gm).blocks[0]
    good = check_blocks(gm, example, [block], values)[0]
    assert good.ok, good
    wrong_gate = (lambda h: F.relu(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:])
    wrong = dataclasses.replace(block, math=dataclasses.replace(block.math, gate_fn=wrong_gate))
    bad = check_blocks(gm, example, [wrong], values)[0]
    assert not bad.ok and bad.max_abs_diff > bad.tolerance
    swapped = dataclasses.replace(block, math=dataclasses.replace(block.math, post_fn=lambda y: 2 * y))
    assert not check_blocks(gm, example, [swapped], values)[0].ok
