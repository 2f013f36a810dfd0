"""The per-model engine behind the ``expertflow::*`` ops.

One :class:`ExpertEngine` serves one compiled model: it knows each rewritten MoE
layer (its :class:`~expertflow_compile.kernels.reference.ExpertMath`), owns the
expert cache when a budget is set, the predictor, and the stats. Graph nodes refer
to it by an integer id (custom ops cannot take Python objects); the registry also
maps each expert weight tensor to its engine so that ``stats(model)`` finds it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass

import torch

from ..config import ExpertFlowConfig
from ..kernels.reference import ExpertMath, combine_topk, expert_forward, prescale_rows

__all__ = ["ExpertEngine", "LayerPlan", "get_engine", "engine_for_tensor", "engines_for_module"]

log = logging.getLogger("expertflow_compile")

# engines are owned by their model: each expert weight tensor holds its engine in the
# attribute ``_expertflow_engine``; this registry only maps graph ids to live engines
_ENGINES: "weakref.WeakValueDictionary[int, ExpertEngine]" = weakref.WeakValueDictionary()
_ATTR = "_expertflow_engine"
_IDS = itertools.count(1)
_LOCK = threading.Lock()
LAYER_SHIFT = 20  # predicted ids are encoded layer << LAYER_SHIFT | expert


_ATTACHED_STORES: dict[int, tuple[weakref.ref, object]] = {}


def attach_store(tensor: torch.Tensor, store, layer: int | None = None) -> None:
    """Declare that the experts behind ``tensor`` (an expert weight of a model, usually a
    zero-stride placeholder) live in ``store`` (e.g. a SafetensorsExpertStore) as the
    store's MoE layer ``layer``: the engine built when the model is compiled uses it as
    its host tier."""
    _ATTACHED_STORES[id(tensor)] = (weakref.ref(tensor), store, layer)


def _attached(tensor: torch.Tensor | None):
    entry = _ATTACHED_STORES.get(id(tensor)) if tensor is not None else None
    if entry is None or entry[0]() is not tensor:
        return None
    return entry


def attached_store(tensor: torch.Tensor | None):
    entry = _attached(tensor)
    return None if entry is None else entry[1]


def _tensor_store_type():
    from .store import TensorExpertStore

    return TensorExpertStore


def engine_for_store(store) -> "ExpertEngine | None":
    """The open engine reading its experts from ``store`` (a loader's disk tier)."""
    with _LOCK:
        engines = list(_ENGINES.values())
    return next((e for e in engines if not e._closed and e.store is store), None)


def get_engine(engine_id: int) -> "ExpertEngine":
    try:
        return _ENGINES[engine_id]
    except KeyError:
        raise RuntimeError(f"expertflow engine {engine_id} no longer exists (its model was deleted "
                           "or reset); recompile the model") from None


def _ident(t):
    """The tensor that identifies a layer's expert weights (the first of an ExpertList)."""
    from .store import ExpertList

    return t.tensors[0] if isinstance(t, ExpertList) else t


def engine_for_tensor(t: torch.Tensor | None) -> "ExpertEngine | None":
    """The engine serving the expert weight tensor ``t`` (None if there is none)."""
    t = _ident(t)
    eng = getattr(t, _ATTR, None) if t is not None else None
    return eng if eng is not None and not eng._closed else None


def engines_for_module(module: torch.nn.Module) -> list["ExpertEngine"]:
    """Every engine serving a parameter of ``module`` (each once, in discovery order)."""
    found: dict[int, ExpertEngine] = {}
    for p in itertools.chain(module.parameters(), module.buffers()):
        eng = engine_for_tensor(p)
        if eng is not None:
            found.setdefault(eng.id, eng)
    return list(found.values())


@dataclass
class LayerPlan:
    """One rewritten MoE layer as the engine runs it."""

    layer: int
    num_experts: int
    top_k: int
    hidden_size: int
    math: ExpertMath
    rows_dtype: torch.dtype          # dtype of the down projection's output rows
    out_features: int                # hidden size of the expert output
    has_up_bias: bool = False
    has_down_bias: bool = False
    has_up2: bool = False            # separate gate and up weights (``up`` = gate, ``up2`` = up)
    views: tuple = ()                # ((name, [E, N, K]), ...): 2-D parameters viewed per expert

    def viewed(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` with the expert axis first, as the math expects it."""
        for n, shape in self.views:
            if n == name and t is not None:
                return t.view(shape)
        return t


class ExpertEngine:
    """Runtime state of one compiled model (see module docstring)."""

    def __init__(self, config: ExpertFlowConfig):
        from .stats import RuntimeStats

        self.config = config
        self.id = next(_IDS)
        self.layers: dict[int, LayerPlan] = {}
        self.stats = RuntimeStats()
        self.cache = None            # an ExpertCache when offloading
        self.store = None            # the host tier when offloading
        self.predictor = None
        self.graph_reports: list = []
        self._layer_tensors: dict[int, dict[str, torch.Tensor]] = {}
        self.routers: dict[int, tuple] = {}
        self._kinds: dict = {}
        # recorder(kind, layer, *tensors): kind "route" -> (ids [T, K], weights [T, K]) at each
        # grouped_gemm; kind "lookahead" -> (router logits [T, E] of `layer` applied to the
        # residual stream before its attention). Set by record_routing.
        self.recorder = None
        self._predicted: dict[int, set[int]] = {}
        self.prediction = {"true_positive": 0, "predicted": 0, "used": 0}
        self._cache_layers: tuple[int, ...] = ()
        self._closed = False
        with _LOCK:
            _ENGINES[self.id] = self

    # ----- registration -------------------------------------------------------------
    def register_layer(self, plan: LayerPlan, tensors: list[torch.Tensor]) -> None:
        """Add a rewritten layer and tie its weight tensors to this engine."""
        self.layers[plan.layer] = plan
        up, down, b_up, b_down, up2 = (list(tensors) + [None] * 5)[:5]
        self._layer_tensors[plan.layer] = {
            k: v for k, v in (("up", up), ("down", down), ("up_bias", b_up), ("down_bias", b_down), ("up2", up2))
            if v is not None
        }
        for t in tensors:
            for x in (getattr(t, "tensors", None) or [t]):   # an ExpertList: each expert's tensor
                if x is not None:
                    setattr(x, _ATTR, self)   # the model owns its engine (and so its cache thread)

    # ----- ops ----------------------------------------------------------------------
    def register_router(self, layer: int, fn, params: list[torch.Tensor]) -> None:
        """Layer ``layer``'s router chain, ``fn(h, *params) -> logits``, applicable to the
        residual stream before its attention (used by the lookahead predictor)."""
        self.routers[layer] = (fn, params)

    def predict(self, layer: int, hidden: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.full((width,), -1, dtype=torch.int64, device=hidden.device)
        codes = None
        if self.predictor is not None:        # a plug-in: path / oracle (runtime/predictors.py)
            codes = self.predictor.predict(self, layer, hidden)
        elif self.config.predictor == "lookahead" or self.recorder is not None:
            codes = self._lookahead(layer, hidden)
            if self.config.predictor != "lookahead":
                codes = None                  # recorded only
        if codes:
            n = min(width, len(codes))
            if n:
                out[:n] = torch.as_tensor(codes[:n], dtype=torch.int64)
        return out

    def _lookahead(self, layer: int, hidden: torch.Tensor) -> list[int]:
        """Apply the routers of ``layer`` .. ``layer + depth - 1`` to ``hidden``; per layer the
        union of each token's top (k + prefetch_extra) experts, most voted first."""
        order = sorted(self.layers)
        if layer not in order:
            return []
        start = order.index(layer)
        codes: list[int] = []
        with torch.no_grad():
            for target in order[start:start + self.config.lookahead_depth]:
                router = self.routers.get(target)
                if router is None:
                    continue
                fn, params = router
                logits = fn(hidden, *params)
                logits = logits.reshape(-1, logits.shape[-1]).float()
                if self.recorder is not None and target == layer:
                    self.recorder("lookahead", target, logits)
                plan = self.layers[target]
                k = min(plan.top_k + self.config.prefetch_extra, plan.num_experts)
                top = logits.topk(k, dim=-1).indices.reshape(-1)
                votes = torch.bincount(top, minlength=plan.num_experts)
                ranked = [e for e in torch.argsort(votes, descending=True, stable=True).tolist() if votes[e] > 0]
                self._predicted[target] = set(ranked)
                codes.extend((target << LAYER_SHIFT) | e for e in ranked)
        return codes

    def prefetch(self, layer: int, predicted: torch.Tensor) -> None:
        if self.cache is None:
            return
        wanted: dict[int, list[int]] = {}
        for code in predicted.tolist():
            if code >= 0:
                wanted.setdefault(code >> LAYER_SHIFT, []).append(code & ((1 << LAYER_SHIFT) - 1))
        for target_layer, experts in wanted.items():
            if target_layer in self.layers:
                n = self.layers[target_layer].num_experts   # a router may score more (identity experts)
                self.cache.prefetch(target_layer, [x for x in experts if x < n])

    def layer_number_for(self, layer: int, w_up, reserved=()) -> int:
        """The layer number under which the experts ``w_up`` are (or will be) known: the
        one they already have, ``layer`` if it is free, else the layer index attached to
        the tensor by the loader, else the next free number. ``reserved``: numbers given
        to other blocks of the same graph, not registered yet."""
        for other, tensors in self._layer_tensors.items():
            if _ident(tensors.get("up")) is _ident(w_up):
                return other
        taken = set(self._layer_tensors) | set(reserved)
        entry = _attached(_ident(w_up))   # the loader's layer index: the store is keyed by it
        if entry is not None and entry[2] is not None:
            if entry[2] in taken:
                raise RuntimeError(f"expertflow: MoE layer {entry[2]} of the checkpoint arrived twice with "
                                   "different tensors")
            return entry[2]
        if layer not in taken:
            return layer
        return max(taken) + 1

    def _resolve_layer(self, layer: int, w_up, w_down, b_up, b_down, w_up2=None) -> int:
        """The layer whose experts ``w_up`` holds. Dynamo may run one compiled graph for
        several modules with the same code (a graph break inside a decoder layer makes each
        layer a call of the same frame): the layer baked into the graph is then another
        module's, so the experts passed in decide. A module seen for the first time is
        bound as a layer of its own (and added to the cache)."""
        known = self._layer_tensors.get(layer)
        if known is not None and _ident(known.get("up")) is _ident(w_up):
            return layer
        for other, tensors in self._layer_tensors.items():
            if _ident(tensors.get("up")) is _ident(w_up):
                return other
        entry = _attached(_ident(w_up))
        new = entry[2] if entry is not None and entry[2] is not None else max(self._layer_tensors) + 1
        if new in self._layer_tensors:
            raise RuntimeError(f"expertflow: experts of MoE layer {new} arrived twice with different tensors")
        import dataclasses

        self.register_layer(dataclasses.replace(self.layers[layer], layer=new), [w_up, w_down, b_up, b_down, w_up2])
        log.info("expertflow: a compiled graph is shared by another MoE module; bound it as layer %d", new)
        if self.cache is not None:
            self.build_cache(self.store if not isinstance(self.store, _tensor_store_type()) else None)
        return new

    def grouped_gemm(self, layer, hidden, topk_weights, order, offsets, w_up, w_down, b_up, b_down, w_up2=None,
                     up_list=None, down_list=None):
        from .store import ExpertList

        if up_list is not None:     # ModuleDict experts: one tensor per expert
            w_up = ExpertList(up_list)
        if down_list is not None:
            w_down = ExpertList(down_list)
        layer = self._resolve_layer(layer, w_up, w_down, b_up, b_down, w_up2)
        plan = self.layers[layer]
        w_up, w_down, w_up2 = plan.viewed("up", w_up), plan.viewed("down", w_down), plan.viewed("up2", w_up2)
        offs = offsets.tolist()
        if offs[-1] != order.numel():
            raise RuntimeError(f"expertflow: MoE layer {layer} got expert ids outside [0, {plan.num_experts}) "
                               f"({order.numel() - offs[-1]} of {order.numel()} (token, k) pairs); refusing "
                               "to drop them silently")
        active = [e for e in range(plan.num_experts) if offs[e + 1] > offs[e]]
        top_k = topk_weights.shape[-1]
        if self.recorder is not None:
            ids = torch.empty(order.numel(), dtype=torch.int64)
            for e in active:
                ids[order[offs[e]:offs[e + 1]]] = e
            self.recorder("route", layer, ids.view(-1, top_k), topk_weights.detach().float())
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            p = self.prediction
            p["true_positive"] += len(predicted.intersection(active))
            p["predicted"] += len(predicted)
            p["used"] += len(active)
        fused = (None if plan.math.prescale or plan.has_up2 or up_list is not None or down_list is not None else
                 self._triton(plan, hidden, topk_weights, order, offsets, active, w_up, w_down, b_up, b_down))
        if fused is not None:
            return fused
        rows = hidden[order // top_k]
        if plan.math.prescale:
            rows = prescale_rows(rows, topk_weights, order)
        out_rows = torch.zeros(rows.shape[0], plan.out_features, dtype=plan.rows_dtype,
                               device=hidden.device)
        if self.cache is None:
            self.stats.add(layer, hits=len(active))
            for e in active:
                weights = {"up": w_up[e], "down": w_down[e],
                           "up_bias": b_up[e] if b_up is not None else None,
                           "down_bias": b_down[e] if b_down is not None else None,
                           "up2": w_up2[e] if w_up2 is not None else None}
                out_rows[offs[e]:offs[e + 1]] = expert_forward(rows[offs[e]:offs[e + 1]], weights, plan.math)
        else:
            self._cached_experts(plan, active, offs, rows, out_rows)
        return combine_topk(out_rows, torch.ones_like(topk_weights) if plan.math.prescale else topk_weights,
                            order, hidden.dtype)

    def _activation_kind(self, plan: LayerPlan, n_up: int, dtype, device):
        """The Triton activation kind of a layer's gating (None: the kernels don't have it)."""
        key = (plan.layer, n_up, dtype, str(device))
        if key not in self._kinds:
            from ..kernels.activations import classify_gate_fn

            self._kinds[key] = None if plan.math.post_fn is not None else classify_gate_fn(
                plan.math.gate_fn, n_up, dtype, device=device)
        return self._kinds[key]

    def _triton(self, plan, hidden, topk_weights, order, offsets, active, w_up, w_down, b_up, b_down):
        """The fused Triton kernels (kernels/triton_moe.py) when enabled and applicable, else None."""
        mode = self.config.kernels
        if mode == "torch" or (mode == "auto" and not hidden.is_cuda) or not active:
            return None
        if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        from ..kernels.triton_moe import slot_tables_from_views, triton_grouped_experts

        n_up = (w_up.shape[-1] if plan.math.up_transposed else w_up.shape[-2])
        kind = self._activation_kind(plan, n_up, hidden.dtype, hidden.device)
        if kind is None:
            if mode == "triton":
                log.warning("expertflow: layer %d's gating is not a Triton kernel kind; using torch", plan.layer)
            return None
        counts = offsets[1:] - offsets[:-1]
        ids = torch.empty_like(order)
        ids[order] = torch.repeat_interleave(torch.arange(plan.num_experts, device=order.device), counts)
        ids = ids.view(-1, topk_weights.shape[-1])
        args = dict(kind=kind, up_transposed=plan.math.up_transposed, down_transposed=plan.math.down_transposed)
        if self.cache is None:
            self.stats.add(plan.layer, hits=len(active))
            return triton_grouped_experts(hidden, ids, topk_weights, w_up, w_down, b_up, b_down, **args)
        if len(active) > self.cache.num_slots:   # cannot pin them all at once: per-expert torch path
            return None
        cache, layer = self.cache, plan.layer
        resident = [e for e in active if cache.is_resident(layer, e)]
        cache.prefetch(layer, resident + [e for e in active if e not in set(resident)])
        views = {}
        try:
            for e in active:
                views[e] = cache.acquire(layer, e)
            tables = slot_tables_from_views(views, plan.num_experts, up_transposed=plan.math.up_transposed,
                                            down_transposed=plan.math.down_transposed, device=hidden.device)
            out = triton_grouped_experts(hidden, ids, topk_weights, **tables, **args)
            if hidden.is_cuda:   # the slots must stay put until the kernels have read them
                torch.cuda.current_stream(hidden.device).synchronize()
            return out
        finally:
            for e in views:
                cache.release(layer, e)

    def _cached_experts(self, plan, active, offs, rows, out_rows) -> None:
        """Resident experts first while the misses load; each expert pinned only while it computes."""
        cache, layer = self.cache, plan.layer
        resident = [e for e in active if cache.is_resident(layer, e)]
        missing = [e for e in active if e not in set(resident)]
        if not self.config.resident_first:   # measurement baseline: expert-id order, loads on demand
            resident, missing = [], list(active)
        elif missing:   # residents are named too: the request never evicts them
            cache.prefetch(layer, resident + missing)
        for e in resident + missing:
            weights = cache.acquire(layer, e)
            try:
                out_rows[offs[e]:offs[e + 1]] = expert_forward(rows[offs[e]:offs[e + 1]], weights, plan.math)
            finally:
                cache.release(layer, e)

    def reset_stats(self) -> None:
        self.stats.reset()
        self.prediction = dict.fromkeys(self.prediction, 0)

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        p = self.prediction
        d["predictor"] = self.config.predictor
        d["predictor_precision"] = p["true_positive"] / p["predicted"] if p["predicted"] else 0.0
        d["predictor_recall"] = p["true_positive"] / p["used"] if p["used"] else 0.0
        d["layers"] = sorted(self.layers)
        d["offloading"] = self.cache is not None
        return d

    def on_graph_compiled(self, placeholder_values: dict) -> None:
        """Called after each graph of the model is rewritten: (re)build the expert cache
        when a budget is set and the engine now knows layers the cache does not."""
        if self.config.predictor in ("path", "oracle") and self.predictor is None:
            from .predictors import make_predictor   # the predictor issue's plug-ins

            self.predictor = make_predictor(self.config, self)
        if not self.layers or tuple(sorted(self.layers)) == self._cache_layers:
            return
        store = next((attached_store(t.get("up")) for t in self._layer_tensors.values()
                      if attached_store(t.get("up")) is not None), None)
        if store is None and not self.config.offloads:
            return
        self.build_cache(store)

    def min_resident_experts(self) -> int:
        """What one MoE layer needs resident at once: one token's top-k experts."""
        return max(p.top_k for p in self.layers.values())

    def build_cache(self, store=None) -> None:
        """Create the host tier (unless ``store`` is given) and the budgeted cache."""
        from .budget import parse_budget
        from .cache import ExpertCache
        from .store import TensorExpertStore

        if self.cache is not None:
            self.cache.close()
        if store is not None:
            self.store = store
        elif self.store is None or isinstance(self.store, TensorExpertStore):
            self.store = TensorExpertStore({   # rows past E (identity experts' up rows) never run
                l: {k: self.layers[l].viewed(k, v)[:self.layers[l].num_experts] for k, v in t.items()}
                for l, t in sorted(self._layer_tensors.items())})
        budget = parse_budget(self.config.expert_budget)
        slots = budget.resolve_slots(self.store.specs, self.min_resident_experts())
        any_up = next(iter(self._layer_tensors.values()), {}).get("up")
        device = any_up.device if any_up is not None and any_up.device.type != "meta" else torch.device("cpu")
        self.cache = ExpertCache(self.store, slots, policy=self.config.policy, device=device,
                                 prefetch=self.config.prefetch, stats=self.stats)
        self._cache_layers = tuple(sorted(self.layers))
        log.info("expertflow: %d expert slots (%d bytes) for %d MoE layers, policy %s",
                 slots, self.cache.budget_bytes, len(self.layers), self.config.policy)

    # ----- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.cache is not None:
            self.cache.close()
        if self.store is not None:
            self.store.close()
        with _LOCK:
            _ENGINES.pop(self.id, None)
        for tensors in self._layer_tensors.values():
            for t in tensors.values():
                for x in (getattr(t, "tensors", None) or [t]):   # an ExpertList: each expert's tensor
                    if getattr(x, _ATTR, None) is self:
                        delattr(x, _ATTR)
