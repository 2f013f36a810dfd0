"""expertflow_compile.from_pretrained: dense weights loaded, experts served from disk."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import expertflow_compile
from expertflow_compile.runtime.engine import attached_store
from expertflow_compile.runtime.store import SafetensorsExpertStore
from expertflow_compile.testing.tiny_models import build_tiny_model


def _save(family, tmp_path, **save_kw):
    model = build_tiny_model(family, num_layers=2)
    path = tmp_path / family
    model.save_pretrained(path, **save_kw)
    return str(path)


def _expert_params(model):
    return [(n, p) for n, p in model.named_parameters() if "experts" in n]


@pytest.mark.parametrize("family,save_kw", [
    ("mixtral", {"max_shard_size": "40KB"}),   # sharded: index.json + several files, per-expert w1/w3/w2
    ("gpt_oss", {}),                           # fused, transposed layout, expert biases
    ("qwen2_moe", {}),                         # per-expert gate/up/down + a dense shared expert
])
def test_loaded_model_matches_hf(family, save_kw, tmp_path):
    path = _save(family, tmp_path, **save_kw)
    if save_kw:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    model = expertflow_compile.from_pretrained(path)

    experts = _expert_params(model)
    assert experts, "no expert parameters found"
    stores = set()
    for name, p in experts:
        assert all(s == 0 for s in p.stride()), f"{name} holds real memory: strides {p.stride()}"
        assert p.untyped_storage().nbytes() <= p.element_size()
        if name.endswith(("gate_up_proj", "up_proj")):
            st = attached_store(p)
            assert isinstance(st, SafetensorsExpertStore)
            stores.add(id(st))
    assert len(stores) == 1
    ref_names = {n for n, _ in ref.named_parameters()}
    assert {n for n, _ in model.named_parameters()} == ref_names
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=0, atol=0, msg=n)

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = ref(ids).logits
    model.compile(backend="expertflow", options={"expert_budget": "50%"})
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()

    prompt = ids[:1]
    want_tokens = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    got_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got_tokens, want_tokens)

    s = expertflow_compile.stats(model)
    assert s["offloading"]
    assert s["bytes_moved"] > 0
    assert 0 < s["peak_cache_bytes"] <= s["budget_bytes"]


def test_bf16_checkpoint_all_resident_budget(tmp_path):
    model = build_tiny_model("qwen2_moe", num_layers=2, dtype=torch.bfloat16)
    path = str(tmp_path / "q_bf16")
    model.save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = expertflow_compile.from_pretrained(path)
    assert ours.dtype == torch.bfloat16
    ours.compile(backend="expertflow", options={"expert_budget": None})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), ours(ids).logits.float()
    # bf16: HF's grouped_mm vs the per-expert math differ by rounding only
    assert (got - want).abs().max().item() <= 2 ** -5 * want.abs().max().item()
    s = expertflow_compile.stats(ours)
    assert s["offloading"] and s["bytes_moved"] > 0


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = _save("mixtral", tmp_path)
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated") as exc:
        expertflow_compile.from_pretrained(path)
    assert f in str(exc.value)


def test_non_moe_checkpoint_is_rejected(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a Mixture-of-Experts checkpoint"):
        expertflow_compile.from_pretrained(tmp_path / "llama")


def test_missing_directory_and_missing_expert_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        expertflow_compile.from_pretrained(tmp_path / "nope")

    from safetensors.torch import load_file, save_file

    path = _save("gpt_oss", tmp_path)
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    del sd["model.layers.1.mlp.experts.down_proj"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj") as exc:
        expertflow_compile.from_pretrained(path)
    assert f in str(exc.value)


def test_uncompiled_use_of_disk_experts_is_refused(tmp_path):
    import pytest as _pytest
    import torch as _torch

    from expertflow_compile import from_pretrained
    from expertflow_compile.testing.tiny_models import build_tiny_model

    build_tiny_model("mixtral", num_layers=1).save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    with _pytest.raises(RuntimeError, match="run it compiled"):
        model(_torch.zeros(1, 3, dtype=_torch.long))
