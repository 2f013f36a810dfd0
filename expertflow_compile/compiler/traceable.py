"""Traceable forms of MoE blocks that only have a per-expert Python loop.

Some transformers families dispatch their experts with a Python loop over the experts
that were hit (``nonzero()``, ``.tolist()``, ``.item()``): JetMoE, LongCat-Flash and
DBRX (and Llama-4, whose dense all-experts dispatch has no ids to find). Dynamo graph-breaks at those calls and the loop runs outside any graph, so the
backend never sees the dispatch. This module gives Dynamo an equivalent loop-free form
of those blocks, written like Hugging Face's ``grouped_mm`` experts implementation
((token, k) pairs sorted by expert, one grouped GEMM per projection over the whole
``[E, ...]`` weight, the family's activation, routing weights after the down
projection, sum over k), which the matcher recognises. The form is used only while Dynamo traces for the expertflow
backend; eager execution and every other backend keep running the original code.

Mechanism
---------
* ``REGISTRY`` maps ``(transformers module, class, method)`` to a replacement.
  ``install()`` swaps each registered method for a small dispatcher (``functools.wraps``
  keeps the original's name, docstring and signature). It patches the modules already
  imported and puts a finder on ``sys.meta_path`` that patches the others right after
  they are imported (nothing is imported ahead of time). ``install()`` is idempotent;
  ``uninstall()`` restores the originals. ``expertflow_compile.compiler.backend`` calls
  ``install()`` when it is imported, i.e. at the latest when ``torch.compile`` looks up
  the ``"expertflow"`` entry point, before the first trace.
* A ``"trace"`` dispatcher runs ``torch.compiler.is_compiling() and
  _expertflow_tracing()``. Outside Dynamo the first test is False and the original
  runs. Inside Dynamo, ``_expertflow_tracing`` is an ``assume_constant_result``
  function: Dynamo calls it while tracing and bakes the answer (a Python bool) into the
  trace, so the untaken branch leaves no trace at all. It reads the backend of the
  compile in progress (``InstructionTranslator.current_tx().output.compiler_fn``) and
  unwraps torch's wrappers (``WrapBackendDebug._torchdynamo_orig_backend``,
  ``_TorchCompileWrapper.compiler_fn``, ``functools.partial``, ``__wrapped__``) looking
  for ``expertflow_backend`` or a callable marked with :func:`mark_expertflow_backend`
  (for wrappers such as ``explain``'s or a test's capturing backend). Dynamo keys its
  cache entries by backend, so code traced for expertflow is never reused by another
  backend.
* A ``"batched"`` dispatcher (on the experts modules) takes the loop-free path only when
  called with the keyword ``_expertflow_batched=<mode>``, which only the ``"trace"``
  forms pass: the expert math then runs inside the experts module's own scope (the
  matcher bounds a block by the module scope of its expert GEMMs), while
  family-specific work (routing, clamping ids, identity experts, biases) stays in the
  parent's scope.

Families
--------
* jetmoe: ``JetMoeMoE`` routes in its own scope and calls the two expert GEMMs through
  ``input_linear`` (its scope holds both; ``output_linear.weight`` is passed in);
  ``+ self.bias`` stays in the parent. ``JetMoeTopKGating`` keeps ``expert_size`` a
  tensor (no ``.tolist()``), so router-logit hooks still fire. The attention experts
  (``JetMoeMoA.map`` / ``reduce``) get the same treatment: the layer traces without a
  graph break; the matcher leaves them alone (their two GEMMs are in different modules,
  with attention between them).
* longcat_flash: ids >= ``n_routed_experts`` are identity experts. The parent clamps
  the ids into the routed range, zeroes their routing weight for the real experts and
  adds ``x * weight`` for the identity ones itself.
* every family using HF's experts interface with ``experts_implementation="eager"``:
  ``ExpertsInterface.get_interface`` returns HF's ``grouped_mm`` implementation instead
  of the loop.
* llama4 / llama4_text: ``Llama4TextMoe`` runs every expert densely on
  ``x * sigmoid(score)``; the form takes the router's top-k instead and the experts
  scale their input rows (``ExpertMath.prescale``). Not a loop, but the dense dispatch
  has no (ids, weights) for the matcher to find.
* switch_transformers: top-1 with capacity (dropped tokens get weight 0); experts are
  a ModuleDict of Linear layers whose weights are stacked in the form: the matcher
  hands the per-expert tensors to the runtime, so the stack itself never runs.
* step3p7: ``Step3p7Experts`` loops over the experts hit; its form is grouped, with the
  module's clamped SwiGLU ``_apply_gate`` between the projections.
* dbrx: ``DbrxFFN`` flattens the tokens and calls ``DbrxExperts`` batched: w1/v1/w2
  are 2-D ``[E*I, H]`` parameters viewed as ``[E, I, H]``; gate = x @ w1[e].T,
  up = x @ v1[e].T, down = inter @ w2[e].
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

__all__ = ["REGISTRY", "install", "uninstall", "installed", "mark_expertflow_backend",
           "is_expertflow_backend"]

_MARK = "_expertflow_backend"


# --------------------------------------------------------------------------- backend test

def mark_expertflow_backend(fn):
    """Mark a callable backend that runs ``expertflow_backend`` (a wrapper, a lambda),
    so that the traceable forms are used when it compiles. Returns ``fn``."""
    try:
        setattr(fn, _MARK, True)
    except (AttributeError, TypeError):   # e.g. a bound method: mark what it wraps instead
        setattr(getattr(fn, "__func__"), _MARK, True)
    return fn


def is_expertflow_backend(fn) -> bool:
    """Whether the torch.compile backend ``fn`` is (a wrapper of) the expertflow backend."""
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if getattr(fn, _MARK, False) is True:
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        nxt = getattr(fn, "_torchdynamo_orig_backend", None)        # WrapBackendDebug & co
        if nxt is None and type(fn).__name__ == "_TorchCompileWrapper":
            nxt = getattr(fn, "compiler_fn", None)                   # torch.compile(..., options=)
        if nxt is None:
            nxt = getattr(fn, "__wrapped__", None)
        fn = nxt
    return False


@torch._dynamo.assume_constant_result
def _expertflow_tracing() -> bool:
    """True while Dynamo traces for the expertflow backend. Only ever called under
    ``torch.compiler.is_compiling()``; Dynamo evaluates it at trace time (constant)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return False
    output = getattr(tx, "output", None)
    return output is not None and is_expertflow_backend(getattr(output, "compiler_fn", None))


# --------------------------------------------------------------------------- grouped math
#
# Written like HF's ``grouped_mm`` experts implementation: the (token, k) pairs sorted by
# expert, one grouped GEMM per projection over the whole [E, ...] weight with per-expert
# offsets (``transformers.integrations.moe._grouped_linear``: ``grouped_mm`` where torch
# has it, HF's ``grouped_mm_fallback`` op elsewhere). Memory is O(pairs x hidden), never
# a copy of an expert's weights per pair (the form still runs once, in the rewrite's
# check, and wherever the matcher leaves a block alone).

class _Groups(NamedTuple):
    rows: torch.Tensor      # [S, H] the pairs' input rows, sorted by expert
    perm: torch.Tensor      # [S] pair index (t * k + j) of each sorted row
    offsets: torch.Tensor   # [E] int32 cumulative rows per expert
    top_k: int


def _group(x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> _Groups:
    """Sort the (token, k) pairs of ``ids`` [T, k] by expert (ids must be < E)."""
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    counts = torch.histc(sorted_ids.float() if x.device.type in ("cpu", "mps") else sorted_ids.int(),
                         bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return _Groups(x[perm // ids.size(-1)], perm, offsets, ids.size(-1))


def _glinear(g: _Groups, rows: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """rows[s] @ W[e(s)].T (``transposed``: rows[s] @ W[e(s)]) for rows sorted as ``g``."""
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear(rows, weight, g.offsets, is_transposed=transposed)


def _unsort(g: _Groups, out: torch.Tensor) -> torch.Tensor:
    """Sorted rows back to (token, k) order [T*k, N]."""
    inv = torch.empty_like(g.perm)
    inv[g.perm] = torch.arange(g.perm.size(0), device=g.perm.device)
    return out[inv]


def _combine(g: _Groups, out: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Routing weights after the down projection (None: already applied), back to
    token order, sum over k: [T, H]."""
    if weights is not None:
        out = out * weights.reshape(-1)[g.perm].unsqueeze(-1)
    out = _unsort(g, out)
    return out.view(-1, g.top_k, out.size(-1)).sum(dim=1).to(dtype)


def _glu(act, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


# --------------------------------------------------------------------------- registry

@dataclass
class Patch:
    """One method replaced by :func:`install`.

    kind "trace": ``fn(self, *args, **kwargs)`` replaces the method while Dynamo traces
    for expertflow. kind "batched": ``fn(self, mode, *args)`` runs when the method is
    called with ``_expertflow_batched=mode`` (only the "trace" forms do that).
    kind "topo": ``fn`` runs when the last positional argument is a ``_MoATopo``.
    """

    module: str
    cls: str
    method: str
    kind: str
    fn: Callable


REGISTRY: dict[tuple[str, str, str], Patch] = {}
# (module, class, method) of a "trace" patch -> hook(self, original, *args, **kwargs) run
# instead of the original outside compilation (registered by fallback.py); Dynamo never
# traces this branch, so graphs and guards do not depend on it
EAGER: dict[tuple[str, str, str], Callable] = {}


def register(module: str, cls: str, method: str = "forward", kind: str = "trace"):
    def deco(fn):
        REGISTRY[(module, cls, method)] = Patch(module, cls, method, kind, fn)
        return fn
    return deco


# ---- jetmoe

_JETMOE = "transformers.models.jetmoe.modeling_jetmoe"


class _MoATopo(NamedTuple):
    """JetMoE attention-expert routing as the traceable ``map`` returns it to ``reduce``."""

    ids: torch.Tensor     # [T, k]
    gates: torch.Tensor   # [T, k]


@register(_JETMOE, "JetMoeTopKGating")
def _jetmoe_gating(self, hidden_states):
    """The original, with ``expert_size`` left a tensor (no ``.tolist()``); its only
    callers (``JetMoeMoE``, ``JetMoeMoA.map``) are traceable under the same condition."""
    logits = self.layer(hidden_states).float()
    top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
    zeros = torch.zeros([top_k_gates.size(0), self.num_experts], dtype=top_k_gates.dtype,
                        device=top_k_gates.device)
    expert_size = zeros.scatter(1, top_k_indices, 1).long().sum(0)
    top_k_experts = top_k_indices.flatten()
    _, index_sorted_experts = top_k_experts.sort(0)
    batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
    batch_gates = top_k_gates.flatten()[index_sorted_experts]
    return index_sorted_experts, batch_index, batch_gates, expert_size, logits


def _jetmoe_route(router, x):
    """(ids [T, k], gates [T, k], logits) as ``JetMoeTopKGating`` computes them."""
    logits = router(x)[4]
    top_k_logits, ids = logits.topk(router.top_k, dim=1)
    return ids, torch.softmax(top_k_logits, dim=1).type_as(x), logits


@register(_JETMOE, "JetMoeMoE")
def _jetmoe_moe(self, layer_input):
    bsz, length, emb_size = layer_input.size()
    x = layer_input.reshape(-1, emb_size)
    ids, gates, _ = _jetmoe_route(self.router, x)
    out = self.input_linear(x, ids, gates, self.output_linear.weight, self.activation,
                            _expertflow_batched="glu_ffn")
    return out.view(bsz, length, self.input_size) + self.bias


@register(_JETMOE, "JetMoeParallelExperts", kind="batched")
def _jetmoe_parallel_experts(self, mode, *args):
    if mode == "glu_ffn":   # the whole expert FFN: self holds the up weight, down passed in
        x, ids, gates, down_weight, act = args
        g = _group(x, ids, self.num_experts)
        h = _glu(act, _glinear(g, g.rows, self.weight))
        return _combine(g, _glinear(g, h, down_weight), gates, x.dtype)
    if mode == "rows":      # one projection of rows in (token, k) order: rows[s] @ W[ids[s]].T
        rows, ids = args
        g = _group(rows, ids.reshape(-1, 1), self.num_experts)
        return _unsort(g, _glinear(g, g.rows, self.weight))
    raise ValueError(f"unknown batched mode {mode!r}")


@register(_JETMOE, "JetMoeMoA", "map")
def _jetmoe_moa_map(self, layer_input):
    bsz, length, emb_size = layer_input.size()
    x = layer_input.reshape(-1, emb_size)
    ids, gates, logits = _jetmoe_route(self.router, x)
    rows = x.repeat_interleave(ids.size(-1), dim=0)
    q = self.input_linear(rows, ids.reshape(-1), _expertflow_batched="rows")   # row t*k + j: expert ids[t, j]
    return q.view(bsz, length, self.top_k, -1), logits, _MoATopo(ids, gates)


@register(_JETMOE, "JetMoeMoA", "reduce", kind="topo")
def _jetmoe_moa_reduce(self, layer_input, topo_info):
    bsz, length, k, hidden_size = layer_input.size()
    rows = layer_input.reshape(-1, hidden_size)
    out = self.output_linear(rows, topo_info.ids.reshape(-1), _expertflow_batched="rows")
    out = (out * topo_info.gates.reshape(-1, 1)).view(bsz * length, k, -1).sum(dim=1).to(out.dtype)
    return out.view(bsz, length, self.input_size) + self.bias


# ---- longcat_flash

_LONGCAT = "transformers.models.longcat_flash.modeling_longcat_flash"


@register(_LONGCAT, "LongcatFlashMoE")
def _longcat_moe(self, hidden_states):
    orig_shape = hidden_states.shape
    _, weights, ids = self.router(hidden_states)
    x = hidden_states.view(-1, hidden_states.shape[-1])
    experts = self.experts
    n = experts.num_routed_experts
    identity = experts.zero_expert_num > 0 or n == 0
    routed = ids < n if identity else None
    if experts.gate_up_proj is None or n == 0:
        out = torch.zeros_like(x)
    elif experts.zero_expert_num == 0:
        out = experts(x, ids, weights, _expertflow_batched="glu_ffn")
    else:
        # identity slots: a clamped (in-range) id with weight 0 for the real experts
        out = experts(x, ids.clamp(max=n - 1), weights.masked_fill(~routed, 0.0),
                      _expertflow_batched="glu_ffn")
    if identity:
        ident = weights.masked_fill(routed, 0.0)   # identity experts: x * weight, per slot
        out = out + (x.unsqueeze(1) * ident.unsqueeze(-1)).to(x.dtype).sum(dim=1)
    return out.view(*orig_shape)


@register(_LONGCAT, "LongcatFlashExperts", kind="batched")
def _longcat_experts(self, mode, x, ids, weights):
    if mode != "glu_ffn":
        raise ValueError(f"unknown batched mode {mode!r}")
    n = self.num_routed_experts
    g = _group(x, ids, n)
    h = _glu(self.act_fn, _glinear(g, g.rows, self.gate_up_proj[:n]))   # rows past n: identity experts
    return _combine(g, _glinear(g, h, self.down_proj), weights, x.dtype)


# ---- dbrx

_DBRX = "transformers.models.dbrx.modeling_dbrx"


@register(_DBRX, "DbrxFFN")
def _dbrx_ffn(self, hidden_states):
    router_logits = self.router(hidden_states)
    weights, ids = self.route_tokens_to_experts(router_logits)
    batch_size = hidden_states.shape[0]
    hidden = self.experts.hidden_size
    out = self.experts(hidden_states.reshape(-1, hidden), ids, weights, _expertflow_batched="glu_ffn")
    return out.view(batch_size, -1, hidden)


@register(_DBRX, "DbrxExperts", kind="batched")
def _dbrx_experts(self, mode, x, ids, weights):
    if mode != "glu_ffn":
        raise ValueError(f"unknown batched mode {mode!r}")
    shape = (self.num_experts, self.ffn_hidden_size, self.hidden_size)
    g = _group(x, ids, self.num_experts)
    mlp = self.mlp
    gate = _glinear(g, g.rows, mlp.w1.view(shape))                      # x @ w1[e].T
    up = _glinear(g, g.rows, mlp.v1.view(shape))                        # x @ v1[e].T
    h = mlp.activation_fn(gate) * up
    down = _glinear(g, h, mlp.w2.view(shape), transposed=True)          # h @ w2[e]
    return _combine(g, down, weights, x.dtype)


# ---- any family with HF's experts interface, set to its per-expert loop

_HF_MOE = "transformers.integrations.moe"


@register(_HF_MOE, "ExpertsInterface", "get_interface")
def _experts_interface(self, experts_implementation, default):
    """``experts_implementation="eager"`` selects the per-expert loop, which Dynamo
    splits off the graph. While expertflow traces, hand out HF's own ``grouped_mm``
    implementation instead (the same math, the one the matcher reads); eager runs
    and other backends still get the loop."""
    original = _ORIGINALS[(_HF_MOE, "ExpertsInterface", "get_interface")][1]
    if experts_implementation == "eager" and "grouped_mm" in self:
        return original(self, "grouped_mm", default)
    return original(self, experts_implementation, default)


# ---- step3p7 (Step-3.7: its Step3p5 text model's experts are only a loop)

_STEP3P7 = "transformers.models.step3p7.modeling_step3p7"


@register(_STEP3P7, "Step3p7Experts")
def _step3p7_experts(self, hidden_states, top_k_index, top_k_weights):
    """The loop's math in grouped form: the module's own ``_apply_gate`` (SiLU gate and up,
    each clamped to the layer's SwiGLU limit, infinite on most layers), routing weight
    after the down projection. The loop skips id ``num_experts`` (its one-hot has E + 1
    classes): such a slot gets weight 0 on a clamped id here. The router's top-k never
    yields it."""
    n = self.num_experts
    ids = top_k_index.clamp(max=n - 1)
    weights = top_k_weights.masked_fill(top_k_index >= n, 0.0)
    g = _group(hidden_states, ids, n)
    h = self._apply_gate(_glinear(g, g.rows, self.gate_up_proj))
    return _combine(g, _glinear(g, h, self.down_proj), weights, hidden_states.dtype)


# ---- llama4

_LLAMA4 = "transformers.models.llama4.modeling_llama4"


@register(_LLAMA4, "Llama4TextMoe")
def _llama4_moe(self, hidden_states):
    """Llama-4 runs every expert on every token, each on ``x * sigmoid(score)`` (0 for
    the experts not in the token's top-k, whose output is then 0). Same sum, taken over
    the top-k only: ids and weights are the router's top-k and the sigmoid of their
    logits, and the experts scale their input rows (the matcher's "pre-scaled" form)."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    _, router_logits = self.router(x)     # the router module runs (its hooks fire); its dense
    top_value, ids = torch.topk(router_logits, self.top_k, dim=1)   # scores are not needed
    weights = torch.sigmoid(top_value.float()).to(router_logits.dtype)
    routed = self.experts(x, ids, weights, _expertflow_batched="prescaled_glu_ffn")
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits


@register(_LLAMA4, "Llama4TextExperts", kind="batched")
def _llama4_experts(self, mode, x, ids, weights):
    if mode != "prescaled_glu_ffn":
        raise ValueError(f"unknown batched mode {mode!r}")
    g = _group(x, ids, self.num_experts)
    rows = g.rows * weights.reshape(-1)[g.perm].unsqueeze(-1)             # the router-scaled input
    gate_up = _glinear(g, rows, self.gate_up_proj, transposed=True)      # [E, H, 2I]: x @ W
    gate, up = gate_up.chunk(2, dim=-1)
    h = up * self.act_fn(gate)
    return _combine(g, _glinear(g, h, self.down_proj, transposed=True), None, x.dtype)


# ---- switch_transformers

_SWITCH = "transformers.models.switch_transformers.modeling_switch_transformers"


@register(_SWITCH, "SwitchTransformersSparseMLP")
def _switch_sparse_mlp(self, hidden_states):
    """Top-1 with capacity: the router's masked one-hot gives the id (argmax) and
    whether the token was kept; a dropped token gets routing weight 0 (the loop adds
    nothing for it)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    selected, probs, _ = self.router(hidden_states)
    x = hidden_states.view(-1, hidden_dim)
    onehot = selected.view(-1, self.router.num_experts)
    ids = onehot.argmax(dim=-1, keepdim=True)
    weights = probs.view(-1, 1) * onehot.sum(dim=-1, keepdim=True).to(probs.dtype)
    out = self.experts(x, ids, weights, _expertflow_batched="modules")
    return out.reshape(batch_size, sequence_length, hidden_dim)


@register(_SWITCH, "SwitchTransformersExperts", kind="batched")
def _switch_experts(self, mode, x, ids, weights):
    """Experts as a ModuleDict of Linear layers: their 2-D weights stacked per
    projection (the matcher passes the per-expert tensors on; the stack never runs)."""
    if mode != "modules":
        raise ValueError(f"unknown batched mode {mode!r}")
    experts = [self[f"expert_{i}"] for i in range(self.num_experts)]
    wi = torch.stack([e.wi.weight for e in experts])      # [E, d_ff, d_model]
    wo = torch.stack([e.wo.weight for e in experts])      # [E, d_model, d_ff]
    g = _group(x, ids, self.num_experts)
    h = experts[0].act(_glinear(g, g.rows, wi))
    return _combine(g, _glinear(g, h.to(wo.dtype), wo), weights, x.dtype)


# --------------------------------------------------------------------------- install

# (module, class, method) -> (class, original method), for uninstall()
_ORIGINALS: dict[tuple[str, str, str], tuple[type, Callable]] = {}


def _dispatcher(patch: Patch, original: Callable) -> Callable:
    key = (patch.module, patch.cls, patch.method)
    if patch.kind == "trace":
        def dispatch(self, *args, **kwargs):
            if torch.compiler.is_compiling():
                if _expertflow_tracing():
                    return REGISTRY[key].fn(self, *args, **kwargs)
            elif key in EAGER:   # outside compilation only (fallback.py: Dynamo's eager fallback)
                return EAGER[key](self, original, *args, **kwargs)
            return original(self, *args, **kwargs)
    elif patch.kind == "batched":
        def dispatch(self, *args, _expertflow_batched=None, **kwargs):
            if _expertflow_batched is not None:
                return REGISTRY[key].fn(self, _expertflow_batched, *args, **kwargs)
            return original(self, *args, **kwargs)
    elif patch.kind == "topo":
        def dispatch(self, *args, **kwargs):
            if args and isinstance(args[-1], _MoATopo):
                return REGISTRY[key].fn(self, *args, **kwargs)
            return original(self, *args, **kwargs)
    else:
        raise ValueError(f"unknown patch kind {patch.kind!r}")
    functools.wraps(original)(dispatch)
    dispatch._expertflow_original = original
    return dispatch


def _patch_module(module_name: str) -> None:
    mod = sys.modules.get(module_name)
    if mod is None:
        return
    for key, patch in REGISTRY.items():
        if patch.module != module_name:
            continue
        cls = getattr(mod, patch.cls, None)
        original = cls.__dict__.get(patch.method) if isinstance(cls, type) else None
        if original is None or hasattr(original, "_expertflow_original"):
            continue   # another transformers version (nothing to patch), or already patched
        _ORIGINALS[key] = (cls, original)
        setattr(cls, patch.method, _dispatcher(patch, original))


class _PatchingLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then patches the module it loaded."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_module(module.__name__)

    def __getattr__(self, name):   # get_source, get_filename, ... for inspect/linecache
        return getattr(self._inner, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a registered transformers module right after it is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in {p.module for p in REGISTRY.values()}:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_FINDER = _PatchOnImport()


def install() -> None:
    """Put the dispatchers in place (see the module docstring); idempotent."""
    for module_name in {p.module for p in REGISTRY.values()}:
        _patch_module(module_name)
    if not any(f is _FINDER for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Restore the original methods and stop patching on import."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for key, (cls, original) in list(_ORIGINALS.items()):
        if hasattr(cls.__dict__.get(key[2]), "_expertflow_original"):
            setattr(cls, key[2], original)
        del _ORIGINALS[key]


def installed() -> list[tuple[str, str, str]]:
    """The (module, class, method) currently dispatched."""
    return sorted(k for k, (cls, _) in _ORIGINALS.items()
                  if hasattr(cls.__dict__.get(k[2]), "_expertflow_original"))
