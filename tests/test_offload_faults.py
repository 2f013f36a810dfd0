"""Faults and lifecycle of the offloading runtime, end to end through a model."""

import gc
import inspect
import logging
import threading

import pytest
import torch

import expertflow_compile as ef
from expertflow_compile.runtime.engine import engines_for_module
from expertflow_compile.runtime.store import ExpertStore, FaultInjectingStore
from expertflow_compile.testing.tiny_models import build_tiny_model

from helpers import assert_fp32_close


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


class _InterruptOnce(ExpertStore):
    """Raises KeyboardInterrupt in the first read the calling (main) thread makes from
    ``where`` (a cache method: ``_load_batch`` reads a layer call's misses, ``_load_held`` a
    queued prefetch the caller took over); the prefetch worker's reads wait on ``gate`` (so
    its queued prefetches stay queued and the caller takes them over)."""

    def __init__(self, inner, where, gate=None):
        self.inner, self.specs, self.where, self.gate = inner, inner.specs, where, gate
        self.fired = False

    def read_into(self, layer, expert, out):
        if threading.current_thread().name.startswith("expertflow"):
            if self.gate is not None:
                assert self.gate.wait(30)
        elif not self.fired and self.where in {f.function for f in inspect.stack()[1:6]}:
            self.fired = True
            raise KeyboardInterrupt
        self.inner.read_into(layer, expert, out)


@pytest.mark.parametrize("mode", ["prefetch-off", "takeover"])
def test_keyboard_interrupt_in_a_load_propagates_and_the_next_call_is_exact(mode):
    model = build_tiny_model("mixtral", num_layers=2, seed=3)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = model.generate(x, max_new_tokens=6, do_sample=False)
    opts = {"expert_budget": "25%", "prefetch": mode != "prefetch-off"}
    if mode == "takeover":
        opts["predictor"] = "lookahead"
    model.compile(backend="expertflow", options=opts)
    with torch.no_grad():
        model(x)
    (engine,) = engines_for_module(model)
    gate = threading.Event() if mode == "takeover" else None
    engine.build_cache(_InterruptOnce(engine.store, "_load_held" if mode == "takeover" else "_load_batch", gate))
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(x, max_new_tokens=6, do_sample=False)
    finally:
        if gate is not None:
            gate.set()
    cache = engine.cache
    assert cache.pinned() == 0 and cache.wait_idle(10)
    cache.check_consistency()
    assert cache.stats.prefetch_failed == 0            # not logged as a failed prefetch
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), ref)


def test_threads_share_one_model_at_the_minimum_budget():
    # 2 slots for 2 layers x 8 experts, top-2: four threads' forward passes take turns for slots
    model = build_tiny_model("mixtral", num_layers=2, seed=5)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 128, (1, 6), generator=g) for _ in range(4)]
    with torch.no_grad():
        refs = [model(x).logits for x in xs]
    model.compile(backend="expertflow", options={"expert_budget": "12.5%"})
    with torch.no_grad():
        model(xs[0])                                   # compile once, before the threads
    (engine,) = engines_for_module(model)
    assert engine.cache.num_slots == 2
    errors, outs = [], {}

    def run(i):
        try:
            with torch.no_grad():
                outs[i] = [model(xs[i]).logits for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    for i, ref in enumerate(refs):
        for out in outs[i]:
            assert_fp32_close(out, ref)
    assert engine.cache.pinned() == 0
