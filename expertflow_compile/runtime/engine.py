"""The per-model engine behind the ``expertflow::*`` ops: the top of the runtime.

One :class:`ExpertEngine` serves one compiled model: it knows each rewritten MoE
layer (its :class:`~expertflow_compile.layer.ExpertMath`), owns the
expert cache when a budget is set, the predictor, and the stats. Graph nodes refer
to it by an integer id (custom ops cannot take Python objects); the registry
(:mod:`.registry`, re-exported here) maps ids and expert weight tensors to engines.

Per MoE layer call the engine makes one host transfer (the per-expert offsets of the
permuted routing) and one cache call: ``ExpertCache.acquire_layer`` with the layer's
unique experts, whose lease yields resident experts first while the missing ones load,
releasing each once its compute is issued (torch path); the fused Triton path holds them
all and reads the cache's slot table instead. Predictions go from the predict op to the
prefetch op host-side (the codes tensor is only the graph's dependency), so prediction
adds no host sync either.

The runtime reads top-down: ``store``/``stats``/``budget`` -> ``policies``/``pool`` ->
``cache``; ``trace`` -> ``prediction`` (no engine import); ``registry``; this module on
top. Nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import ExpertFlowConfig
from ..kernels.reference import combine_topk, combine_topk_inverse, expert_forward, permute_math, prescale_rows
from ..layer import ExpertList, LayerPlan
from .prediction import LAYER_SHIFT, LookaheadPredictor, ModelView, cap, decode, encode, make_predictor
from .prediction.lookahead import RankingRouter
from .layer_math import layer_forward
from .registry import (  # noqa: F401 - the registry's names stay importable from here
    _ATTR,
    _ENGINES,
    _LOCK,
    _attached,
    _ident,
    _tensor_store_type,
    attach_store,
    attached_store,
    engine_for_store,
    engine_for_tensor,
    engines_for_module,
    get_engine,
    register_engine,
    unregister_engine,
)
from .stats import RuntimeStats

__all__ = ["ExpertEngine", "LAYER_SHIFT", "get_engine", "engine_for_tensor", "engines_for_module",
           "attach_store", "attached_store", "engine_for_store"]

log = logging.getLogger("expertflow_compile")


def _spans(offsets: torch.Tensor, num_pairs: int, layer: int, num_experts: int):
    """``(active experts, their row spans)`` from the permute op's offsets: the one host transfer."""
    offs = offsets.tolist()
    if offs[-1] != num_pairs:
        raise RuntimeError(f"expertflow: MoE layer {layer} got expert ids outside [0, {num_experts}) "
                           f"({num_pairs - offs[-1]} of {num_pairs} (token, k) pairs); refusing "
                           "to drop them silently")
    active, spans = [], []
    for e, (a, b) in enumerate(zip(offs, offs[1:])):
        if b > a:
            active.append(e)
            spans.append((a, b))
    return active, spans


_HOST_ROUTE_MAX = 1024   # (token, k) pairs up to which routing is grouped on the host (routed_experts)


def _host_route(topk_ids: torch.Tensor, layer: int, num_experts: int):
    """``(active experts, their row spans, pair order)`` from the router's ids, grouped on the
    host: the same stable order ``permute`` gives (pairs by expert, in pair order within one)."""
    flat = topk_ids.reshape(-1).tolist()
    buckets: dict[int, list[int]] = {}
    for i, e in enumerate(flat):
        b = buckets.get(e)
        if b is None:
            buckets[e] = [i]
        else:
            b.append(i)
    active = sorted(buckets)
    if active and (active[0] < 0 or active[-1] >= num_experts):
        bad = sum(len(v) for e, v in buckets.items() if not 0 <= e < num_experts)
        raise RuntimeError(f"expertflow: MoE layer {layer} got expert ids outside [0, {num_experts}) "
                           f"({bad} of {len(flat)} (token, k) pairs); refusing to drop them silently")
    pairs: list[int] = []
    spans = []
    for e in active:
        a = len(pairs)
        pairs += buckets[e]
        spans.append((a, len(pairs)))
    return active, spans, pairs


def _signature(t):
    """What identifies a weight tensor's memory (its views stay valid while it lives)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):      # an ExpertList: its tensors
        return tuple(_signature(x) for x in t.tensors)
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


class ExpertEngine:
    """Runtime state of one compiled model (see module docstring)."""

    def __init__(self, config: ExpertFlowConfig):
        self.config = config
        self.layers: dict[int, LayerPlan] = {}
        self.stats = RuntimeStats()
        self.cache = None            # an ExpertCache when offloading
        self.store = None            # the host tier when offloading
        self.predictor = None        # a plug-in predictor (path / oracle); lookahead is built in
        self.graph_reports: list = []
        self._layer_tensors: dict[int, dict[str, torch.Tensor]] = {}
        self.routers: dict[int, tuple] = {}
        self.rankers: dict[int, object] = {}      # layer -> RankingRouter (the routers' order, fewer ops)
        self._kinds: dict = {}
        # recorder(kind, layer, *tensors): kind "route" -> (ids [T, K], weights [T, K]) at each
        # grouped_gemm; kind "lookahead" -> (router logits [T, E] of `layer` applied to the
        # residual stream before its attention). Set by record_routing.
        self.recorder = None
        self._lookahead = LookaheadPredictor()
        self._view: ModelView | None = None
        self._handoff: dict[int, tuple] = {}      # layer -> (codes tensor, predictions): predict -> prefetch
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next call
        self.prediction = {"true_positive": 0, "predicted": 0, "used": 0}
        self._cache_layers: tuple[int, ...] = ()
        self._views_of: dict[int, tuple] = {}     # layer -> (weights, per-expert views)
        self._inline_prefetch = False             # prefetches read at the prefetch op (build_cache)
        self._closed = False
        self.id = register_engine(self)

    # ----- registration -------------------------------------------------------------
    def register_layer(self, plan: LayerPlan, tensors: list[torch.Tensor]) -> None:
        """Add a rewritten layer and tie its weight tensors to this engine."""
        self.layers[plan.layer] = plan
        self._view = None
        up, down, b_up, b_down, up2 = (list(tensors) + [None] * 5)[:5]
        self._layer_tensors[plan.layer] = {
            k: v for k, v in (("up", up), ("down", down), ("up_bias", b_up), ("down_bias", b_down), ("up2", up2))
            if v is not None
        }
        for t in tensors:
            for x in (getattr(t, "tensors", None) or [t]):   # an ExpertList: each expert's tensor
                if x is not None:
                    setattr(x, _ATTR, self)   # the model owns its engine (and so its cache thread)

    def register_router(self, layer: int, fn, params: list[torch.Tensor], ranking=None) -> None:
        """Layer ``layer``'s router chain, ``fn(h, *params) -> logits``, applicable to the
        residual stream before its attention (used by the lookahead predictor). A module's
        ``forward`` is kept (called per layer call: the module call machinery costs more than
        a decode step's router). ``ranking``: the chain's ranking form (``weight``, ``scale``,
        ``hidden``: compiler/passes/router_rank.py), from which a
        :class:`~.prediction.lookahead.RankingRouter` ranks the experts in its place."""
        if isinstance(fn, torch.nn.Module) and not (fn._forward_hooks or fn._forward_pre_hooks):
            fn = fn.forward
        self.routers[layer] = (fn, params)
        ranker = None if ranking is None or not self.config.lookahead_ranking else RankingRouter.build(
            params, ranking.weight, ranking.scale, ranking.hidden)
        if ranker is None:
            self.rankers.pop(layer, None)
        else:
            self.rankers[layer] = ranker
        self._view = None

    def view(self) -> ModelView:
        """The model as predictors see it (rebuilt when layers or routers change)."""
        v = self._view
        if v is None:
            order = tuple(sorted(self.layers))
            v = self._view = ModelView(
                order=order, num_experts={l: self.layers[l].num_experts for l in order},
                top_k={l: self.layers[l].top_k for l in order}, depth=self.config.lookahead_depth,
                extra=self.config.prefetch_extra, routers=dict(self.routers),
                rankers=dict(self.rankers))
        return v

    # ----- prediction ---------------------------------------------------------------
    def predict(self, layer: int, hidden: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.full((width,), -1, dtype=torch.int64, device=hidden.device)
        if self.predictor is None and self.recorder is None and self.config.predictor != "lookahead":
            self._handoff[layer] = (out, ())
            return out
        preds = cap(self._predictions(layer, hidden), width)
        if not preds:
            self._handoff[layer] = (out, ())
            return out
        for r in preds:
            self._predicted[r.layer] = set(r.experts)
        codes = encode(preds, width)
        if codes:
            src = torch.tensor(codes, dtype=torch.int64)
            if out.is_cuda:   # no host sync: a pinned copy, asynchronous
                out[:len(codes)].copy_(src.pin_memory(), non_blocking=True)
            else:
                out[:len(codes)] = src
        self._handoff[layer] = (out, preds)
        return out

    def _predictions(self, layer: int, hidden: torch.Tensor):
        view = self.view()
        if self.predictor is not None:        # a plug-in: path / oracle (runtime/prediction)
            return self.predictor.predict(view, layer, hidden)
        rec = self.recorder
        if self.config.predictor == "lookahead" or rec is not None:
            hook = None if rec is None else (lambda l, logits: rec("lookahead", l, logits))
            preds = self._lookahead.predict(view, layer, hidden, on_logits=hook)
            if self.config.predictor == "lookahead":
                return preds
        return []

    def predict_and_prefetch(self, layer: int, hidden: torch.Tensor, width: int) -> None:
        """``prefetch(predict(...))`` without the codes tensor between them (what a graph
        run eagerly calls: nothing reads the codes there)."""
        if self.predictor is None and self.recorder is None and self.config.predictor != "lookahead":
            return
        preds = cap(self._predictions(layer, hidden), width)
        for r in preds:
            self._predicted[r.layer] = set(r.experts)
        if self.cache is not None and preds:
            self._prefetch_ranked(layer, preds)

    def prefetch(self, layer: int, predicted: torch.Tensor) -> None:
        handoff = self._handoff.pop(layer, None)
        if self.cache is None:
            return
        if handoff is not None and handoff[0] is predicted:
            preds = handoff[1]
        else:                                  # not the predict op's own tensor: read the codes
            preds = decode(predicted.tolist())
        self._prefetch_ranked(layer, preds)

    def _prefetch_ranked(self, layer: int, preds) -> None:
        gate = self.config.prefetch_min_precision if self.config.policy == "predictive" else None
        for r in preds:
            plan = self.layers.get(r.layer)
            if plan is None or not r.experts:
                continue
            n = plan.num_experts           # a router may score more (identity experts)
            experts = r.experts if max(r.experts) < n else [x for x in r.experts if x < n]
            if gate is None:
                self.cache.prefetch(r.layer, experts)
            elif r.layer == layer:         # the layer about to run: the previous one is done; spare what it frees
                self.cache.prefetch(layer, experts, harm_limit=len(self.layers), min_precision=gate, enter=True)
            else:
                self.cache.prefetch(r.layer, experts, min_precision=gate)
        if self._inline_prefetch:
            self.cache.run_prefetches()

    # ----- layers -------------------------------------------------------------------
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
        return self.adopt(self.layers[layer], [w_up, w_down, b_up, b_down, w_up2])

    def adopt(self, template: LayerPlan, tensors: list) -> int:
        """Bind the experts ``tensors`` (up, down, up bias, down bias, second up) as a layer
        of this engine, computed like ``template`` (the plan of the graph block they reached);
        returns its layer number: the loader's layer index attached to the tensors, else the
        template's number if free, else the next free one. The cache follows the new layer."""
        w_up = tensors[0]
        entry = _attached(_ident(w_up))
        if entry is not None and entry[2] is not None:
            new = entry[2]
        elif template.layer not in self._layer_tensors:
            new = template.layer
        else:
            new = max(self._layer_tensors) + 1
        if new in self._layer_tensors:
            raise RuntimeError(f"expertflow: experts of MoE layer {new} arrived twice with different tensors")
        self.register_layer(dataclasses.replace(template, layer=new), (list(tensors) + [None] * 5)[:5])
        if self.cache is not None:
            log.info("expertflow: a compiled graph is shared by another MoE module; bound it as layer %d", new)
            from .host_tensors import StackedTensorStore

            own = isinstance(self.store, (_tensor_store_type(), StackedTensorStore))
            self.build_cache(None if own else self.store)
        else:
            self.on_graph_compiled({})
        return new

    # ----- the grouped GEMM -----------------------------------------------------------
    def grouped_gemm(self, layer, hidden, topk_weights, order, offsets, w_up, w_down, b_up, b_down, w_up2=None,
                     up_list=None, down_list=None):
        """The ``grouped_gemm`` op: routing already permuted (``order``/``offsets`` of ``permute``)."""
        layer, plan, w = self._layer_weights(layer, w_up, w_down, b_up, b_down, w_up2, up_list, down_list)
        active, spans = _spans(offsets, order.numel(), layer, plan.num_experts)
        return self._experts(plan, hidden, topk_weights, order, offsets, active, spans, None, w,
                             up_list is not None or down_list is not None)

    def routed_experts(self, layer, hidden, topk_weights, topk_ids, w_up, w_down, b_up, b_down, w_up2=None,
                       up_list=None, down_list=None):
        """``permute`` and ``grouped_gemm`` in one call, from the router's ``topk_ids`` [T, K]:
        for a small call (decode) the grouping by expert is done on the host from the ids (the
        one host transfer), with the same stable order as ``permute``; large calls and the
        fused kernels take ``permute``'s tensors."""
        layer, plan, w = self._layer_weights(layer, w_up, w_down, b_up, b_down, w_up2, up_list, down_list)
        lists = up_list is not None or down_list is not None
        if topk_ids.numel() > _HOST_ROUTE_MAX or (self.config.kernels != "torch" and (
                hidden.is_cuda or self.config.kernels == "triton")):
            order, offsets = permute_math(topk_ids, plan.num_experts)
            active, spans = _spans(offsets, order.numel(), layer, plan.num_experts)
            return self._experts(plan, hidden, topk_weights, order, offsets, active, spans, None, w, lists)
        active, spans, pairs = _host_route(topk_ids, layer, plan.num_experts)
        return self._experts(plan, hidden, topk_weights, None, None, active, spans, (pairs, topk_ids), w, lists)

    def _layer_weights(self, layer, w_up, w_down, b_up, b_down, w_up2, up_list, down_list):
        """``(layer, plan, (up, down, up bias, down bias, up2))``: the layer these experts are
        (module docstring of ``_resolve_layer``), its weights viewed per expert."""
        if up_list is not None:     # ModuleDict experts: one tensor per expert
            w_up = ExpertList(up_list)
        if down_list is not None:
            w_down = ExpertList(down_list)
        known = self._layer_tensors.get(layer)
        if known is None or known.get("up") is not w_up:
            layer = self._resolve_layer(layer, w_up, w_down, b_up, b_down, w_up2)
        plan = self.layers[layer]
        if plan.views:
            w_up, w_down, w_up2 = plan.viewed("up", w_up), plan.viewed("down", w_down), plan.viewed("up2", w_up2)
        return layer, plan, (w_up, w_down, b_up, b_down, w_up2)

    def _experts(self, plan, hidden, topk_weights, order, offsets, active, spans, host, w, lists):
        """The layer call once its routing is grouped by expert: ``active`` experts, ``spans``
        (their row ranges), and either ``order``/``offsets`` (tensors of ``permute``) or
        ``host = (order as a list, topk_ids)`` (grouped on the host)."""
        layer = plan.layer
        w_up, w_down, b_up, b_down, w_up2 = w
        top_k = topk_weights.shape[-1]
        if self.recorder is not None:
            if host is not None:
                ids = host[1].reshape(-1, top_k).to("cpu", torch.int64, copy=True)
            else:
                ids = torch.empty(order.numel(), dtype=torch.int64)
                for e, (a, b) in zip(active, spans):
                    ids[order[a:b]] = e
                ids = ids.view(-1, top_k)
            self.recorder("route", layer, ids, topk_weights.detach().float())
        predicted = self._predicted.pop(layer, None) if self._predicted else None
        if predicted is not None:
            p = self.prediction
            p["true_positive"] += len(predicted.intersection(active))
            p["predicted"] += len(predicted)
            p["used"] += len(active)
            if self.cache is not None:    # the router decided: score the prediction, demote wrong prefetches
                self.cache.enter_layer(layer, routed=active)
        if offsets is not None and not (plan.math.prescale or plan.has_up2 or lists):
            # (grouped on the host: routed_experts sends every call the kernels may take here)
            fused = self._triton(plan, hidden, topk_weights, order, offsets, active, w_up, w_down, b_up, b_down)
            if fused is not None:
                return fused
        inverse = None
        if host is not None:
            pairs = host[0]
            dev = hidden.device
            inv = [0] * len(pairs)
            for j, i in enumerate(pairs):
                inv[i] = j
            inverse = torch.tensor(inv, dtype=torch.int64, device=dev)
            rows = hidden.index_select(0, torch.tensor([i // top_k for i in pairs], dtype=torch.int64, device=dev))
            if plan.math.prescale:
                order = torch.tensor(pairs, dtype=torch.int64, device=dev)
        else:
            rows = hidden[order // top_k]
        if plan.math.prescale:
            rows = prescale_rows(rows, topk_weights, order)
        if not active:
            out_rows = rows.new_zeros((0, plan.out_features), dtype=plan.rows_dtype)
        elif self.cache is None:
            self.stats.add(layer, hits=len(active), resident=len(active))
            per = self._resident_views(plan, w_up, w_down, b_up, b_down, w_up2)
            out_rows = layer_forward(rows, spans, [per[e] for e in active], plan.math)
        else:
            out_rows = self._cached_experts(plan, active, spans, rows)
        if out_rows.dtype != plan.rows_dtype:
            out_rows = out_rows.to(plan.rows_dtype)
        weights = torch.ones_like(topk_weights) if plan.math.prescale else topk_weights
        if inverse is not None:
            return combine_topk_inverse(out_rows, weights, inverse, hidden.dtype)
        return combine_topk(out_rows, weights, order, hidden.dtype)

    def _resident_views(self, plan, w_up, w_down, b_up, b_down, w_up2) -> list:
        """Per expert ``{name: tensor}`` of the model's own weights (made once per layer)."""
        key = tuple(_signature(t) for t in (w_up, w_down, b_up, b_down, w_up2))
        hit = self._views_of.get(plan.layer)
        if hit is not None and hit[0] == key:
            return hit[1]
        per = [{"up": w_up[e], "down": w_down[e],
                "up_bias": b_up[e] if b_up is not None else None,
                "down_bias": b_down[e] if b_down is not None else None,
                "up2": w_up2[e] if w_up2 is not None else None} for e in range(plan.num_experts)]
        self._views_of[plan.layer] = (key, per)
        return per

    def _cached_experts(self, plan, active, spans, rows) -> torch.Tensor:
        """One cache call for the layer: every expert held until the layer's math is issued;
        when the slots cannot hold them all, in chunks, one expert at a time."""
        first = self.config.resident_first   # False: measurement baseline, expert-id order, loads on demand
        lease = self.cache.acquire_layer(plan.layer, active, resident_first=first, loads="issue" if first else "lazy")
        try:
            if lease.chunked:
                parts: list = [None] * len(active)
                index = {e: i for i, e in enumerate(active)}
                for e, weights in lease:
                    a, b = spans[index[e]]
                    parts[index[e]] = expert_forward(rows[a:b], weights, plan.math)
                return torch.cat(parts)
            views = lease.wait_all()
            return layer_forward(rows, spans, [views[e] for e in active], plan.math)
        finally:
            lease.release()

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
        if self.store is not None and self.store.specs[plan.layer].quantized:
            return None    # compressed experts: dequantized by the torch path (kernels/dequant.py)
        from ..kernels.triton_moe import triton_grouped_experts

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
            self.stats.add(plan.layer, hits=len(active), resident=len(active))
            return triton_grouped_experts(hidden, ids, topk_weights, w_up, w_down, b_up, b_down, **args)
        cache = self.cache
        if len(active) > cache.num_slots:   # cannot hold them all at once: per-expert torch path
            return None
        lease = cache.acquire_layer(plan.layer, active, all_at_once=True)
        try:
            lease.wait_all()
            tables = cache.pool.triton_tables(plan.layer, up_transposed=plan.math.up_transposed,
                                              down_transposed=plan.math.down_transposed)
            # the slot table row (on the device for CUDA); the slots stay put until the kernels
            # have read them: release() records an event that a slot's refill waits on
            return triton_grouped_experts(hidden, ids, topk_weights, **tables, slot_of_expert=cache.slot_row(plan.layer),
                                          **args)
        finally:
            lease.release()

    # ----- stats --------------------------------------------------------------------
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

    # ----- the cache ------------------------------------------------------------------
    def on_graph_compiled(self, placeholder_values: dict) -> None:
        """Called after each graph of the model is rewritten: (re)build the expert cache
        when a budget is set and the engine now knows layers the cache does not."""
        if self.config.predictor in ("path", "oracle") and self.predictor is None:
            self.predictor = make_predictor(self.config, self.view())
        if not self.layers or tuple(sorted(self.layers)) == self._cache_layers:
            return
        stores = (attached_store(_ident(t.get("up"))) for t in self._layer_tensors.values())
        store = next((s for s in stores if s is not None), None)   # ExpertList: keyed by its first tensor
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
        from .host_tensors import StackedTensorStore
        from .store import TensorExpertStore

        if self.cache is not None:
            self.cache.close()
        if store is not None:
            self.store = store
        elif self.store is None or isinstance(self.store, (TensorExpertStore, StackedTensorStore)):
            layers = {   # rows past E (identity experts' up rows) never run
                l: {k: self.layers[l].viewed(k, v)[:self.layers[l].num_experts] for k, v in t.items()}
                for l, t in sorted(self._layer_tensors.items())}
            plain = all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for t in layers.values()
                        for v in t.values())
            # plain CPU tensors: a store that fills a layer call's slots in one call
            self.store = StackedTensorStore(layers) if plain else TensorExpertStore(layers)
        budget = parse_budget(self.config.expert_budget)
        slots = budget.resolve_slots(self.store.specs, self.min_resident_experts())
        any_up = next(iter(self._layer_tensors.values()), {}).get("up")
        device = any_up.device if any_up is not None and any_up.device.type != "meta" else torch.device("cpu")
        # A CPU cache over a host tier in RAM: a prefetch is a RAM copy, which a worker thread
        # cannot overlap with anything (one thread computes; the hand-off and the GIL cost more
        # than the copy), so prefetches are read on the calling thread at the prefetch op -
        # before the layer they are for, as the worker would. Other stores (files, wrappers
        # such as an emulated link) and CUDA keep the worker.
        inline = (bool(self.config.prefetch) and device.type == "cpu"
                  and type(self.store) in (StackedTensorStore, TensorExpertStore))
        self.cache = ExpertCache(self.store, slots, policy=self.config.policy, device=device,
                                 prefetch="deferred" if inline else self.config.prefetch, stats=self.stats)
        self._inline_prefetch = inline
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
        unregister_engine(self.id)
        for tensors in self._layer_tensors.values():
            for t in tensors.values():
                for x in (getattr(t, "tensors", None) or [t]):   # an ExpertList: each expert's tensor
                    if getattr(x, _ATTR, None) is self:
                        delattr(x, _ATTR)
