"""The ground floor's shared rules about names (expertflow_compile/layer.py): which layer
a module or parameter name belongs to, and which module a compiled model wraps."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from expertflow_compile.layer import ExpertList, layer_index, unwrap_compiled

PREFIXES = st.lists(st.sampled_from(["model", "transformer", "decoder", "encoder", "language_model"]), max_size=3)
WORDS = st.sampled_from(["layers", "layer", "blocks", "block", "h"])
SUFFIXES = st.lists(st.sampled_from(["mlp", "moe", "experts", "block_sparse_moe", "feed_forward"]), min_size=1,
                    max_size=3)


def _dynamo_name(path: list[str], param: str) -> str:
    """How Dynamo names the placeholder of parameter ``param`` of module ``path``."""
    return "L_self_" + "".join(f"modules_{p}_" for p in path) + f"parameters_{param}_"


@given(prefix=PREFIXES, word=WORDS, n=st.integers(0, 200), suffix=SUFFIXES)
def test_the_layer_number_of_a_module_path_and_of_its_placeholder(prefix, word, n, suffix):
    path = [*prefix, word, str(n), *suffix]
    assert layer_index(".".join(path)) == n
    assert layer_index(".".join(path) + ".gate_up_proj") == n
    assert layer_index(_dynamo_name(path, "gate_up_proj")) == n
    assert layer_index(f"L['self']." + ".".join(path)) == n   # Dynamo's module-scope paths


@given(prefix=PREFIXES, suffix=SUFFIXES)
def test_no_number_no_layer(prefix, suffix):
    path = [*prefix, *suffix]
    assert layer_index(".".join(path)) is None and layer_index(_dynamo_name(path, "w1")) is None


def test_the_first_name_with_a_number_and_the_leftmost_stack_index_win():
    assert layer_index("", "model.layers.4.mlp") == 4
    assert layer_index("L_self_modules_layers_modules_2_modules_experts_parameters_up_", "model.layers.9.x") == 2
    # T5-style stacks (Switch Transformers): the block index, not the sub-layer index
    assert layer_index("encoder.block.3.layer.1.mlp.experts") == 3
    assert layer_index("model.moe_stack.5.experts") == 5     # any module-list index as the last resort


def test_unwrap_compiled():
    module = torch.nn.Linear(2, 2)
    compiled = torch.compile(module, backend="eager")
    assert unwrap_compiled(compiled) is module and unwrap_compiled(module) is module


def test_an_expert_list_refuses_mixed_experts():
    good = ExpertList([torch.zeros(3, 2), torch.ones(3, 2)])
    assert good.shape == (2, 3, 2) and good.dim() == 3 and good[1].sum() == 6
    try:
        ExpertList([torch.zeros(3, 2), torch.zeros(2, 3)])
    except ValueError as exc:
        assert "expert 1" in str(exc)
    else:
        raise AssertionError("mixed expert shapes were accepted")
