"""Every shipped model (expertflow_compile.assets): it loads with transformers' own
rules, routes held-out text over all its experts in every layer, and generates the same
greedy tokens through the expertflow backend at a 25% expert budget as eagerly; the
registry is complete and refuses unknown names."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import expertflow_compile as ef
from expertflow_compile.assets import (
    ASSETS_DIR,
    DEFAULT_MODEL,
    HELDOUT_TEXT,
    SHIPPED_MODELS,
    shipped_model,
    shipped_model_names,
    shipped_model_path,
)

NAMES = shipped_model_names()


@pytest.fixture(autouse=True)
def _one_thread():
    """60 small expert matmuls per layer: with 2 threads and the other core busy, a
    forward here was measured 38x slower (11 s vs 0.3 s) than with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(name):
    path = shipped_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return AutoTokenizer.from_pretrained(path), model


def _num_experts(cfg) -> int:
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


@pytest.mark.parametrize("name", NAMES)
def test_compiled_greedy_tokens_equal_eager(name):
    tok, model = _load(name)
    ids = tok("The :mod:`json` module", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "25%"})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    s = ef.stats(model)
    assert s["layers"] == list(range(model.config.num_hidden_layers))   # every MoE layer rewritten
    assert s["misses"] > 0   # 25% of the experts: some had to be loaded


@pytest.mark.parametrize("name", NAMES)
def test_routes_heldout_text_over_every_expert_in_every_layer(name):
    """8 windows of 256 tokens spread over held-out documents: no expert unused in any
    layer, none taking 3x its uniform share (a collapsed router takes far more)."""
    tok, model = _load(name)
    with open(HELDOUT_TEXT, encoding="utf-8") as f:
        ids = torch.tensor(tok.backend_tokenizer.encode(f.read()).ids)
    starts = torch.linspace(0, len(ids) - 257, 8).long().tolist()
    x = torch.stack([ids[s : s + 256] for s in starts])
    with torch.no_grad():
        router_logits = model(x, output_router_logits=True, use_cache=False).router_logits
    cfg = model.config
    E, K = _num_experts(cfg), cfg.num_experts_per_tok
    assert len(router_logits) == cfg.num_hidden_layers
    for layer, z in enumerate(router_logits):
        counts = torch.bincount(z.topk(K, dim=-1).indices.reshape(-1), minlength=E)
        share = counts.double() / counts.sum()
        assert counts.min() > 0, f"layer {layer}: dead expert(s) {torch.nonzero(counts == 0).flatten().tolist()}"
        assert share.max() < 3.0 / E, f"layer {layer}: busiest expert takes {share.max():.3f} (uniform {1 / E:.3f})"


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_is_bf16_in_the_per_expert_release_layout(name):
    path = shipped_model_path(name)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    E = cfg.get("num_local_experts") or cfg["num_experts"]
    per_expert = [k for k in keys if ".experts." in k]
    assert per_expert and not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    # one tensor per (layer, expert, projection), named with the expert's index
    assert len(per_expert) == cfg["num_hidden_layers"] * E * 3
    assert any(f".experts.{E - 1}." in k for k in per_expert)


def test_shipped_models_share_one_tokenizer():
    """Both were trained on the same train split; the BPE training is deterministic."""
    blobs = {n: open(os.path.join(shipped_model_path(n), "tokenizer.json"), "rb").read() for n in NAMES}
    assert len(set(blobs.values())) == 1


def test_registry_lists_every_checkpoint_directory():
    dirs = {d for d in os.listdir(ASSETS_DIR) if os.path.isfile(os.path.join(ASSETS_DIR, d, "config.json"))}
    assert dirs == set(SHIPPED_MODELS)
    assert NAMES[0] == DEFAULT_MODEL == "tiny_mixtral"
    assert shipped_model_path() == shipped_model_path(DEFAULT_MODEL)
    assert all(shipped_model(n).description and "\n" not in shipped_model(n).description for n in NAMES)


@pytest.mark.parametrize("bad", ["tiny_llama", "", "TINY_MIXTRAL", None, "../tiny_mixtral"])
def test_registry_refuses_unknown_names_naming_the_valid_ones(bad):
    with pytest.raises(ValueError) as err:
        shipped_model_path(bad)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in NAMES)
