"""The one point where expertflow steps into transformers' loading: expert tensors diverted.

``PreTrainedModel.from_pretrained`` builds the model on the meta device, resolves its
quantizer and conversion rules, then hands the checkpoint (lazy safetensors slices) to
``transformers.core_model_loading.convert_and_load_state_dict_in_model(model,
state_dict, load_config, ...)``, called through ``transformers.modeling_utils``; after
it, ``_finalize_model_loading`` ties weights and moves / initialises what was not
loaded (non-persistent buffers such as Gemma4's ``embed_scale`` included).

:func:`diverting_experts` wraps that one function for the calling thread only (a
context variable; other threads and nested loads pass straight through) with
:class:`ExpertDiversion`, which:

1. finds the routed-expert parameters of the meta model (:mod:`.experts`);
2. renames every checkpoint key with transformers' own ``rename_source_key`` and the
   load's ``weight_mapping`` (renamings, the family's converters, the quantizer's
   additions), as ``convert_and_load_state_dict_in_model`` does, and takes out the
   keys whose targets are expert parameters; they are grouped per target exactly as
   transformers groups them (same order, one converter copy per target);
3. lets transformers load everything else - every dense weight through its own
   converters, dequantizers, dtype rules and buffer rebuilds;
4. runs each expert parameter's converter symbolically (:mod:`.convert`) into one read
   program per expert, builds ONE :class:`SafetensorsExpertStore` for all layers, puts a
   zero-memory placeholder (a NaN expanded to the shape, flagged initialised) in place
   of each expert parameter and marks it loaded.

No expert byte is read during the load. An expert key that maps nowhere (an expert
index past the config's count, a scale the model cannot use) or an expert parameter no
key maps to is refused with the key and file named.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from ..runtime.read_plan import Node, describe, slices_of
from ..runtime.store import ExpertTensorSource, SafetensorsExpertStore, TensorEntry
from .convert import ConversionRefused, Dequant, OpContext, hoist, rows, run_converter, select, star_regex, whole
from .experts import ExpertGroup, find_expert_groups

__all__ = ["ExpertDiversion", "diverting_experts"]

_ACTIVE: contextvars.ContextVar["ExpertDiversion | None"] = contextvars.ContextVar("expertflow_diversion",
                                                                                    default=None)
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = [0]
_ORIGINAL: list = []


@dataclass
class _Target:
    """One expert parameter as transformers would produce it."""

    converter: object | None             # a deepcopy of the WeightConverter, None for a plain rename
    collected: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))   # pattern -> keys


class ExpertDiversion:
    """State of one ``from_pretrained`` call whose experts stay on disk (see the module docstring)."""

    def __init__(self, index: dict[str, TensorEntry], path: str):
        self.index = index
        self.path = path
        self.store: SafetensorsExpertStore | None = None
        self.groups: list[ExpertGroup] = []
        self.placeholders: dict[str, torch.nn.Parameter] = {}   # parameter name -> placeholder
        self.claimed = False

    # -- the wrapped call

    def load(self, original, model, state_dict, load_config, disk_offload_index=None):
        self.claimed = True
        groups = find_expert_groups(model)
        if not groups:
            raise ValueError(f"{self.path} is not a Mixture-of-Experts checkpoint: {type(model).__name__} has no "
                             "routed experts expertflow serves (stacked [E, ...] expert parameters, DBRX's "
                             "[E*I, H] blocks or one module per expert); load it with "
                             "transformers.AutoModelForCausalLM.from_pretrained instead")
        self.groups = groups
        expert_params = {n: g for g in groups for n in g.param_names()}
        targets, expert_keys = self._collect(model, state_dict.keys(), load_config, expert_params)
        nodes = self._programs(model, targets, expert_params)
        dtypes = {g.layer: model.get_parameter(g.param_names()[0]).dtype for g in groups}
        self.store = SafetensorsExpertStore(self._sources(model, nodes), dtype=dtypes)   # before any dense byte
        dense = {k: v for k, v in state_dict.items() if k not in expert_keys}
        info, disk_offload_index = original(model, dense, load_config, disk_offload_index)
        self._install(model)
        for name in self.placeholders:
            info.missing_keys.discard(name)
        return info, disk_offload_index

    # -- 2. which checkpoint keys feed which expert parameter

    def _collect(self, model, keys, load_config, expert_params) -> tuple[dict[str, _Target], set[str]]:
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, apply_renamings, dot_natural_key, rename_source_key)

        mapping = deepcopy(load_config.weight_mapping or [])   # renamings keep state: never touch transformers'
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        prefix = model.base_model_prefix
        owners = sorted({g.module for g in self.groups}, key=len, reverse=True)
        ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
        targets: dict[str, _Target] = {}
        expert_keys: set[str] = set()
        self._star: dict[str, int] = {}
        for key in sorted(keys, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if renamed not in meta and key in meta:
                renamed, pattern = rename_source_key(key, [], [], prefix, meta)
            conv = by_pattern.get(pattern) if pattern is not None else None
            outs = ([renamed.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
                    if conv is not None else [renamed])
            hit = [t for t in outs if t in expert_params]
            if not hit:
                owner = next((o for o in owners if renamed.startswith(o + ".")), None)
                if renamed not in meta and owner is not None and not any(p.search(renamed) for p in ignored):
                    raise ConversionRefused(self._stray(key, renamed, owner))
                continue
            if len(hit) != len(outs):
                raise ConversionRefused(
                    f"checkpoint tensor {key!r} in {self.index[key].file} feeds the experts {hit} and the dense "
                    f"parameters {[t for t in outs if t not in hit]} at once; expertflow cannot split it")
            entry = self.index.get(key)
            if entry is None:
                raise ConversionRefused(f"checkpoint tensor {key!r} is listed by transformers but not in the "
                                        f"safetensors headers of {self.path}")
            t = targets.setdefault(renamed, _Target(deepcopy(conv) if conv is not None else None))
            t.collected[pattern if conv is not None else key].append(key)
            if conv is not None and "*" in pattern:
                m = star_regex(pattern).search(apply_renamings(key, renamings))
                if m:
                    self._star[key] = int(m.group(1))
            expert_keys.add(key)
        return targets, expert_keys

    def _stray(self, key: str, renamed: str, owner: str) -> str:
        group = next(g for g in self.groups if g.module == owner)
        m = re.search(rf"{re.escape(owner)}\.(?:expert_)?(\d+)\.", renamed + ".")
        f = self.index[key].file if key in self.index else self.path
        if m and int(m.group(1)) >= group.num_experts:
            return (f"checkpoint tensor {key!r} in {f} is expert {m.group(1)} of {owner}, but the config has "
                    f"{group.num_experts} experts (0..{group.num_experts - 1})")
        return (f"checkpoint tensor {key!r} in {f} sits in the experts module {owner} but the model has no "
                f"parameter {renamed!r} (a tensor of a format the model does not take?)")

    # -- 4. symbolic conversion -> one read program per expert

    def _programs(self, model, targets: dict[str, _Target], expert_params) -> dict[str, Node]:
        """{expert parameter name: node of the whole parameter}."""
        out: dict[str, Node] = {}
        for first, t in targets.items():
            if t.converter is None:
                keys = [k for ks in t.collected.values() for k in ks]
                if len(keys) != 1:
                    raise ConversionRefused(f"checkpoint tensors {keys[:3]} all map to {first}")
                out[first] = whole(self.index[keys[0]], keys[0])
                continue
            collected = {p: [whole(self.index[k], k) for k in ks] for p, ks in t.collected.items()}
            ctx = OpContext(model=model, config=model.config, layer_name=first,
                            source_patterns=list(t.converter.source_patterns),
                            target_patterns=list(t.converter.target_patterns),
                            expert_index=self._star.get)
            for name, node in run_converter(t.converter, collected, ctx).items():
                if name not in expert_params:
                    raise ConversionRefused(f"transformers' conversion of {describe(node)} yields {name!r}, which is "
                                            "not an expert parameter of the model")
                out[name] = node
        missing = [n for n in expert_params if n not in out]
        if missing:
            g = expert_params[missing[0]]
            files = sorted({s.file for n in g.param_names() if n in out for s in slices_of(out[n])})
            where = f"; the layer's other expert tensors are in {', '.join(files)}" if files else ""
            raise ConversionRefused(
                f"checkpoint {self.path} has no tensor for the expert parameter {missing[0]} (no checkpoint key maps "
                f"to it under transformers' conversion rules for {model.config.model_type}){where}")
        return out

    def _per_expert(self, group: ExpertGroup, ename: str, pname, model, nodes) -> list[Node]:
        if isinstance(pname, list):   # one parameter per expert
            return [self._checked(nodes[n], model.get_parameter(n).shape, n) for n in pname]
        param = model.get_parameter(pname)
        node = self._checked(nodes[pname], param.shape, pname)
        if ename in group.rows:
            r = group.rows[ename]
            return [rows(node, e * r, r) for e in range(group.num_experts)]
        return [select(node, e) for e in range(group.num_experts)]

    def _checked(self, node: Node, shape, name: str) -> Node:
        shape = tuple(shape)
        if tuple(node.shape) == shape:
            return node
        if node.shape[:1] != shape[:1] and len(node.shape) == len(shape) and node.shape[1:] == shape[1:]:
            return self._count_mismatch(node, shape, name)
        raise ConversionRefused(f"checkpoint gives {list(node.shape)} for {name} (from {describe(node)}), the "
                                f"model's parameter is {list(shape)}")

    def _count_mismatch(self, node: Node, shape, name: str):
        from ..runtime.read_plan import Stack

        have, want = node.shape[0], shape[0]
        stack = node
        while not isinstance(stack, Stack) and stack.children():
            stack = stack.children()[0]
        if isinstance(stack, Stack) and have > want:
            extra = next(slices_of(stack.parts[want]))
            raise ConversionRefused(f"checkpoint tensor {extra.key!r} in {extra.file} is expert {want} of {name}, "
                                    f"but the config has {want} experts (0..{want - 1}); the checkpoint has {have}")
        raise ConversionRefused(f"checkpoint gives {have} experts for {name} (from {describe(node)}), the config "
                                f"has {want}")

    def _sources(self, model, nodes: dict[str, Node]) -> dict[int, dict[str, ExpertTensorSource]]:
        """The store's sources: per layer, per engine tensor name, one read program per expert
        (a quantized tensor: its compressed data and its scales, each under its own name)."""
        sources: dict[int, dict[str, ExpertTensorSource]] = {}
        for g in self.groups:
            layer_src = {}
            for ename, pname in g.params.items():
                first = pname[0] if isinstance(pname, list) else pname
                dtype = model.get_parameter(first).dtype
                progs = [hoist(p) for p in self._per_expert(g, ename, pname, model, nodes)]
                kinds = {p.fmt if isinstance(p, Dequant) else None for p in progs}
                if len(kinds) != 1:
                    raise ConversionRefused(f"the experts of {first} are stored in mixed formats "
                                            f"{sorted(map(str, kinds))} ({describe(progs[0])})")
                fmt = kinds.pop()
                if fmt is None:
                    layer_src[ename] = ExpertTensorSource(tuple(progs), dtype)
                elif fmt == "fp8":
                    layer_src[ename] = ExpertTensorSource(tuple(p.data for p in progs), progs[0].data.dtype)
                    layer_src[ename + "_scale_inv"] = ExpertTensorSource(tuple(p.scale for p in progs),
                                                                         progs[0].scale.dtype)
                else:
                    layer_src[ename + "_blocks"] = ExpertTensorSource(tuple(p.data for p in progs), torch.uint8)
                    layer_src[ename + "_scales"] = ExpertTensorSource(tuple(p.scale for p in progs), torch.uint8)
            sources[g.layer] = layer_src
        return sources

    def _install(self, model) -> None:
        """A placeholder for every expert parameter, flagged loaded for transformers' finalize."""
        for g in self.groups:
            for pname in g.param_names():
                param = model.get_parameter(pname)
                ph = torch.nn.Parameter(torch.full((), float("nan"), dtype=param.dtype).expand(param.shape),
                                        requires_grad=False)
                ph._is_hf_initialized = True
                mod_name, _, attr = pname.rpartition(".")
                model.get_submodule(mod_name)._parameters[attr] = ph
                self.placeholders[pname] = ph


def _wrapper(model, state_dict, load_config, disk_offload_index=None, **kwargs):
    div = _ACTIVE.get()
    if div is None or div.claimed or kwargs:
        return _ORIGINAL[0](model, state_dict, load_config, disk_offload_index, **kwargs)
    return div.load(_ORIGINAL[0], model, state_dict, load_config, disk_offload_index)


@contextlib.contextmanager
def diverting_experts(index: dict[str, TensorEntry], path: str):
    """Within the block, this thread's transformers load keeps its experts on disk (yields
    the :class:`ExpertDiversion`, whose ``store`` and ``placeholders`` are set by the load)."""
    import transformers.modeling_utils as mu

    div = ExpertDiversion(index, os.fspath(path))
    with _PATCH_LOCK:
        if _PATCH_USERS[0] == 0:
            _ORIGINAL[:] = [mu.convert_and_load_state_dict_in_model]
            mu.convert_and_load_state_dict_in_model = _wrapper
        _PATCH_USERS[0] += 1
    token = _ACTIVE.set(div)
    try:
        yield div
    except BaseException:
        if div.store is not None:
            div.store.close()
        raise
    finally:
        _ACTIVE.reset(token)
        with _PATCH_LOCK:
            _PATCH_USERS[0] -= 1
            if _PATCH_USERS[0] == 0:
                mu.convert_and_load_state_dict_in_model = _ORIGINAL[0]
