"""Where prefetches run (README, Runtime): a CPU cache over experts in RAM reads them on the
calling thread at the prefetch op (no worker thread), a host tier read from files keeps the
worker thread; either way the tokens equal the uncompiled model's and the prefetched
experts count as speculative loads that were ready when their layer ran."""

from __future__ import annotations

import threading

import pytest
import torch

import expertflow_compile as ef
from expertflow_compile.api import engines_for_module
from expertflow_compile.runtime.cache import WORKER_THREAD_NAME
from expertflow_compile.testing.checkpoints import save_hub_layout
from expertflow_compile.testing.tiny_models import build_tiny_model

OPTIONS = {"expert_budget": "25%", "predictor": "lookahead"}


def _workers() -> int:
    return sum(t.name == WORKER_THREAD_NAME and t.is_alive() for t in threading.enumerate())


def _generate(model, x):
    return model.generate(x, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("tier", ["ram", "files"])
def test_prefetch_placement_and_exactness(tier, tmp_path):
    from transformers import AutoModelForCausalLM

    base = build_tiny_model("mixtral", num_layers=3, seed=11)
    x = torch.randint(0, base.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    if tier == "files":
        save_hub_layout(base, str(tmp_path))
        ref = _generate(AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval(), x)
        model = ef.from_pretrained(str(tmp_path))
    else:
        ref = _generate(base, x)
        model = base
    before = _workers()
    model.compile(backend="expertflow", options=OPTIONS)
    out = _generate(model, x)
    assert torch.equal(out, ref)
    (engine,) = engines_for_module(model)
    cache = engine.cache
    if tier == "ram":
        assert cache._thread is None and cache.prefetching and _workers() == before
    else:
        assert cache._thread is not None and cache._thread.is_alive()
    s = ef.stats(model)
    assert s["speculative_loads"] > 0
    if tier == "ram":   # read at the prefetch op, before the layer: ready, none pending
        assert s["ready_rate"] > s["resident_rate"] and not cache._deferred_items
    cache.check_consistency()
