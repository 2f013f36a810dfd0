"""Which engine serves which model: graph ids, expert tensors and attached stores.

Engines are owned by their model: each expert weight tensor holds its engine in the
attribute ``_expertflow_engine``; ``_ENGINES`` only maps the integer ids baked into graphs
to live engines (weakly). A loader declares with :func:`attach_store` that a model's
experts live in a store (its disk tier). This module imports nothing of the engine, so the
layers below the engine (traces, prediction) can find engines without an import circle;
``runtime.engine`` re-exports every name here.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from .store import ExpertList, TensorExpertStore

__all__ = ["attach_store", "attached_store", "engine_for_store", "get_engine", "engine_for_tensor",
           "engines_for_module"]

_ENGINES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_ATTR = "_expertflow_engine"
_IDS = itertools.count(1)
_LOCK = threading.Lock()

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
    return TensorExpertStore


def engine_for_store(store):
    """The open engine reading its experts from ``store`` (a loader's disk tier)."""
    with _LOCK:
        engines = list(_ENGINES.values())
    return next((e for e in engines if not e._closed and e.store is store), None)


def get_engine(engine_id: int):
    try:
        return _ENGINES[engine_id]
    except KeyError:
        raise RuntimeError(f"expertflow engine {engine_id} no longer exists (its model was deleted "
                           "or reset); recompile the model") from None


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
    """A new graph id for ``engine`` (held weakly)."""
    engine_id = next(_IDS)
    with _LOCK:
        _ENGINES[engine_id] = engine
    return engine_id


def unregister_engine(engine_id: int) -> None:
    with _LOCK:
        _ENGINES.pop(engine_id, None)
