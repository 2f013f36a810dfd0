"""Replace each matched dispatch region with predict -> prefetch -> permute -> grouped_gemm.

``rewrite_moe_block(gm, block, engine_id, width)`` edits ``gm`` in place:

* ``predict`` + ``prefetch`` are inserted right after the block's hidden states are
  computed (ahead of the routing), so loads are issued as early as the graph allows;
* ``permute`` + ``grouped_gemm`` are inserted where the combined expert output was;
  ``grouped_gemm`` consumes prefetch's token, so dead-code elimination keeps it;
* the old dispatch region is erased, then whatever only it used.

Every new node gets a ``meta["val"]``/``meta["example_value"]`` from the ops' fake
implementations. Routing nodes are never touched.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.expertflow.*)
from .fx_utils import node_value
from .match import MoEBlock, _order

__all__ = ["rewrite_moe_block", "erase_dead_inputs"]


def _set_meta(node: fx.Node, fake_mode) -> None:
    def val(a):
        return node_value(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, val)
    if any(node_value(a) is None for a in node.all_input_nodes):
        return
    fakes = [node_value(a) for a in node.all_input_nodes]
    fake_mode = next((getattr(v, "fake_mode", None) for v in fakes if getattr(v, "fake_mode", None)), None)
    if fake_mode is None:
        return
    with fake_mode:
        out = node.target(*args)
    node.meta["val"] = out
    node.meta["example_value"] = out


def rewrite_moe_block(gm: fx.GraphModule, block: MoEBlock, engine_id: int, width: int,
                      predict_from: fx.Node | None = None) -> fx.Node:
    """Rewrite one block; returns the new ``grouped_gemm`` node.

    ``predict_from`` is where the prediction for this block is made (the residual
    stream before the block's attention, see ``lookahead.py``); default: the block's
    own hidden state.
    """
    graph = gm.graph
    source = predict_from if predict_from is not None else block.hidden
    fake_mode = None
    meta_stack = block.output.meta.get("nn_module_stack")

    if source.op == "placeholder":
        where = graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder"))
    else:
        where = graph.inserting_after(source)
    with where:
        predicted = graph.call_function(torch.ops.expertflow.predict.default, (source, engine_id, block.layer, width))
    with graph.inserting_after(predicted):
        token = graph.call_function(torch.ops.expertflow.prefetch.default, (predicted, engine_id, block.layer))
    with graph.inserting_before(block.output):
        perm = graph.call_function(torch.ops.expertflow.permute.default, (block.topk_ids, block.num_experts))
        order = graph.call_function(operator.getitem, (perm, 0))
        offsets = graph.call_function(operator.getitem, (perm, 1))
        if block.lists:   # one parameter per expert: they go in as lists (the stack is dropped)
            out = graph.call_function(torch.ops.expertflow.grouped_gemm_modules.default, (
                block.hidden, block.topk_weights, order, offsets, token, list(block.lists["up"]),
                list(block.lists["down"]), engine_id, block.layer))
        else:
            args = (block.hidden, block.topk_weights, order, offsets, token, block.up_weight,
                    block.down_weight, block.up_bias, block.down_bias, engine_id, block.layer)
            if block.up2_weight is not None:
                args += (block.up2_weight,)
            out = graph.call_function(torch.ops.expertflow.grouped_gemm.default, args)
    for n in (predicted, token, perm, out):
        _set_meta(n, fake_mode)
        if meta_stack is not None:
            n.meta["nn_module_stack"] = dict(meta_stack)
    for i, n in enumerate((order, offsets)):
        if "val" in perm.meta:
            n.meta["val"] = n.meta["example_value"] = perm.meta["val"][i]
    block.output.replace_all_uses_with(out)

    inputs = {a for n in block.region for a in n.all_input_nodes if a not in block.region}
    for n in sorted(block.region, key=_order, reverse=True):
        if n.users:
            raise RuntimeError(f"expertflow rewrite: {n.name} is still used after the rewrite")
        graph.erase_node(n)
    erase_dead_inputs(graph, inputs)
    return out


def erase_dead_inputs(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase nodes in ``candidates`` (and then their inputs) that nothing uses any more
    and that have no side effects. Placeholders always stay (they are the graph's
    calling convention)."""
    work = list(candidates)
    while work:
        n = work.pop()
        if n.graph is not graph or n.users or n.op in ("placeholder", "output"):
            continue
        if n.is_impure():
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        work.extend(inputs)
