"""Load a Hugging Face MoE checkpoint with its experts left on disk.

:func:`from_pretrained` is ``transformers``' own ``from_pretrained`` with ONE step
changed: the expert tensors are diverted before transformers reads any tensor.

Why there. transformers 5 loads in three steps: build the model on the meta device
(with its quantizer's module swaps), map every checkpoint tensor to a parameter and
convert it (``convert_and_load_state_dict_in_model``: per-family renames and converters
from ``conversion_mapping.py``, quantizer load ops such as FP8 block dequantization,
dtype rules), then finalize (tie weights, move and initialise what was not loaded, e.g.
non-persistent buffers such as Gemma4's ``embed_scale``). The middle step is the only
one that touches tensor data, and it receives the checkpoint as lazy safetensors
slices plus the complete ``weight_mapping``. Wrapping it (:mod:`.divert`) lets
transformers do everything for the dense weights - every converter, dequantizer and
buffer rebuild stays transformers' own and follows it as it changes - while the expert
keys are taken out of the slice dict and their parameters' conversion chains (the same
converter objects transformers built) are run symbolically into one read program per
expert (:mod:`.convert`). Alternatives were worse: re-implementing the loading (what
this module did before: renames only, guessed the rest, re-ran ``_init_weights``, which
re-initialised Gemma4's loaded embeddings); letting transformers load the experts and
dropping them (materialises every expert); hooking a conversion op (ops receive
already-materialised tensors).

What comes back: the HF model with dense weights loaded exactly as
``AutoModelForCausalLM.from_pretrained`` loads them (same converters, dtype, buffers;
on the given ``device``), and every routed-expert parameter replaced by a zero-memory
placeholder (a NaN expanded to the parameter's shape, stride 0) attached to ONE
:class:`~expertflow_compile.runtime.store.SafetensorsExpertStore`. Compiled with
``backend="expertflow"`` the engine serves the experts from that store through its
budgeted cache, one expert read at a time. Quantized experts (block FP8, MXFP4) stay
compressed in the store, the cache and on the link, and are dequantized when they
compute; dense weights of such checkpoints are dequantized by transformers at load
(``dequantize=True``, what transformers does on CPU). Uncompiled use raises.

Peak memory of the load: the dense weights (memory-mapped safetensors slices, as
transformers reads them) plus the model's Python objects; no expert byte is read.
"""

from __future__ import annotations

import json
import os

import torch

from ..compiler.fallback import fell_back_message, fixes, in_compiled_region, routes_eagerly
from ..runtime.engine import attach_store, engines_for_module
from ..runtime.store import safetensors_index
from .convert import ConversionRefused
from .divert import diverting_experts
from .experts import NotServed
from .quant import check_quantization, force_dequantize

__all__ = ["from_pretrained", "ConversionRefused", "NotServed"]

_MODEL_KWARGS = ("attn_implementation", "experts_implementation", "trust_remote_code")


def _refuse_uncompiled(module, args, kwargs=None):
    """Experts loaded by :func:`from_pretrained` live on disk; their parameters are
    placeholders. Outside torch.compile (where Dynamo drops this branch and the backend
    serves the experts from the store) running them would compute garbage. Once compiled,
    an eager call (Dynamo's fallback at its recompile limit) of an experts module with
    HF's contract goes through the engine (``fallback.py``); any other refuses."""
    if torch.compiler.is_compiling() or routes_eagerly(module):
        return
    if engines_for_module(module) and in_compiled_region():
        raise RuntimeError(
            f"expertflow: {fell_back_message()}, and this model's experts ({type(module).__name__}) live on "
            f"disk, where only the compiled graph reaches them; {fixes()}")
    raise RuntimeError(
        "this model's experts were loaded by expertflow_compile.from_pretrained and live on disk; "
        "run it compiled: model.compile(backend='expertflow', options={...})")


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) and config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def _use_batched_mm(model) -> None:
    """bf16 ``grouped_mm`` traces the real ``torch._grouped_mm``, whose meta kernel rejects
    the zero-stride placeholders; ``batched_mm`` traces fine and the backend rewrites it
    the same way."""
    seen = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if getattr(cfg, "_experts_implementation", None) == "grouped_mm":
            cfg._experts_implementation = "batched_mm"


def _to_device(model, device: torch.device, placeholders: dict) -> None:
    """Move dense parameters and buffers one by one (never an expert placeholder: moving a
    stride-0 tensor would materialise it); tied parameters stay tied."""
    moved: dict[int, torch.Tensor] = {}
    ph_ids = {id(p) for p in placeholders.values()}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in ph_ids:
                new = torch.nn.Parameter(torch.full((), float("nan"), dtype=p.dtype, device=device).expand(p.shape),
                                         requires_grad=False)
            elif p.device != device:
                new = moved.get(id(p)) or torch.nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
            else:
                continue
            moved[id(p)] = new
            mod._parameters[name] = new
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = moved.setdefault(id(b), b.to(device))
    for pname in list(placeholders):
        mod_name, _, attr = pname.rpartition(".")
        placeholders[pname] = model.get_submodule(mod_name)._parameters[attr]


def _check_loaded(model, info: dict, path: str) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"checkpoint {path} lacks dense weights of the model: {missing[:4]}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                         + " (transformers would initialise them randomly)")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        k, got, want = mismatched[0]
        raise ValueError(f"checkpoint {path}: {k} has shape {list(got)}, the model's is {list(want)}")


def from_pretrained(path, *, dtype=None, device="cpu", **hf_kwargs):
    """Load the MoE language model at ``path`` (a local directory with ``config.json`` and
    safetensors weights, one file or sharded with an index) with its experts left on disk.

    ``dtype``: the model's dtype (None / ``"auto"``: what transformers picks, the config's
    ``dtype`` / ``torch_dtype``). ``device``: where dense weights (and the expert cache)
    live. ``hf_kwargs`` go to transformers (config overrides, ``attn_implementation``,
    ``experts_implementation``, ``trust_remote_code``). For bf16 models whose experts
    default to ``grouped_mm``, ``batched_mm`` is selected (a zero-stride placeholder
    cannot be traced through bf16 ``torch._grouped_mm``).

    Returns the model in eval mode. Run it compiled with ``backend="expertflow"`` (an
    uncompiled forward raises); ``expert_budget`` then bounds the expert memory. Refuses
    with a one-line ValueError (naming the tensor, the file and the format) a checkpoint
    whose experts cannot be served exactly: a quantization format other than block FP8 /
    MXFP4, a conversion step that cannot be applied per expert, an expert index past the
    config's expert count, a missing expert tensor, a corrupt or truncated file.
    """
    from transformers import AutoConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (from_pretrained needs a local "
                                "directory with config.json and .safetensors weights)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"checkpoint directory {path} has no config.json")
    if "quantization_config" in hf_kwargs:
        raise ValueError("expertflow_compile.from_pretrained does not quantize on load (quantization_config=); "
                         "give a pre-quantized checkpoint or load it unquantized")
    index = safetensors_index(path)   # validates every header: offsets in range and disjoint; errors name the file
    with open(config_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON ({exc})") from None
    quant = check_quantization(raw, config_path)

    model_kwargs = {k: hf_kwargs.pop(k) for k in _MODEL_KWARGS if k in hf_kwargs}
    cfg_kwargs = dict(hf_kwargs)
    if "trust_remote_code" in model_kwargs:
        cfg_kwargs["trust_remote_code"] = model_kwargs["trust_remote_code"]
    config = AutoConfig.from_pretrained(path, **cfg_kwargs)
    if quant is not None:
        force_dequantize(config)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    device = torch.device(device)

    auto = _auto_class(config)
    with diverting_experts(index, path) as div:
        model, info = auto.from_pretrained(path, config=config, dtype=dtype if dtype is not None else "auto",
                                           output_loading_info=True, **model_kwargs)
        if not div.claimed or div.store is None:
            raise RuntimeError(f"transformers loaded {path} without its state-dict step (distributed or GGUF "
                               "loading?); expertflow_compile.from_pretrained cannot divert its experts")
        _check_loaded(model, info, path)
    store, placeholders = div.store, div.placeholders

    if "experts_implementation" not in model_kwargs and model.dtype == torch.bfloat16:
        _use_batched_mm(model)
    if device != torch.device("cpu"):
        _to_device(model, device, placeholders)
    for g in div.groups:
        for pname in g.param_names():
            attach_store(placeholders[pname], store, g.layer)
        model.get_submodule(g.module).register_forward_pre_hook(_refuse_uncompiled)
    model.eval()
    model._expertflow_store = store   # keeps the store alive and reachable
    model._expertflow_experts = div.groups   # which parameters are the experts of which store layer
    model._expertflow_quantization = quant
    return model
