"""Checkpoints ef.from_pretrained cannot serve exactly are refused in one line naming the
tensor, the file and the format; nothing is served silently wrong."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import expertflow_compile as ef
from expertflow_compile.testing.checkpoints import save_hub_layout, write_fp8_checkpoint
from expertflow_compile.testing.families import build_tiny_family
from expertflow_compile.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "mixtral")
    save_hub_layout(build_tiny_model("mixtral", num_layers=2), path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path, edit):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return f


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ef.from_pretrained(tmp_path / "nope")


def test_truncated_checkpoint_names_the_file(mixtral_dir, tmp_path):
    path = _copy(mixtral_dir, tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match="truncated") as exc:
        ef.from_pretrained(path)
    assert f in _one_line(exc)


def test_overlapping_data_offsets(mixtral_dir, tmp_path):
    """Issue 11: expert 1's w1 pointed into expert 0's bytes used to load, expert 1 silently
    computing with expert 0's weights."""
    path = _copy(mixtral_dir, tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    raw = open(f, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    b = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    new = json.dumps(header).encode()
    open(f, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(ValueError, match="overlap") as exc:
        ef.from_pretrained(path)
    msg = _one_line(exc)
    assert f in msg and repr(a) in msg and repr(b) in msg


def test_expert_index_past_the_config(mixtral_dir, tmp_path):
    """Issue 11: a ninth expert of an 8-expert config used to be ignored silently."""
    path = _copy(mixtral_dir, tmp_path / "m")
    extra = "model.layers.1.block_sparse_moe.experts.8.w1.weight"
    f = _edit_tensors(path, lambda sd: sd.__setitem__(
        extra, sd["model.layers.1.block_sparse_moe.experts.7.w1.weight"].clone()))
    with pytest.raises(ValueError, match="expert 8") as exc:
        ef.from_pretrained(path)
    msg = _one_line(exc)
    assert repr(extra) in msg and f in msg and "8 experts" in msg


def test_missing_expert_names_it(mixtral_dir, tmp_path):
    path = _copy(mixtral_dir, tmp_path / "m")
    gone = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    f = _edit_tensors(path, lambda sd: sd.pop(gone))
    with pytest.raises(ValueError, match="no tensor for expert 3") as exc:
        ef.from_pretrained(path)
    assert f in _one_line(exc)


def test_wrong_shape_names_the_checkpoint_key(mixtral_dir, tmp_path):
    """Issue 11: the error named internal names ("tensor 'up'"); it names the key and file."""
    path = _copy(mixtral_dir, tmp_path / "m")
    key = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    f = _edit_tensors(path, lambda sd: sd.__setitem__(key, torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])))
    with pytest.raises(ValueError) as exc:
        ef.from_pretrained(path)
    msg = _one_line(exc)
    assert repr(key) in msg and f in msg and "'up'" not in msg


def test_fused_expert_tensor_missing(tmp_path):
    path = str(tmp_path / "g")
    save_hub_layout(build_tiny_model("gpt_oss", num_layers=2), path)
    f = _edit_tensors(path, lambda sd: sd.pop("model.layers.1.mlp.experts.down_proj"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj") as exc:
        ef.from_pretrained(path)
    assert f in _one_line(exc)


def test_unknown_quantization_is_refused_by_name(mixtral_dir, tmp_path):
    path = _copy(mixtral_dir, tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="quant_method='gptq'") as exc:
        ef.from_pretrained(path)
    assert "'fp8'" in _one_line(exc) and "'mxfp4'" in str(exc.value)
    with pytest.raises(ValueError, match="does not quantize on load"):
        ef.from_pretrained(mixtral_dir, quantization_config=object())


def test_fp8_scales_without_a_quantization_config(tmp_path):
    """An FP8 checkpoint whose config lost its quantization_config: the raw FP8 values
    would be cast and the scales ignored; refused, naming the scale tensor."""
    path = str(tmp_path / "fp8")
    write_fp8_checkpoint(build_tiny_model("deepseek_v3", num_layers=2), path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="weight_scale_inv") as exc:
        ef.from_pretrained(path)
    assert "model.safetensors" in _one_line(exc)


def test_non_moe_checkpoint_is_rejected(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a Mixture-of-Experts checkpoint"):
        ef.from_pretrained(tmp_path / "llama")


def test_unserved_experts_are_refused(tmp_path):
    model, _ = build_tiny_family("nllb-moe")
    model.save_pretrained(tmp_path / "nllb")
    with pytest.raises(ValueError, match="NllbMoeExperts"):
        ef.from_pretrained(tmp_path / "nllb")


def test_uncompiled_use_of_disk_experts_is_refused(mixtral_dir):
    model = ef.from_pretrained(mixtral_dir)
    with pytest.raises(RuntimeError, match="run it compiled"):
        model(torch.zeros(1, 3, dtype=torch.long))
    for g in model._expertflow_experts:
        for name in g.param_names():
            p = model.get_parameter(name)
            assert all(s == 0 for s in p.stride()) and p.untyped_storage().nbytes() <= p.element_size()
            assert torch.isnan(p).all()     # a block the backend left unmatched cannot compute plausibly
