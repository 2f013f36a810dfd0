"""The router chain's ranking form (compiler/passes/router_rank.py): found exactly where the
chain's logits are a positive per-token multiple of ``linear(w * h, W)``, and then the
ranking router names the same top-k; any other chain is left to run whole."""

from __future__ import annotations

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow_compile.compiler.passes.router_rank import ranking_form
from expertflow_compile.runtime.prediction.lookahead import RankingRouter


def _rms(x, eps):
    x32 = x.to(torch.float32)
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _chain(kind: str, eps: float, hidden: int):
    """A router chain ``f(h, w, W)`` as HF families write it (``kind``), or a variant that must
    be refused."""
    def rms_then_scale(h, w, W):                 # Mixtral / Qwen3-MoE / OLMoE / DeepSeek-V3
        x = w * _rms(h, eps).to(torch.float32)
        return torch._C._nn.linear(x.view(-1, hidden).reshape(-1, hidden), W)

    def scale_then_cast(h, w, W):                # GPT-OSS's order, without its bias
        x = (w * _rms(h, eps)).to(torch.float32)
        return torch.nn.functional.linear(x.reshape(-1, hidden), W.type(torch.float32))

    def rsqrt_first(h, w, W):                    # rsqrt(...) * x, scale on the right
        x32 = h.float()
        x = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * x32 * w
        return torch._C._nn.linear(x, W)

    def no_norm(h, w, W):
        return torch._C._nn.linear(h * w, W)

    # refused: the order would change or the form is not recognised
    def bias(h, w, W):
        return torch._C._nn.linear(w * _rms(h, eps), W, W[:, 0])

    def after_linear(h, w, W):
        return torch._C._nn.linear(w * _rms(h, eps), W) + W[:, 1]

    def signed_scale(h, w, W):                   # a row scale that can be negative
        return torch._C._nn.linear(h * h.mean(-1, keepdim=True) * w, W)

    def sum_not_mean_sq(h, w, W):                # rsqrt of mean(x), not of mean(x^2)
        return torch._C._nn.linear(h * torch.rsqrt(h.mean(-1, keepdim=True).abs() + eps) * w, W)

    def moves_last_dim(h, w, W):
        return torch._C._nn.linear((w * _rms(h, eps)).reshape(hidden, -1).reshape(-1, hidden), W)

    def two_scales(h, w, W):
        return torch._C._nn.linear(w * _rms(h, eps) * w, W)

    return locals()[kind]


FOUND = ("rms_then_scale", "scale_then_cast", "rsqrt_first", "no_norm")
REFUSED = ("bias", "after_linear", "signed_scale", "sum_not_mean_sq", "moves_last_dim", "two_scales")


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(FOUND), hidden=st.integers(4, 48), experts=st.integers(4, 64),
       tokens=st.integers(1, 9), eps=st.sampled_from([1e-6, 1e-5, 0.0]), seed=st.integers(0, 2**16),
       magnitude=st.sampled_from([0.01, 1.0, 30.0]))
def test_ranking_router_names_the_chain_top_k(kind, hidden, experts, tokens, eps, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(hidden, generator=g) + 0.1
    W = torch.randn(experts, hidden, generator=g)
    gm = fx.symbolic_trace(_chain(kind, eps, hidden))
    form = ranking_form(gm)
    assert form is not None and form.weight == 1 and form.scale in (0, None)
    ranker = RankingRouter.build([w, W], form.weight, form.scale, form.hidden)
    h = torch.randn(tokens, 1, hidden, generator=g) * magnitude
    with torch.no_grad():
        full, fast = gm(h, w, W).reshape(-1, experts), ranker(h)
    assert fast.shape == full.shape
    k = min(4, experts)
    scale = (full * fast).sum(-1, keepdim=True) / (fast * fast).sum(-1, keepdim=True)
    assert (scale > 0).all()                               # one positive number per token
    torch.testing.assert_close(full, scale * fast, rtol=1e-4, atol=1e-5 * full.abs().max().item())
    top_full, top_fast = full.topk(k).indices, fast.topk(k).indices
    vals = full.sort(-1, descending=True).values
    gaps = (vals[:, :-1] - vals[:, 1:])[:, :k]             # the gaps that order the top-k
    clear = gaps.min(-1).values > 1e-4 * vals.abs().max(-1).values   # no near-tie
    assert torch.equal(top_full[clear], top_fast[clear])


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(REFUSED), hidden=st.integers(4, 32), eps=st.sampled_from([1e-6, 1e-5]))
def test_other_chains_run_whole(kind, hidden, eps):
    assert ranking_form(fx.symbolic_trace(_chain(kind, eps, hidden))) is None


def test_ranking_router_refuses_shapes_and_float16():
    W, w = torch.randn(8, 16), torch.rand(16)
    assert RankingRouter.build([w, W], 1, 0, 16) is not None
    assert RankingRouter.build([w, W], 1, 0, 12) is None               # the reshape keeps another size
    assert RankingRouter.build([torch.rand(8), W], 1, 0, 16) is None   # a scale of the wrong size
    assert RankingRouter.build([w, W.half()], 1, 0, 16) is None        # float16: no norm, no range
    assert RankingRouter.build([w, W[0]], 1, 0, None) is None          # not a [E, H] weight
