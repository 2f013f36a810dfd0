"""How the engine numbers MoE layers: the loader's layer index wins (its store is keyed
by it), numbers stay unique within a graph, and a tensor seen before keeps its number."""

import pytest
import torch

from expertflow_compile.config import ExpertFlowConfig
from expertflow_compile.layer import ExpertList, ExpertMath, LayerPlan
from expertflow_compile.runtime.engine import ExpertEngine, attach_store


def _plan(layer):
    return LayerPlan(layer, 4, 2, 8, ExpertMath(False, False, lambda h: h), torch.float32, 8)


def test_loader_layer_index_wins_over_the_graph_number():
    eng = ExpertEngine(ExpertFlowConfig())
    up = torch.zeros(4, 6, 8)
    attach_store(up, store=object(), layer=3)     # e.g. the first MoE layer of a dense-first model
    assert eng.layer_number_for(0, up) == 3
    eng.register_layer(_plan(3), [up, torch.zeros(4, 8, 3)])
    assert eng.layer_number_for(0, up) == 3       # known tensors keep their number
    other = torch.zeros(4, 6, 8)
    attach_store(other, store=object(), layer=3)
    with pytest.raises(RuntimeError, match="arrived twice"):
        eng.layer_number_for(0, other)
    eng.close()


def test_numbers_unique_within_a_graph_and_expert_lists_identified_by_expert_0():
    eng = ExpertEngine(ExpertFlowConfig())
    a, b = torch.zeros(4, 6, 8), torch.zeros(4, 6, 8)
    first = eng.layer_number_for(1, a)
    second = eng.layer_number_for(1, b, reserved=[first])
    assert first == 1 and second != first
    experts = [torch.zeros(6, 8) for _ in range(4)]
    eng.register_layer(_plan(5), [ExpertList(experts), ExpertList([torch.zeros(8, 3)] * 4)])
    assert eng.layer_number_for(0, ExpertList(experts)) == 5   # a new list of the same tensors
    eng.close()
    assert not any(hasattr(t, "_expertflow_engine") for t in experts)   # close() unties every expert
