"""Load a Hugging Face MoE checkpoint without ever holding its experts in memory.

:func:`from_pretrained` builds the model on the meta device, reads every dense
(non-expert) tensor from the checkpoint's safetensors files one at a time, and
replaces each MoE layer's expert parameters by zero-memory placeholders
(``torch.zeros(()).expand(shape)``: stride 0, one element). The experts stay on
disk in ONE :class:`~expertflow_compile.runtime.store.SafetensorsExpertStore`,
attached to the placeholders; when the model is compiled with
``backend="expertflow"`` the engine serves the experts from that store through
its budgeted cache. Peak memory is the dense weights plus the expert budget.

Checkpoint layouts understood for the experts (after transformers' own key
renamings for the model type, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``):

* fused ``<experts>.gate_up_proj`` / ``up_proj`` / ``down_proj`` ``[E, ...]`` (+
  ``*_bias`` ``[E, ...]``), in the model's layout or with the last two dims
  swapped (read transposed);
* per expert ``<experts>.<e>.w1/w3/w2.weight`` (Mixtral) or
  ``<experts>.<e>.gate_proj/up_proj/down_proj.weight`` (Qwen-MoE style), the
  gate and up pieces concatenated along dim 0 into the model's ``gate_up_proj``
  row.
"""

from __future__ import annotations

import os
import re

import torch

from .runtime.engine import attach_store
from .runtime.store import SafetensorsExpertStore, TensorSource, _bytes_view, _pread_into, safetensors_index

__all__ = ["from_pretrained"]

# per-expert checkpoint names: (model param, [candidate piece-name lists])
_PER_EXPERT = {
    "gate_up_proj": [["w1.weight", "w3.weight"], ["gate_proj.weight", "up_proj.weight"]],
    "up_proj": [["w3.weight"], ["up_proj.weight"]],
    "down_proj": [["w2.weight"], ["down_proj.weight"]],
    "gate_up_proj_bias": [["w1.bias", "w3.bias"], ["gate_proj.bias", "up_proj.bias"]],
    "up_proj_bias": [["w3.bias"], ["up_proj.bias"]],
    "down_proj_bias": [["w2.bias"], ["down_proj.bias"]],
}
_STORE_NAME = {"gate_up_proj": "up", "up_proj": "up", "down_proj": "down",
               "gate_up_proj_bias": "up_bias", "up_proj_bias": "up_bias", "down_proj_bias": "down_bias"}
_MODEL_KWARGS = ("attn_implementation", "experts_implementation", "trust_remote_code")


# --------------------------------------------------------------------------- helpers


def _expert_modules(model) -> dict[str, dict[str, torch.nn.Parameter]]:
    """module name -> {param name: param} for every MoE experts module (3-D weights)."""
    found = {}
    for mname, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        up = own.get("gate_up_proj", own.get("up_proj"))
        down = own.get("down_proj")
        if up is None or down is None or up.dim() != 3 or down.dim() != 3:
            continue
        if up.shape[0] != down.shape[0]:
            continue
        params = {"gate_up_proj" if "gate_up_proj" in own else "up_proj": up, "down_proj": down}
        for b in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            if b in own and own[b] is not None and own[b].dim() == 2:
                params[b] = own[b]
        found[mname] = params
    return found


def _layer_of(name: str) -> int:
    m = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"cannot tell which decoder layer the experts module {name!r} belongs to")
    return int(m.group(1))


def _renamer(model):
    """checkpoint key -> model key, using transformers' renamings for this model type
    (converters are not applied: experts are handled here)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # older/newer transformers: plain names
        renamings = None

    meta_sd = {k: True for k in model.state_dict().keys()}
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        if renamings:
            try:
                key = rename_source_key(key, renamings, [], prefix, meta_sd)[0]
            except Exception:
                pass
        if key not in meta_sd and prefix:
            if f"{prefix}.{key}" in meta_sd:
                key = f"{prefix}.{key}"
            elif key.startswith(prefix + ".") and key[len(prefix) + 1:] in meta_sd:
                key = key[len(prefix) + 1:]
        return key

    return rename


def _read_tensor(entry, dtype: torch.dtype | None) -> torch.Tensor:
    size = os.path.getsize(entry.file)
    if size < entry.end:
        raise ValueError(f"checkpoint {entry.file} is truncated: it has {size} bytes, a tensor needs bytes up to {entry.end}")
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if t.numel():
        fd = os.open(entry.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            _pread_into(fd, entry.file, _bytes_view(t), entry.begin)
        finally:
            os.close(fd)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def _set_tensor(model, name: str, value: torch.Tensor, *, is_param: bool, requires_grad: bool = False) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    else:
        mod._buffers[attr] = value


def _expert_sources(ckpt_by_model_key, expert_mods, rename, index) -> tuple[dict, list]:
    """-> (sources for the store, [(module name, param name, store tensor name, param)])."""
    # per-expert keys: "<module>.<e>.<piece>" with the module name as the model spells it
    per_expert: dict[str, dict[str, str]] = {}
    for ckey in index:
        mkey = rename(ckey)
        m = re.match(r"^(.*)\.(\d+)\.((?:w[123]|gate_proj|up_proj|down_proj)\.(?:weight|bias))$", mkey)
        if m and m.group(1) in expert_mods:
            per_expert.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = ckey

    sources: dict[int, dict[str, TensorSource]] = {}
    placed = []
    all_files = sorted({e.file for e in index.values()})
    files = all_files[0] if len(all_files) == 1 else f"({', '.join(all_files)})"
    for mname, params in expert_mods.items():
        layer = _layer_of(mname)
        if layer in sources:
            raise ValueError(f"two experts modules map to decoder layer {layer} (second: {mname!r})")
        layer_src = {}
        for pname, p in params.items():
            sname = _STORE_NAME[pname]
            row = tuple(p.shape[1:])
            num = p.shape[0]
            full = f"{mname}.{pname}"
            entry_key = ckpt_by_model_key.get(full)
            src = None
            if entry_key is not None:
                e = index[entry_key]
                if tuple(e.shape) == tuple(p.shape):
                    src = TensorSource(fused=(e.file, entry_key))
                elif (len(e.shape) == 3 and e.shape[0] == num
                      and (e.shape[2], e.shape[1]) == row):
                    src = TensorSource(fused=(e.file, entry_key), transpose=True)
                else:
                    raise ValueError(f"checkpoint tensor {entry_key!r} in {e.file} has shape {list(e.shape)}, "
                                     f"the model's {full} is {list(p.shape)}")
            else:
                have = per_expert.get(mname, {})
                for pieces in _PER_EXPERT[pname]:
                    if f"0.{pieces[0]}" not in have:
                        continue
                    rows = []
                    for ex in range(num):
                        keys = []
                        for piece in pieces:
                            k = have.get(f"{ex}.{piece}")
                            if k is None:
                                raise ValueError(
                                    f"checkpoint {files} has no tensor for expert {ex} piece {piece!r} of {full} "
                                    f"(looked for '{mname}.{ex}.{piece}' after renaming)")
                            keys.append((index[k].file, k))
                        rows.append(tuple(keys))
                    src = TensorSource(per_expert=tuple(rows))
                    break
            if src is None:
                if pname.endswith("_bias"):
                    raise ValueError(f"checkpoint {files} has no tensor for the expert biases {full}")
                raise ValueError(f"checkpoint {files} has no tensor for the expert weights {full} (neither "
                                 f"fused '{full}' nor per-expert '{mname}.<e>.<name>.weight' tensors)")
            layer_src[sname] = src
            placed.append((mname, pname, sname, p, layer))
        sources[layer] = layer_src
    return sources, placed


# --------------------------------------------------------------------------- public


def _refuse_uncompiled(module, args):
    """Experts loaded by :func:`from_pretrained` live on disk; their parameters are zero
    placeholders. Outside torch.compile (where Dynamo drops this branch and the backend
    serves the experts from the store) running them would silently compute zeros."""
    if not torch.compiler.is_compiling():
        raise RuntimeError(
            "this model's experts were loaded by expertflow_compile.from_pretrained and live on disk; "
            "run it compiled: model.compile(backend='expertflow', options={...})")


def from_pretrained(path, *, dtype=None, device="cpu", **hf_kwargs):
    """Load the MoE causal LM at ``path`` (a local directory with ``config.json`` and
    safetensors weights) with its experts left on disk.

    Dense weights are read tensor by tensor (peak memory ~ dense weights); expert
    parameters become zero-stride placeholders attached to one
    ``SafetensorsExpertStore``. Compile the result with ``backend="expertflow"`` to run
    it; ``expert_budget`` then bounds the expert memory (``None``: all resident).

    ``dtype``: the model's dtype (None / ``"auto"``: the config's, else the checkpoint's).
    ``device``: where dense weights (and the expert cache) live.

    The placeholders hold zeros: run the model compiled with ``backend="expertflow"``
    only (an uncompiled forward would compute with zero experts). For bf16 models whose
    experts default to ``grouped_mm``, ``batched_mm`` is selected (see below). ``hf_kwargs`` go to
    ``AutoConfig.from_pretrained`` (config overrides), except ``attn_implementation``,
    ``experts_implementation`` and ``trust_remote_code`` which also go to the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (from_pretrained needs a local "
                                "directory with config.json and .safetensors weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"checkpoint directory {path} has no config.json")
    index = safetensors_index(path)  # validates headers; errors name the file

    model_kwargs = {k: hf_kwargs.pop(k) for k in _MODEL_KWARGS if k in hf_kwargs}
    cfg_kwargs = dict(hf_kwargs)
    if "trust_remote_code" in model_kwargs:
        cfg_kwargs["trust_remote_code"] = model_kwargs["trust_remote_code"]
    config = AutoConfig.from_pretrained(path, **cfg_kwargs)

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype):
            dtype = next((e.dtype for e in index.values() if e.dtype.is_floating_point), torch.float32)
    device = torch.device(device)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)

    if "experts_implementation" not in model_kwargs and dtype == torch.bfloat16 \
            and getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        # under Dynamo, bf16 grouped_mm traces the real torch._grouped_mm, whose meta kernel rejects
        # the zero-stride placeholders; batched_mm traces fine and the backend rewrites it the same way
        model.config._experts_implementation = "batched_mm"

    expert_mods = _expert_modules(model)
    if not expert_mods:
        raise ValueError(f"{path} is not a Mixture-of-Experts checkpoint: its {type(model).__name__} has no "
                         "experts module (3-D gate_up_proj/up_proj and down_proj parameters); "
                         "load it with transformers.AutoModelForCausalLM.from_pretrained instead")
    expert_param_ids = {id(p) for params in expert_mods.values() for p in params.values()}

    rename = _renamer(model)
    ckpt_by_model_key = {}
    for ckey in index:
        ckpt_by_model_key.setdefault(rename(ckey), ckey)

    # ---- experts: one store, zero-stride placeholders
    sources, placed = _expert_sources(ckpt_by_model_key, expert_mods, rename, index)
    store = SafetensorsExpertStore(sources, dtype=dtype)
    for mname, pname, sname, p, layer in placed:
        shape = tuple(p.shape)
        spec_shape = store.specs[layer].shapes[sname]
        if spec_shape != shape[1:] or store.specs[layer].num_experts != shape[0]:
            store.close()
            raise ValueError(f"checkpoint experts of {mname}.{pname}: {store.specs[layer].num_experts} experts of "
                             f"{list(spec_shape)}, the model expects {list(shape)}")
        ph = torch.nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)
        model.get_submodule(mname)._parameters[pname] = ph
        if sname == "up":
            attach_store(ph, store, layer)
            model.get_submodule(mname).register_forward_pre_hook(_refuse_uncompiled)

    # ---- dense parameters, tensor by tensor (tied parameters are loaded once, shared)
    loaded: dict[int, torch.nn.Parameter] = {}
    missing = []
    named = list(model.named_parameters(remove_duplicate=False))
    by_id: dict[int, list[str]] = {}
    for name, p in named:
        if id(p) in expert_param_ids or p.device.type != "meta":
            continue
        by_id.setdefault(id(p), []).append(name)
    with torch.no_grad():
        for pid, names in by_id.items():
            key = next((ckpt_by_model_key[n] for n in names if n in ckpt_by_model_key), None)
            if key is None:
                missing.append(names[0])
                continue
            p = model.get_parameter(names[0])
            value = _read_tensor(index[key], p.dtype if p.is_floating_point() else None)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"checkpoint tensor {key!r} in {index[key].file} has shape {list(value.shape)}, "
                                 f"the model's {names[0]} is {list(p.shape)}")
            new = torch.nn.Parameter(value.to(device), requires_grad=False)
            for n in names:
                mod_name, _, attr = n.rpartition(".")
                (model.get_submodule(mod_name) if mod_name else model)._parameters[attr] = new
            loaded[pid] = new
        if missing:
            store.close()
            raise ValueError(f"checkpoint {path} lacks dense weights of the model: {missing[:8]}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

        # ---- buffers: from the checkpoint when saved, else recomputed as transformers does
        owners_to_init = {}
        for name, b in list(model.named_buffers(remove_duplicate=False)):
            if b is None or b.device.type != "meta":
                continue
            if name in ckpt_by_model_key:
                key = ckpt_by_model_key[name]
                value = _read_tensor(index[key], b.dtype if b.is_floating_point() else None)
                _set_tensor(model, name, value.to(device), is_param=False)
            else:
                _set_tensor(model, name, torch.empty_like(b, device="cpu"), is_param=False)
                mod_name = name.rpartition(".")[0]
                owners_to_init[mod_name] = name
        for mod_name, bname in owners_to_init.items():
            mod = model.get_submodule(mod_name) if mod_name else model
            if any(p.device.type == "meta" or id(p) in expert_param_ids or p.stride() and 0 in p.stride()
                   for p in mod.parameters(recurse=False)):
                raise ValueError(f"cannot recompute buffer {bname!r}: its module also owns weights")
            owner = _pretrained_owner(model, mod_name)
            owner._init_weights(mod)
            for n, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.device != device:
                    mod._buffers[n] = b.to(device)

    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        store.close()
        raise ValueError(f"could not materialize {leftover[:8]} from {path}")

    try:
        from transformers import GenerationConfig

        if os.path.isfile(os.path.join(path, "generation_config.json")) and model.can_generate():
            model.generation_config = GenerationConfig.from_pretrained(path)
    except Exception:
        pass
    model.eval()
    model._expertflow_store = store  # keeps the store alive and reachable
    return model


def _pretrained_owner(model, mod_name: str):
    """The innermost PreTrainedModel containing ``mod_name`` (its ``_init_weights`` applies)."""
    from transformers import PreTrainedModel

    owner = model
    parts = mod_name.split(".") if mod_name else []
    cur = model
    for part in parts:
        cur = getattr(cur, part)
        if isinstance(cur, PreTrainedModel):
            owner = cur
    return owner
