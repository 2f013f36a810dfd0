"""Tiny checkpoints written the way real releases ship them (tests and benchmarks).

* :func:`save_hub_layout` - ``save_pretrained`` (transformers 5 writes the original
  per-expert names, e.g. Mixtral's ``block_sparse_moe.experts.<e>.w1.weight``), optionally
  sharded with ``model.safetensors.index.json``, and ``config.json`` rewritten with the
  old ``torch_dtype`` key as most Hub configs still have it.
* :func:`write_fp8_checkpoint` - a block-FP8 release (DeepSeek-V3/R1 style): every linear
  weight (attention, dense MLP, shared and routed experts; not embeddings, norms, the
  router, the LM head) stored as ``float8_e4m3fn`` plus a float32 ``weight_scale_inv``
  ``[ceil(N / bn), ceil(K / bk)]`` (per-block ``amax / 448``), and
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [bn, bk]}``.
* :func:`write_mxfp4_checkpoint` - GPT-OSS's MXFP4 release: each expert projection as
  ``<proj>_blocks`` ``uint8 [E, N, K/32, 16]`` (two E2M1 codes per byte, low nibble first,
  N = the projection's output size, i.e. the model parameter transposed) and
  ``<proj>_scales`` ``uint8 [E, N, K/32]`` (E8M0 exponents, bias 127), biases in bf16,
  ``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.

The reference for a quantized checkpoint is ``AutoModelForCausalLM.from_pretrained`` on
CPU, which dequantizes it at load.
"""

from __future__ import annotations

import json
import math
import os

import torch

__all__ = ["save_hub_layout", "write_fp8_checkpoint", "write_mxfp4_checkpoint", "write_shards", "fp8_quantize",
           "mxfp4_quantize", "compare_with_transformers", "check_loads_from_checkpoint"]

FP8_MAX = 448.0
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _rewrite_config(path: str, update: dict, *, old_dtype_key: bool) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(update)
    if old_dtype_key and "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def save_hub_layout(model, path: str, *, max_shard_size: str | None = None, old_dtype_key: bool = True,
                    original_format: bool = True) -> str:
    """``model.save_pretrained`` as the Hub has it (see the module docstring)."""
    kw = {"save_original_format": original_format}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kw)
    _rewrite_config(path, {}, old_dtype_key=old_dtype_key)
    return path


def _load_all(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def write_shards(tensors: dict[str, torch.Tensor], path: str, shards: int = 1) -> None:
    """Write ``tensors`` into ``shards`` safetensors files (+ an index when more than one),
    replacing the ``.safetensors`` files and index already in ``path``."""
    from safetensors.torch import save_file

    for f in os.listdir(path):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(path, f))
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``float8_e4m3fn [N, K]``, float32 ``scale_inv [ceil(N/bn), ceil(K/bk)]``)
    with per-block ``scale = amax / 448``, as block-FP8 releases are made."""
    n, k = w.shape
    bn, bk = block
    sn, sk = math.ceil(n / bn), math.ceil(k / bk)
    pad = torch.zeros(sn * bn, sk * bk, dtype=torch.float32)
    pad[:n, :k] = w.float()
    blocks = pad.view(sn, bn, sk, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(sn * bn, sk * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float32)


def _fp8_target(key: str, t: torch.Tensor) -> bool:
    skip = ("embed", "lm_head", "norm", ".gate.weight", "router", "shared_expert_gate")
    return key.endswith(".weight") and t.dim() == 2 and not any(s in key for s in skip)


def write_fp8_checkpoint(model, path: str, *, block: tuple[int, int] = (16, 16), shards: int = 1,
                         original_format: bool = True) -> str:
    """``model`` as a block-FP8 release (see the module docstring); returns ``path``."""
    model.save_pretrained(path, save_original_format=original_format)
    tensors = {}
    for key, t in _load_all(path).items():
        if _fp8_target(key, t):
            q, s = fp8_quantize(t, block)
            tensors[key] = q
            tensors[key[: -len("weight")] + "weight_scale_inv"] = s
        else:
            tensors[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
    write_shards(tensors, path, shards)
    _rewrite_config(path, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                   "activation_scheme": "dynamic",
                                                   "weight_block_size": list(block)},
                           "dtype": "bfloat16"}, old_dtype_key=True)
    return path


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (K a multiple of 32) -> (``uint8 [..., N, K/32, 16]`` E2M1 codes,
    ``uint8 [..., N, K/32]`` E8M0 exponents): per group of 32, the smallest power of two
    that brings the group within +-6, each value rounded to the nearest E2M1 value."""
    *lead, n, k = w.shape
    if k % 32:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of 32, got {list(w.shape)}")
    g = w.float().reshape(*lead, n, k // 32, 32)
    amax = g.abs().amax(dim=-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    mag = (scaled.abs()[..., None] - _FP4).abs().argmin(dim=-1)        # nearest |value| code 0..7
    code = (mag + 8 * (scaled < 0)).to(torch.uint8)                   # sign bit
    code = torch.where(mag == 0, torch.zeros_like(code), code)        # +0
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


def write_mxfp4_checkpoint(model, path: str, *, shards: int = 1) -> str:
    """A GPT-OSS ``model`` as its MXFP4 release (see the module docstring); returns ``path``."""
    model.save_pretrained(path)
    tensors = {}
    for key, t in _load_all(path).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quantize(t.transpose(-1, -2))      # model [E, K, N] -> [E, N, K]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        else:
            tensors[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
    write_shards(tensors, path, shards)
    _rewrite_config(path, {"quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]},
        "dtype": "bfloat16"}, old_dtype_key=True)
    return path


def _expert_slice(ref, group, ename: str, e: int) -> torch.Tensor:
    pname = group.params[ename]
    if isinstance(pname, list):
        return ref.get_parameter(pname[e]).detach()
    p = ref.get_parameter(pname).detach()
    if ename in group.rows:
        r = group.rows[ename]
        return p[e * r:(e + 1) * r]
    return p[e]


def compare_with_transformers(ref, ours) -> list[str]:
    """Differences between transformers' own load ``ref`` and ``expertflow_compile.from_pretrained``'s
    ``ours`` of the same checkpoint; empty when identical. Compared: the names of all
    parameters and buffers; every dense parameter and buffer (dtype, shape, values,
    non-persistent buffers included); every expert of every layer as the disk store
    reads it (dequantized when held compressed) against transformers' parameter slice."""
    from ..kernels.dequant import expert_weight

    problems = []
    groups = ours._expertflow_experts
    placeholders = {n for g in groups for n in g.param_names()}
    ref_p, our_p = dict(ref.named_parameters()), dict(ours.named_parameters())
    if set(ref_p) != set(our_p):
        problems.append(f"parameter names differ: only transformers {sorted(set(ref_p) - set(our_p))[:3]}, "
                        f"only ours {sorted(set(our_p) - set(ref_p))[:3]}")
    ref_b, our_b = dict(ref.named_buffers()), dict(ours.named_buffers())
    if set(ref_b) != set(our_b):
        problems.append(f"buffer names differ: {sorted(set(ref_b) ^ set(our_b))[:4]}")
    for kind, a, b in (("parameter", ref_p, our_p), ("buffer", ref_b, our_b)):
        for name in sorted(set(a) & set(b)):
            if name in placeholders:
                continue
            x, y = a[name], b[name]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.detach().cpu(), y.detach().cpu()):
                problems.append(f"{kind} {name}: transformers {x.dtype} {list(x.shape)}, ours {y.dtype} "
                                f"{list(y.shape)}" + ("" if x.shape != y.shape else " (values differ)"))
    store = ours._expertflow_store
    for g in groups:
        spec = store.specs[g.layer]
        for e in range(g.num_experts):
            got = store.read(g.layer, e)
            for ename in g.params:
                want = _expert_slice(ref, g, ename, e)
                w = expert_weight(got, ename, want.dtype)
                if w is None or w.shape != want.shape or w.dtype != want.dtype or not torch.equal(w, want):
                    problems.append(f"expert {e} of layer {g.layer} ({g.module}) tensor {ename!r} differs from "
                                    f"transformers' {g.params[ename] if isinstance(g.params[ename], str) else ''}"
                                    f" ({spec.shapes.get(ename)})")
                    break
    return problems


def check_loads_from_checkpoint(model, family: str, ids: torch.Tensor, *, save_kw: dict, budget: str = "25%",
                                tol: float = 1e-5) -> dict:
    """Save ``model`` (a tiny ``family`` model) with ``save_pretrained(**save_kw)``, load it with
    ``expertflow_compile.from_pretrained`` and with transformers, compare them
    (:func:`compare_with_transformers`), compile ours at ``budget`` (one layer's top-k
    minimum when ``budget`` is below it) and compare its logits on ``ids`` with
    transformers' (``tol`` x max |logit|). Returns ``{"ok", "stage", "error", "budget",
    "max_diff", "bytes_moved"}``: where and why it failed, else ``ok``."""
    import re
    import tempfile

    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .. import from_pretrained, stats
    from .families import is_encoder_decoder, lm_inputs

    def short(e):
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:240] if msg else ''}"

    out = dict(ok=False, stage=None, error=None, budget=budget, max_diff=None)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(family) else AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        for stage, fn in (("save_pretrained", lambda: model.save_pretrained(d, **save_kw)),
                          ("transformers from_pretrained", lambda: out.__setitem__("ref", auto.from_pretrained(d).eval())),
                          ("load", lambda: out.__setitem__("ours", from_pretrained(d)))):
            try:
                fn()
            except Exception as e:   # noqa: BLE001 - recorded, the table says why
                out.update(stage=stage, error=short(e))
                out.pop("ref", None)
                return out
        ref, ours = out.pop("ref"), out.pop("ours")
        diffs = compare_with_transformers(ref, ours)
        if diffs:
            out.update(stage="state dict", error=f"{len(diffs)} differences, first: {diffs[0]}")
            return out
        with torch.no_grad():
            want = ref(**lm_inputs(ref, ids), use_cache=False).logits.float()
        for attempt in range(2):
            torch._dynamo.reset()
            options = {"expert_budget": out["budget"]}
            ours.compile(backend="expertflow", options=options)
            if getattr(ours.config, "is_encoder_decoder", False):
                ours.get_encoder().compile(backend="expertflow", options=options)
            try:
                with torch.no_grad():
                    got = ours(**lm_inputs(ours, ids), use_cache=False).logits.float()
                break
            except Exception as e:   # noqa: BLE001
                m = re.search(r"use expert_budget >= '([^']+)'", str(e))
                low = m.group(1) if m else None
                if attempt == 0 and low is not None:   # 25% is below one layer's top-k: the minimum
                    out["budget"] = low
                    continue
                out.update(stage="compiled run", error=short(e))
                return out
        diff, scale = (got - want).abs().max().item(), want.abs().max().item()
        s = stats(ours)
        from ..runtime.engine import engines_for_module

        tiers = {type(e.store).__name__ for e in engines_for_module(ours) if e.store is not ours._expertflow_store}
        if tiers:
            out.update(stage="compiled run", error=f"the engine serves the experts from a {', '.join(sorted(tiers))} "
                                                   "(the placeholders), not from the checkpoint's disk store")
            return out
        out["max_diff"] = diff
        if not diff <= tol * scale:
            out.update(stage="compiled run", error=f"logits differ from transformers' by {diff:.3g} "
                                                   f"(max |logit| {scale:.3g})")
        elif not (s.get("offloading") and s.get("bytes_moved", 0) > 0):
            out.update(stage="compiled run", error="the experts did not come from the disk store")
        else:
            out["ok"] = True
        out["bytes_moved"] = s.get("bytes_moved", 0)
        del ours, ref
    return out
