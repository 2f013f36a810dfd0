"""Lower a rewritten graph for eager execution: direct calls instead of the custom ops.

``lower_for_eager(gm)`` returns a new ``GraphModule`` (sharing ``gm``'s parameters and
submodules; ``gm`` itself is left as the rewrite made it, ops and all, for reports and
tests) in which

* ``prefetch(predict(h, engine, layer, width), engine, layer)`` becomes one call
  :func:`~expertflow_compile.compiler.ops.run_prediction` (when the prediction feeds
  nothing else), and
* ``grouped_gemm(h, w, *permute(ids, E), token, ...)`` (and ``grouped_gemm_modules``)
  becomes one call :func:`~expertflow_compile.compiler.ops.run_routed_experts` taking
  the router's ids (when ``permute``'s outputs feed nothing else),

in the same places, so the graph's order of calls (prefetch issued before the layer's
routing, the layer's experts where the combined output was) is unchanged. These are plain
Python functions doing what the ops do, without the dispatcher's route to a Python op (its
autograd wrapper and redispatch cost more than the ops' own work in a decode step), and
they call the ops themselves when autograd records, so ``InferenceOnlyError`` is raised as
before. Only for a graph run eagerly (inner backend ``"eager"``): a graph handed to another
compiler keeps the ops, which it traces with their fake implementations.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops

__all__ = ["lower_for_eager"]

_PREDICT = torch.ops.expertflow.predict.default
_PREFETCH = torch.ops.expertflow.prefetch.default
_PERMUTE = torch.ops.expertflow.permute.default
_GEMM = torch.ops.expertflow.grouped_gemm.default
_GEMM_MODULES = torch.ops.expertflow.grouped_gemm_modules.default


def _permute_of(gemm: fx.Node) -> fx.Node | None:
    """The ``permute`` node whose (order, offsets) are ``gemm``'s and nothing else's."""
    order, offsets = gemm.args[2], gemm.args[3]
    if not all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (order, offsets)):
        return None
    perm = order.args[0]
    if (perm is not offsets.args[0] or not isinstance(perm, fx.Node) or perm.target is not _PERMUTE
            or order.args[1] != 0 or offsets.args[1] != 1):
        return None
    if any(set(n.users) != {gemm} for n in (order, offsets)) or set(perm.users) != {order, offsets}:
        return None
    return perm


def lower_for_eager(gm: fx.GraphModule) -> fx.GraphModule:
    """The eager form of ``gm`` (module docstring); ``gm`` is not changed."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _PREFETCH:
            pred = node.args[0]
            if isinstance(pred, fx.Node) and pred.target is _PREDICT and set(pred.users) == {node}:
                with graph.inserting_before(node):
                    call = graph.call_function(ops.run_prediction, tuple(pred.args))
                call.meta.update(node.meta)
                node.replace_all_uses_with(call)
                graph.erase_node(node)
                graph.erase_node(pred)
                lowered += 1
        elif node.target in (_GEMM, _GEMM_MODULES):
            perm = _permute_of(node)
            if perm is None:
                continue
            fn = ops.run_routed_experts if node.target is _GEMM else ops.run_routed_expert_modules
            ids, num_experts = perm.args
            args = (node.args[0], node.args[1], ids, num_experts) + tuple(node.args[4:])
            with graph.inserting_before(node):
                call = graph.call_function(fn, args, dict(node.kwargs))
            call.meta.update(node.meta)
            node.replace_all_uses_with(call)
            order, offsets = node.args[2], node.args[3]
            graph.erase_node(node)
            graph.erase_node(order)
            graph.erase_node(offsets)
            graph.erase_node(perm)
            lowered += 1
    if not lowered:
        return gm
    graph.lint()
    new = fx.GraphModule(gm, graph)
    binding = getattr(gm, "_expertflow_binding", None)
    if binding is not None:
        new._expertflow_binding = binding   # the compiled graph holds its recipe (runtime/registry.py)
    return new
