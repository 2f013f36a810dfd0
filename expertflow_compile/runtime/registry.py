"""Which engine serves which model: one rule, keyed by the experts' own tensors.

**The rule.** The engine serving a MoE layer is the one its expert weight tensors hold
(attribute ``_expertflow_engine``, set when the engine registers the layer). Nothing
else identifies a model: not the options dict it was compiled with, not an ``id()``,
not the integer baked into a graph. Because the tensors own their engine, the engine
(its cache thread, its store, its open files) ends with the model: ``del model;
gc.collect()`` leaves nothing here (the registry holds engines and graphs weakly).

**Graphs outlive models.** Dynamo keeps compiled graphs in its cache until
``torch._dynamo.reset()`` and reuses one for any model whose call passes its guards:
a second model of the same class, compiled with equal options, runs the first model's
graph (Dynamo guards parameters by shape, not identity). So the integer a graph's ops
carry names a :class:`GraphBinding` (the graph's recipe: its config and the
:class:`LayerPlan` of each block; held by the compiled graph, weakly here), and the ops
find the engine from the tensors they receive (:func:`serving_engine`):

1. the tensors' own engine;
2. else, for experts a loader left on disk (:func:`attach_store`), the open engine
   reading that store, or a new one;
3. else the engine the graph served last, when the experts are another module of the
   same model (a graph holding one MoE block, run once per decoder layer after a graph
   break), or a new engine, when that engine already has the block's layer (a graph
   holding the whole model, run for another model).

Rule 3's one ambiguity: a graph holding a single MoE block, reused for another
in-memory model, binds that model's experts into the first model's engine (as further
layers). Models with more than one MoE layer per graph and ``from_pretrained`` models
(rule 2) are never mixed.

``predict``/``prefetch`` receive no expert tensors: they go to the engine the graph
served last (:func:`get_engine`); a prediction is a hint, so the worst a reused graph
can do there is prefetch for the wrong model once. This module imports nothing of the
engine (no import circle); ``runtime.engine`` re-exports its names.
"""

from __future__ import annotations

import gc
import itertools
import threading
import weakref

import torch

from ..layer import ExpertList
from .store import TensorExpertStore

__all__ = ["attach_store", "attached_store", "engine_for_store", "get_engine", "engine_for_tensor",
           "engines_for_module", "GraphBinding", "serving_engine"]

_ENGINES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_BINDINGS: "weakref.WeakValueDictionary[int, GraphBinding]" = weakref.WeakValueDictionary()
_ATTR = "_expertflow_engine"
_STORE_ATTR = "_expertflow_store"
_IDS = itertools.count(1)
_LOCK = threading.RLock()   # re-entered: a binding makes an engine, which registers itself


def attach_store(tensor: torch.Tensor, store, layer: int | None = None) -> None:
    """Declare that the experts behind ``tensor`` (an expert weight of a model, usually a
    zero-stride placeholder) live in ``store`` (e.g. a SafetensorsExpertStore) as the
    store's MoE layer ``layer``: the engine built when the model is compiled uses it as
    its host tier. The tensor holds the store (nothing here does): both end with it."""
    setattr(tensor, _STORE_ATTR, (store, layer))


def _attached(tensor: torch.Tensor | None):
    """``(tensor, store, layer)`` for a tensor given to :func:`attach_store`, else None."""
    entry = getattr(tensor, _STORE_ATTR, None) if isinstance(tensor, torch.Tensor) else None
    return None if entry is None else (tensor, entry[0], entry[1])


def attached_store(tensor: torch.Tensor | None):
    entry = _attached(tensor)
    return None if entry is None else entry[1]


def _tensor_store_type():
    return TensorExpertStore


def engine_for_store(store, config_key=None):
    """The open engine reading its experts from ``store`` (a loader's disk tier); with
    ``config_key``, only one compiled with those options."""
    with _LOCK:
        engines = list(_ENGINES.values())
    return next((e for e in engines if not e._closed and e.store is store
                 and (config_key is None or e.config.key() == config_key)), None)


def get_engine(engine_id: int):
    """The engine behind the id a graph's ops carry: the engine graph ``engine_id`` served
    last (None when the graph outlived every model it served and has met no new one yet),
    or the engine ``engine_id`` itself (ops called directly, without a graph)."""
    binding = _BINDINGS.get(engine_id)
    if binding is not None:
        return binding.current()
    eng = _ENGINES.get(engine_id)
    if eng is not None and not eng._closed:
        return eng
    raise RuntimeError(f"expertflow engine {engine_id} no longer exists (its model was deleted "
                       "or reset); recompile the model")


def _ident(t):
    """The tensor that identifies a layer's expert weights (the first of an ExpertList)."""
    return t.tensors[0] if isinstance(t, ExpertList) else t


def engine_for_tensor(t: torch.Tensor | None):
    """The engine serving the expert weight tensor ``t`` (None if there is none)."""
    t = _ident(t)
    eng = getattr(t, _ATTR, None) if t is not None else None
    return eng if eng is not None and not eng._closed else None


def engines_for_module(module: torch.nn.Module) -> list:
    """Every engine serving a parameter of ``module`` (each once, in discovery order)."""
    found: dict[int, object] = {}
    for p in itertools.chain(module.parameters(), module.buffers()):
        eng = engine_for_tensor(p)
        if eng is not None:
            found.setdefault(eng.id, eng)
    return list(found.values())


def register_engine(engine) -> int:
    """A new id for ``engine`` (held weakly); ids are never reused."""
    engine_id = next(_IDS)
    with _LOCK:
        _ENGINES[engine_id] = engine
    return engine_id


def unregister_engine(engine_id: int) -> None:
    with _LOCK:
        _ENGINES.pop(engine_id, None)


class GraphBinding:
    """The recipe of one rewritten graph: what an engine needs to serve the graph's MoE
    blocks for any model whose experts reach it. Holds no tensor (a model's weights never
    outlive it through a graph); the compiled graph holds the binding."""

    def __init__(self, engine):
        self.id = next(_IDS)             # the integer the graph's ops carry (never an engine's)
        self.config = engine.config
        self.plans: dict[int, object] = {}   # baked layer number -> LayerPlan
        self._factory = type(engine)
        self._current = weakref.ref(engine)
        with _LOCK:
            _BINDINGS[self.id] = self

    def add(self, plan) -> None:
        self.plans[plan.layer] = plan

    def current(self):
        eng = self._current()
        return eng if eng is not None and not eng._closed else None

    def serve(self, layer: int, tensors: list):
        """The engine for the experts ``tensors`` reaching block ``layer`` (rules 1-3 of the
        module docstring); a new engine is made from this recipe when none is theirs."""
        w_up = _ident(tensors[0])
        eng = engine_for_tensor(w_up)
        if eng is None:
            with _LOCK:
                eng = engine_for_tensor(w_up)   # another thread may have bound them meanwhile
                if eng is None:
                    eng = self._choose(layer, w_up)
                    eng.adopt(self.plans[layer], tensors)
        self._current = weakref.ref(eng)
        return eng

    def _choose(self, layer: int, w_up):
        store = attached_store(w_up)
        if store is not None:
            eng = engine_for_store(store, self.config.key())
        else:
            eng = self.current()
            if eng is not None and len(self.plans) > 1 and layer in eng.layers:
                eng = None   # a whole-model graph meeting another model's experts
            elif eng is not None:   # joining: not the engine of a model deleted but not collected yet
                eng = None
                gc.collect()
                eng = self.current()
        return eng if eng is not None else self._factory(self.config)


def serving_engine(engine_id: int, layer: int, tensors: list):
    """The engine that serves block ``layer`` of graph ``engine_id`` for the expert
    ``tensors`` (up, down, ...) the op received (see the module docstring)."""
    eng = engine_for_tensor(tensors[0])
    if eng is not None:
        binding = _BINDINGS.get(engine_id)
        if binding is not None and binding._current() is not eng:
            binding._current = weakref.ref(eng)
        return eng
    binding = _BINDINGS.get(engine_id)
    if binding is not None:
        return binding.serve(layer, tensors)
    return get_engine(engine_id)   # an engine used without a graph (ops called directly)
