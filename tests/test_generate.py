"""generate() through model.compile(backend="expertflow"): same tokens, the backend
really runs at each step, and decode steps do not recompile each step."""

import pytest
import torch

import expertflow_compile as ef
from expertflow_compile.compiler.backend import expertflow_backend
from expertflow_compile.testing.tiny_models import build_tiny_model


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_greedy_generate_same_tokens_few_compiles(family):
    model = build_tiny_model(family)
    x = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    ref = model.generate(x, max_new_tokens=20, do_sample=False)
    compiles = []

    def counting(gm, example_inputs, options=None):
        compiles.append(len(gm.graph.nodes))
        return expertflow_backend(gm, example_inputs, options=options)

    model.compile(backend=counting, options={})
    out = model.generate(x, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)
    # prefill, first decode, then one dynamic-shape graph: never one per step
    assert 1 <= len(compiles) <= 4, compiles
    s = ef.stats(model)
    n_layers = model.config.num_hidden_layers
    # every decode step ran every rewritten layer: >= top_k expert uses per layer per step
    assert s["layers"] == list(range(n_layers))
    for layer in range(n_layers):
        assert s["per_layer"][layer]["hits"] >= 20 * model.config.num_experts_per_tok


def test_torch_compile_generate_runs_uncompiled_forward_as_documented():
    """FACTS: torch.compile(model).generate(...) does not call the compiled forward."""
    model = build_tiny_model("mixtral", num_layers=1)
    calls = []

    def counting(gm, example_inputs, options=None):
        calls.append(1)
        return expertflow_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=counting)
    compiled.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, do_sample=False)
    assert calls == []


def test_backend_by_name_with_options_in_generate():
    model = build_tiny_model("qwen3_moe", num_layers=1)
    x = torch.zeros(1, 4, dtype=torch.long)
    ref = model.generate(x, max_new_tokens=5, do_sample=False)
    model.compile(backend="expertflow", options={"policy": "lfu"})
    assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False), ref)
    assert ef.stats(model)["hits"] > 0


def test_stats_before_compile_is_a_clear_error():
    model = build_tiny_model("mixtral", num_layers=1)
    with pytest.raises(ValueError, match="compile it with backend='expertflow'"):
        ef.stats(model)
