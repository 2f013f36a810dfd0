"""ef.from_pretrained on checkpoints written as releases ship them, against transformers' own load.

For each checkpoint: every dense parameter and buffer equal to what
``AutoModelForCausalLM.from_pretrained`` loads (a state-dict comparison, so a
re-initialised embedding cannot pass), every expert as the disk store reads it equal to
transformers' parameter slice, and the model compiled at 25% and with every expert
resident gives the same logits and the same greedy tokens as transformers' eager model.
"""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import expertflow_compile as ef
from expertflow_compile.testing.checkpoints import (
    compare_with_transformers, save_hub_layout, write_fp8_checkpoint, write_mxfp4_checkpoint)
from expertflow_compile.testing.families import build_tiny_family
from expertflow_compile.testing.tiny_models import build_tiny_model


def _check_against_transformers(path, *, dtype=None, budgets=("25%", None), tol=1e-5, tokens=6, generate=True):
    ref = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()
    vocab = ref.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits.float()
    want_tokens = ref.generate(ids[:1], max_new_tokens=tokens, do_sample=False) if generate else None
    for budget in budgets:
        torch._dynamo.reset()
        ours = ef.from_pretrained(path, dtype=dtype)
        assert compare_with_transformers(ref, ours) == []
        ours.compile(backend="expertflow", options={"expert_budget": budget})
        with torch.no_grad():
            got = ours(ids).logits.float()
        assert (got - want).abs().max().item() <= tol * want.abs().max().item(), budget
        if generate:
            assert torch.equal(ours.generate(ids[:1], max_new_tokens=tokens, do_sample=False), want_tokens), budget
        s = ef.stats(ours)
        assert s["offloading"] and s["bytes_moved"] > 0
        if budget is not None:
            assert 0 < s["peak_cache_bytes"] <= s["budget_bytes"]
    return ref, ours


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_sharded_per_expert_bf16_with_torch_dtype_key(tmp_path):
    """Mixtral as on the Hub: per-expert ``block_sparse_moe.experts.<e>.w1/w2/w3``, bf16,
    several shards and an index, ``torch_dtype`` in config.json; loaded in fp32."""
    model = build_tiny_model("mixtral", num_layers=2, dtype=torch.bfloat16)
    path = save_hub_layout(model, str(tmp_path / "mixtral"), max_shard_size="40KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        keys = json.load(f)["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    assert len(set(keys.values())) > 2
    assert _config(path)["torch_dtype"] == "bfloat16" and "dtype" not in _config(path)
    _check_against_transformers(path, dtype=torch.float32)


def test_bf16_model_stays_bf16(tmp_path):
    """No dtype given: transformers' choice (the config's bf16) for dense weights and experts."""
    model = build_tiny_model("qwen3_moe", num_layers=2, dtype=torch.bfloat16)
    path = save_hub_layout(model, str(tmp_path / "q3"))
    ours = ef.from_pretrained(path)
    assert ours.dtype == torch.bfloat16
    assert all(s.dtype == torch.bfloat16 and not s.dtypes for s in ours._expertflow_store.specs.values())
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert compare_with_transformers(ref, ours) == []
    ours.compile(backend="expertflow", options={"expert_budget": None})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), ours(ids).logits.float()
    # bf16: HF's batched matmul vs the per-expert math differ by rounding only
    assert (got - want).abs().max().item() <= 2 ** -5 * want.abs().max().item()
    assert ef.stats(ours)["bytes_moved"] > 0


@pytest.mark.parametrize("family,original", [
    ("deepseek_v3", True),     # per-expert gate/up/down + shared experts + correction bias
    ("gpt_oss", True),         # fused, transposed, interleaved gate/up, expert biases
    pytest.param("qwen2_moe", False, marks=pytest.mark.slow),     # the fused layout (save_original_format=False)
    pytest.param("phimoe", True, marks=pytest.mark.slow),
])
def test_families_in_both_layouts(family, original, tmp_path):
    model = build_tiny_model(family, num_layers=2)
    path = save_hub_layout(model, str(tmp_path / family), original_format=original)
    _check_against_transformers(path, budgets=("25%",))


def test_gemma4_embeddings_and_embed_scale_are_transformers(tmp_path):
    """Gemma4 rebuilds the non-persistent ``embed_scale`` buffers at load; the loader must not
    re-initialise the loaded embeddings while doing so (it did: ``_init_weights``)."""
    model, _ = build_tiny_family("gemma4_text")
    path = save_hub_layout(model, str(tmp_path / "gemma4"))
    ref, ours = _check_against_transformers(path, budgets=("25%",))
    scales = [n for n, _ in ours.named_buffers() if n.endswith("embed_scale")]
    assert scales, "gemma4 has embed_scale buffers"
    for n in ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight"):
        assert torch.equal(ours.get_parameter(n), model.get_parameter(n)), n


def test_fp8_block_release_stays_compressed(tmp_path):
    """DeepSeek-V3 as its FP8 release: float8_e4m3fn + weight_scale_inv (block 16x16), sharded,
    quantization_config in config.json. Same model as transformers' CPU dequantization; the
    experts held as FP8 + scales (about half the bf16 bytes)."""
    model = build_tiny_model("deepseek_v3", num_layers=2)
    path = write_fp8_checkpoint(model, str(tmp_path / "dsv3_fp8"), block=(16, 16), shards=2)
    assert _config(path)["quantization_config"]["quant_method"] == "fp8"
    for dtype in (torch.float32, torch.bfloat16):
        fp32 = dtype == torch.float32
        _, ours = _check_against_transformers(path, dtype=dtype, budgets=("25%", None) if fp32 else ("25%",),
                                              generate=fp32)
        spec = ours._expertflow_store.specs[0]
        assert spec.quantized and spec.dtype == dtype
        assert spec.tensor_dtype("up") == torch.float8_e4m3fn and spec.tensor_dtype("up_scale_inv") == torch.float32
        bf16 = sum(2 * torch.Size(spec.shapes[n]).numel() for n in ("up", "down"))
        assert 1.9 <= bf16 / spec.expert_nbytes() <= 2.0


def test_mxfp4_release_stays_compressed(tmp_path):
    """GPT-OSS as its MXFP4 release: *_blocks / *_scales experts, bf16 biases."""
    model = build_tiny_model("gpt_oss", num_layers=2, inter=64)
    path = write_mxfp4_checkpoint(model, str(tmp_path / "gpt_oss_mxfp4"))
    for dtype in (torch.float32, torch.bfloat16):
        fp32 = dtype == torch.float32
        _, ours = _check_against_transformers(path, dtype=dtype, budgets=("25%", None) if fp32 else ("25%",),
                                              generate=fp32)
        spec = ours._expertflow_store.specs[0]
        assert spec.quantized
        assert {"up_blocks", "up_scales", "down_blocks", "down_scales", "up_bias", "down_bias"} == set(spec.shapes)
        weights = sum(spec.tensor_nbytes(n) for n in ("up_blocks", "up_scales", "down_blocks", "down_scales"))
        bf16 = 2 * (model.config.hidden_size * 2 * 64 + 64 * model.config.hidden_size)
        assert 3.7 <= bf16 / weights <= 4.0


def test_expert_bytes_are_never_read_at_load(tmp_path, monkeypatch):
    """Loading reads no expert byte: the store's reads start at the first compiled call."""
    from expertflow_compile.runtime import store as store_mod

    model = build_tiny_model("mixtral", num_layers=2)
    path = save_hub_layout(model, str(tmp_path / "m"))
    reads = []
    real = store_mod.os.preadv
    monkeypatch.setattr(store_mod.os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off))
    ours = ef.from_pretrained(path)
    assert reads == []
    ours.compile(backend="expertflow", options={"expert_budget": "25%"})
    with torch.no_grad():
        ours(torch.zeros(1, 3, dtype=torch.long))
    assert reads
