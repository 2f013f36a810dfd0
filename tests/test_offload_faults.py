"""Faults and lifecycle of the offloading runtime, end to end through a model."""

import gc
import logging
import threading

import torch

import expertflow_compile as ef
from expertflow_compile.runtime.engine import engines_for_module
from expertflow_compile.runtime.store import FaultInjectingStore
from expertflow_compile.testing.tiny_models import build_tiny_model


def _prefetch_threads():
    return [t for t in threading.enumerate() if "expertflow" in t.name and t.is_alive()]


def test_io_error_in_prefetch_worker_falls_back_to_demand_load(caplog):
    model = build_tiny_model("mixtral", num_layers=2, seed=2)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = model.generate(x, max_new_tokens=8, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": "25%", "predictor": "lookahead"})
    with torch.no_grad():
        model(x)
    (engine,) = engines_for_module(model)
    faults = {(layer, e) for layer in engine.layers for e in range(8)}   # every prefetch fails
    engine.build_cache(FaultInjectingStore(engine.store, faults, thread_prefix="expertflow"))
    engine.reset_stats()
    with caplog.at_level(logging.ERROR, logger="expertflow_compile"):
        out = model.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    s = ef.stats(model)
    assert s["prefetch_failed"] > 0 and s["misses"] > 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_deleting_the_model_leaves_no_threads():
    model = build_tiny_model("mixtral", num_layers=2)
    model.compile(backend="expertflow", options={"expert_budget": "25%"})
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert _prefetch_threads()
    del model
    torch._dynamo.reset()
    gc.collect()
    for _ in range(50):
        if not _prefetch_threads():
            break
        threading.Event().wait(0.05)
    assert not _prefetch_threads()
