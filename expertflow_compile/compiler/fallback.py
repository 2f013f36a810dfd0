"""Dynamo's eager fallback never serves a budgeted model eagerly, silently.

When a frame reaches ``torch._dynamo.config.recompile_limit`` (8), Dynamo stops compiling
it and runs the plain Python code of every call that matches none of its graphs: the
model's own forward, without our rewrite. An in-memory model would then stop offloading
(no budget) and a ``from_pretrained`` model would compute with its on-disk placeholders.

**Where we step in.** Hugging Face's experts modules (classes decorated with
``transformers.integrations.moe.use_experts_implementation``: every family whose MoE
block calls ``experts(hidden_states, top_k_index, top_k_weights)``) look their
implementation up at every call with ``ExpertsInterface.get_interface``, which
``traceable.py`` already dispatches. Outside compilation only (``traceable.EAGER``: a
branch Dynamo never traces, so graphs and guards are the same as without it), the
implementation handed out is wrapped: a module whose expert tensors an engine serves runs
the rewritten block's computation eagerly - the ``permute`` op and
``ExpertEngine.grouped_gemm``, the engine the compiled graph calls (same cache, budget,
stats) - and a :class:`FellBackWarning` says once per engine that compilation fell back.
Modules no engine serves, and plain eager calls of a module (outside any
``torch.compile`` call: Dynamo's frame callback is unset, :func:`in_compiled_region`), run
HF's implementation unchanged; a ``from_pretrained`` model refuses those as before.

**Checked.** The first eager call of each in-memory layer also runs HF's implementation
and compares (the numeric check's tolerance); a layer that differs keeps HF's code (still
exact) and the warning says its budget is not enforced. Families whose MoE block is one
of ``traceable.py``'s loop-free forms (DBRX, JetMoE, LongCat-Flash, Llama-4, Switch) have
no such call: there the block's own code runs, the warning says the budget is not
enforced, and a ``from_pretrained`` model refuses (the loader's hook, naming the
recompile limit and the fixes).
"""

from __future__ import annotations

import logging
import threading
import warnings

import torch

from . import traceable
from .passes.verify import tolerance
from ..runtime.registry import _ident, engine_for_tensor, engines_for_module

__all__ = ["FellBackWarning", "in_compiled_region", "routes_eagerly", "fell_back_message", "fixes"]

log = logging.getLogger("expertflow_compile")
_LOCK = threading.Lock()
_WARNED: set[int] = set()
_HF_FORWARD = "use_experts_implementation."   # qualname prefix of HF's decorated experts forward


class FellBackWarning(RuntimeWarning):
    """Dynamo ran a compiled expertflow model eagerly (recompile limit reached)."""


def _served(module):
    """``(engine, layer)`` serving ``module``'s own expert tensors, else None."""
    for p in module._parameters.values():
        eng = engine_for_tensor(p) if p is not None else None
        if eng is None:
            continue
        for layer, tensors in list(eng._layer_tensors.items()):
            for t in tensors.values():
                if p is _ident(t) or any(p is x for x in getattr(t, "tensors", ())):
                    return eng, layer
    return None


def in_compiled_region() -> bool:
    """Whether Python code runs inside a ``torch.compile`` call (Dynamo's callback is set:
    ``False`` while it runs a frame eagerly past the recompile limit) rather than in a plain
    eager call of the module (``None``): a plain call keeps Hugging Face's code."""
    return torch._C._dynamo.eval_frame.get_eval_frame_callback() is not None


def routes_eagerly(module) -> bool:
    """Whether this eager call of the experts ``module`` goes through its engine."""
    if not in_compiled_region():
        return False
    code = getattr(getattr(type(module), "forward", None), "__code__", None)   # wraps() copies __qualname__
    return getattr(code, "co_qualname", "").startswith(_HF_FORWARD) and _served(module) is not None


def fell_back_message() -> str:
    return ("Dynamo ran the compiled model eagerly (its recompile limit was reached: "
            f"torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit}, or the "
            "recompile_limit given to compile; or the frame was skipped)")


def fixes() -> str:
    """What to do about it (each generate style adds graphs: prefill and decode, batch 1 and
    larger, with and without an attention mask, another cache class)."""
    return ("to keep compiling, give this model a higher limit: model.compile(backend='expertflow', "
            "options=..., recompile_limit=64) (no global setting changes), or call torch._dynamo.reset() "
            "to start over")


def _warn(eng, detail: str) -> None:
    with _LOCK:
        if eng.id in _WARNED:
            return
        _WARNED.add(eng.id)
    msg = f"expertflow: {fell_back_message()}; {detail}; {fixes()}"
    log.warning(msg)
    warnings.warn(msg, FellBackWarning, stacklevel=3)


def _route(eng, layer: int, hidden, top_k_index, top_k_weights):
    """The rewritten block's computation, called eagerly: permute + the engine's grouped GEMM."""
    plan = eng.layers[layer]
    t = eng._layer_tensors[layer]
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])
    ids = top_k_index.reshape(h.shape[0], -1)
    weights = top_k_weights.reshape(h.shape[0], -1)
    order, offsets = torch.ops.expertflow.permute(ids, plan.num_experts)
    out = eng.grouped_gemm(layer, h, weights, order, offsets, t.get("up"), t.get("down"),
                           t.get("up_bias"), t.get("down_bias"), t.get("up2"))
    return out.reshape(*shape[:-1], out.shape[-1])


def _on_disk(module) -> bool:
    return any(p is not None and p.numel() > 1 and all(s == 0 for s in p.stride())
               for p in module._parameters.values())


def _eager_experts(impl):
    """HF's experts implementation ``impl`` with the engine route in front of it."""
    def experts_forward(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        served = _served(module) if not (args or kwargs) and in_compiled_region() else None
        if served is None:
            return impl(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        eng, layer = served
        checked = eng.__dict__.setdefault("_eager_checked", {})
        ok = checked.get(layer)
        if ok is None and not _on_disk(module):   # first eager call of an in-memory layer: compare once
            ref = impl(module, hidden_states, top_k_index, top_k_weights)
            out = _route(eng, layer, hidden_states, top_k_index, top_k_weights)
            scale = ref.float().abs().max().item() if ref.numel() else 0.0
            ok = checked[layer] = out.shape == ref.shape and (
                ref.numel() == 0 or (out.float() - ref.float()).abs().max().item() <= tolerance(ref.dtype, scale))
            if not ok:
                _warn(eng, f"{type(module).__name__} (MoE layer {layer}) runs its own code: the expert budget "
                           "is not enforced for it")
                return ref
        elif ok is False:
            return impl(module, hidden_states, top_k_index, top_k_weights)
        else:
            out = _route(eng, layer, hidden_states, top_k_index, top_k_weights)
        _warn(eng, "its experts are still served through expertflow's engine and budget")
        return out

    experts_forward._expertflow_eager = impl
    return experts_forward


_WRAPPED: dict[int, object] = {}


def _get_interface(iface, original, experts_implementation, default):
    impl = original(iface, experts_implementation, default)
    wrapped = _WRAPPED.get(id(impl))
    if wrapped is None or wrapped._expertflow_eager is not impl:
        wrapped = _WRAPPED[id(impl)] = _eager_experts(impl)
    return wrapped


def _block_fell_back(module, original, *args, **kwargs):
    """A loop-free form's MoE block called eagerly: its own code runs (warned once)."""
    for eng in (engines_for_module(module) if in_compiled_region() else ()):
        _warn(eng, f"{type(module).__name__} runs its own code: the expert budget is not enforced for it")
    return original(module, *args, **kwargs)


def install() -> None:
    """Register the eager hooks (idempotent); called when the backend is imported."""
    for key, patch in traceable.REGISTRY.items():
        if patch.kind != "trace" or key in traceable.EAGER:
            continue
        if key == ("transformers.integrations.moe", "ExpertsInterface", "get_interface"):
            traceable.EAGER[key] = _get_interface
        elif patch.cls != "JetMoeTopKGating" and patch.method == "forward":
            traceable.EAGER[key] = _block_fell_back
