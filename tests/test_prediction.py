"""Lookahead prediction: placed before the layer's attention, exact whatever it says."""

import torch

import expertflow_compile as ef
from expertflow_compile.runtime.engine import engines_for_module
from expertflow_compile.runtime.prediction import LookaheadPredictor, Ranked
from expertflow_compile.testing.tiny_models import build_tiny_model

from helpers import CapturingBackend


def test_predict_reads_the_residual_before_attention():
    model = build_tiny_model("mixtral", num_layers=3)
    backend = CapturingBackend({"predictor": "lookahead"})
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.zeros(1, 4, dtype=torch.long))
    gm = backend.graphs[0]
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    predicts = [n for n in nodes if "predict" in str(n.target)]
    sdpa = [n for n in nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(predicts) == 3 and len(sdpa) == 3
    for layer, (p, attn) in enumerate(zip(predicts, sdpa)):
        assert p.args[2] == layer
        assert pos[p] < pos[attn], f"layer {layer}: prediction must come before its attention"


def test_lookahead_is_exact_and_raises_ready_rate():
    model = build_tiny_model("mixtral", num_layers=3, seed=4)
    x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = model.generate(x, max_new_tokens=12, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "50%", "predictor": "lookahead",
                                                  "prefetch_extra": 1})
    assert torch.equal(model.generate(x, max_new_tokens=12, do_sample=False), ref)
    s = ef.stats(model)
    assert s["predictor_recall"] > 0.5
    assert s["prefetch_issued"] > 0


class InvertedLookahead:
    """A deliberately wrong predictor through the public interface: every expert lookahead
    does NOT name, for the same layers."""

    def __init__(self):
        self.inner = LookaheadPredictor()

    def predict(self, view, layer, hidden):
        out = []
        for r in self.inner.predict(view, layer, hidden):
            rest = [e for e in range(view.num_experts[r.layer]) if e not in set(r.experts)]
            out.append(Ranked(r.layer, rest, [1] * len(rest)))
        return out


def test_deliberately_wrong_predictor_same_tokens_more_loads():
    def run(wrong: bool):
        torch._dynamo.reset()
        model = build_tiny_model("mixtral", num_layers=3, seed=4)
        x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        ref = model.generate(x, max_new_tokens=10, do_sample=False)
        model.compile(backend="expertflow", options={"expert_budget": "50%", "predictor": "lookahead"})
        with torch.no_grad():
            model(x)   # compile
        (engine,) = engines_for_module(model)
        if wrong:
            engine.predictor = InvertedLookahead()
        ef.reset_stats(model)
        out = model.generate(x, max_new_tokens=10, do_sample=False)
        return torch.equal(out, ref), ef.stats(model)

    same_good, good = run(False)
    same_bad, bad = run(True)
    assert same_good and same_bad
    assert bad["misses"] > good["misses"]
    assert bad["predictor_recall"] < good["predictor_recall"]


import pytest  # noqa: E402


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss"])
def test_every_moe_layer_gets_a_lookahead_router(family):
    """The lookahead's router chain is found for every MoE layer of these families - DeepSeek-V3
    included, whose router reads ``weight.type(torch.float32)`` (parameter-only preprocessing
    joins the chain) - and prediction stays exact while it prefetches. Every layer but
    GPT-OSS's (a router bias) gets the ranking router, which names the chain's top-k."""
    torch._dynamo.reset()
    model = build_tiny_model(family, seed=2)
    x = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = model.generate(x, max_new_tokens=6, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "50%", "predictor": "lookahead"})
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), ref)
    (engine,) = engines_for_module(model)
    assert set(engine.routers) == set(engine.layers)
    assert ef.stats(model)["prefetch_issued"] > 0
    assert set(engine.rankers) == (set() if family == "gpt_oss" else set(engine.layers))
    for layer, ranker in engine.rankers.items():
        fn, params = engine.routers[layer]
        h = torch.randn(64, 1, ranker.hidden, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            full, fast = fn(h, *params).reshape(64, -1), ranker(h)
        k = engine.layers[layer].top_k
        assert (full.topk(k).indices == fast.topk(k).indices).all(-1).float().mean() > 0.95


def test_lookahead_ranking_off_runs_the_whole_router_chain():
    """``lookahead_ranking=False``: no ranking router; the lookahead still predicts (from the
    whole chain), the same tokens."""
    model = build_tiny_model("qwen3_moe", seed=2)
    x = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = model.generate(x, max_new_tokens=4, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "50%", "predictor": "lookahead",
                                                 "lookahead_ranking": False})
    assert torch.equal(model.generate(x, max_new_tokens=4, do_sample=False), ref)
    (engine,) = engines_for_module(model)
    assert engine.rankers == {} and set(engine.routers) == set(engine.layers)
    assert ef.stats(model)["prefetch_issued"] > 0
