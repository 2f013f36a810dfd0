"""The ``expertflow`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so after ``pip install``
``torch.compile(model, backend="expertflow", options={...})`` works without importing
this package first. Per graph it: parses the options, finds the MoE blocks, checks
each replacement against the original block on the real first inputs, rewrites the
blocks that pass, binds them to the model's engine, and hands the graph to the inner
backend (eager by default).

Importing this module installs the traceable forms of the loop-dispatched MoE blocks
(``traceable.py``): they replace the per-expert loops only while Dynamo traces for this
backend.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
import logging
from collections.abc import Callable

import torch.fx as fx

from ..config import ExpertFlowConfig
from ..errors import OptionError
from .fallback import install as _install_eager_fallback
from .passes.lookahead import plan_lookahead
from .passes.lower import lower_for_eager
from .passes.match import MoEBlock, find_moe_blocks
from .passes.report import BlockReport, GraphReport
from .passes.rewrite import rewrite_moe_block
from .passes.verify import check_blocks
from ..runtime.engine import ExpertEngine, LayerPlan, engine_for_tensor
from ..runtime.registry import GraphBinding
from .traceable import install as _install_traceable
from .traceable import mark_expertflow_backend

__all__ = ["expertflow_backend", "compile_graph"]

log = logging.getLogger("expertflow_compile")
_GRAPH_COUNTER = [0]
_SINKS: list[Callable[[GraphReport], None]] = []


def _current_sink() -> Callable[[GraphReport], None] | None:
    return _SINKS[-1] if _SINKS else None


@contextlib.contextmanager
def collect_reports(sink: Callable[[GraphReport], None]):
    """Send the report of every graph compiled inside the block to ``sink``."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def _placeholder_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(phs, example_inputs))


# engines by the options object of one torch.compile call: Dynamo hands every graph of
# that call the same dict, so graphs that share no weights (an encoder and its decoder, one
# frame per decoder layer after a graph break in attention) still land in one engine and
# one budget. The entry holds the dict itself, so its id cannot be reused while it lives.
_ENGINES_BY_OPTIONS: dict[tuple, tuple[dict, "weakref.ref[ExpertEngine]"]] = {}


def _param_names(block: MoEBlock) -> list[str]:
    names = []
    for name, node in zip(block.SLOTS, block.param_slots()):
        members = block.lists.get(name)
        if members:
            names.append(f"{members[0].target} .. {members[-1].target} ({len(members)} tensors)")
        elif node is not None:
            names.append(str(node.target))
    return names


def _engine_for(blocks: list[MoEBlock], values: dict, config: ExpertFlowConfig,
                options: dict | None = None) -> ExpertEngine:
    """The engine for the experts of a graph being compiled: the one their tensors already
    hold (runtime/registry.py's rule) if its options match; for experts on disk, the open
    engine reading their store; else the one made for the same ``torch.compile`` call (same
    options object); else a new one."""
    from ..runtime.engine import attached_store, engine_for_store

    firsts = [b.tensors(values)[0] for b in blocks]
    for t in firsts:
        eng = engine_for_tensor(t)
        if eng is not None and eng.config.key() == config.key():
            return eng
    store = next((s for s in (attached_store(getattr(t, "tensors", [t])[0]) for t in firsts) if s is not None),
                 None)
    if store is not None:
        eng = engine_for_store(store, config.key())
        if eng is not None:
            return eng
    key = (id(options), id(store) if store is not None else None)   # one options dict, one model
    entry = _ENGINES_BY_OPTIONS.get(key) if options is not None else None
    if entry is not None and entry[0] is options and entry[1]() is not None:
        gc.collect()   # a model deleted but not collected yet (tensors <-> engine cycle) lends nothing
        eng = entry[1]()
        if eng is not None and not eng._closed and eng.config.key() == config.key():
            return eng
    eng = ExpertEngine(config)
    for k in [k for k, (_, ref) in _ENGINES_BY_OPTIONS.items() if ref() is None or ref()._closed]:
        del _ENGINES_BY_OPTIONS[k]
    if options is not None:
        _ENGINES_BY_OPTIONS[key] = (options, weakref.ref(eng))
    return eng


def _prediction_width(blocks: list[MoEBlock], config: ExpertFlowConfig) -> int:
    """Room for every expert of ``lookahead_depth`` layers (a batch can touch them all)."""
    widest = max((b.num_experts for b in blocks), default=1)
    return max(1, config.lookahead_depth * widest)


def compile_graph(
    gm: fx.GraphModule, example_inputs: list, config: ExpertFlowConfig,
    report_sink: Callable[[GraphReport], None] | None = None, options: dict | None = None,
) -> tuple[fx.GraphModule, GraphReport, ExpertEngine | None]:
    """Run the expertflow passes on ``gm`` in place; returns (gm, report, engine)."""
    _GRAPH_COUNTER[0] += 1
    report = GraphReport(index=_GRAPH_COUNTER[0])
    result = find_moe_blocks(gm)
    values = _placeholder_values(gm, example_inputs)
    checks = check_blocks(gm, example_inputs, result.blocks, values) if config.verify else {}
    good = [b for i, b in enumerate(result.blocks) if checks.get(i) is None or checks[i].ok]
    engine = _engine_for(good, values, config, options) if good else None
    binding = GraphBinding(engine) if engine is not None else None
    gm._expertflow_binding = binding   # the graph holds its recipe (the registry holds it weakly)
    numbers: list[int] = []
    for b in good:   # a layer number baked from names may already belong to other experts
        b.layer = engine.layer_number_for(b.layer, b.tensors(values)[0], numbers)
        numbers.append(b.layer)
    width = _prediction_width(good, config)
    lookahead = plan_lookahead(good)
    for i, block in enumerate(result.blocks):
        check = checks.get(i)
        entry = BlockReport(
            layer=block.layer, where=block.scope, rewritten=False, routing=block.routing,
            dispatch=block.dispatch, layout=block.layout, activation=block.activation,
            num_experts=block.num_experts, top_k=block.top_k,
            params=_param_names(block),
            check=("not checked (verify=False)" if check is None else
                   check.note or f"matches the original block: max |diff| {check.max_abs_diff:.3g} "
                                 f"<= {check.tolerance:.3g}"),
        )
        if check is not None and not check.ok:
            entry.reason = (f"{check.note} (max |diff| {check.max_abs_diff:.3g} > {check.tolerance:.3g}); "
                            "left as it was")
            report.blocks.append(entry)
            log.warning("expertflow: layer %s left untouched: %s", block.layer, entry.reason)
            continue
        plan = LayerPlan(
            layer=block.layer, num_experts=block.num_experts, top_k=block.top_k,
            hidden_size=block.hidden_size, math=block.math, rows_dtype=block.rows_dtype,
            out_features=block.out_features, has_up_bias=block.up_bias is not None,
            has_down_bias=block.down_bias is not None, has_up2=block.up2_weight is not None,
            views=tuple(sorted(block.views.items())),
        )
        engine.register_layer(plan, block.tensors(values))
        binding.add(plan)
        source = lookahead.get(block.layer)
        if source is not None:
            engine.register_router(block.layer, source.fn, [values.get(p) for p in source.params])
        rewrite_moe_block(gm, block, binding.id, width, source.source if source is not None else None)
        entry.rewritten = True
        report.blocks.append(entry)
    for u in result.unmatched:
        report.blocks.append(BlockReport(layer=u.layer, where=u.where, rewritten=False, reason=u.reason))
    gm.graph.lint()
    gm.recompile()
    report.code = gm.code
    report.num_nodes = len(gm.graph.nodes)
    if engine is not None:
        engine.graph_reports.append(report)
        engine.on_graph_compiled(values)
    if report_sink is not None:
        report_sink(report)
    return gm, report, engine


def expertflow_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **kwargs):
    """The torch.compile backend (``backend="expertflow"``).

    Dynamo calls it at a compiled model's first call; a bad option (or a budget too small
    for the model) raises :class:`~expertflow_compile.errors.OptionError`, which Dynamo
    passes through unwrapped (``except ValueError`` catches it there)."""
    if kwargs:
        raise OptionError(f"unexpected arguments to the expertflow backend: {sorted(kwargs)}; pass "
                         f"options=dict(...) with keys {ExpertFlowConfig.valid_keys()}")
    config = ExpertFlowConfig.from_options(options)
    gm, _, _ = compile_graph(gm, example_inputs, config, _current_sink(),
                             options if isinstance(options, dict) else None)
    if config.inner_backend == "eager":   # direct calls instead of the ops (passes/lower.py)
        return lower_for_eager(gm).forward
    from torch._dynamo.backends.registry import lookup_backend

    compiled = lookup_backend(config.inner_backend)(gm, example_inputs)
    binding = gm._expertflow_binding

    def run(*args):   # keeps the graph's binding alive as long as the compiled callable
        return compiled(*args)

    run._expertflow_binding = binding
    return run


mark_expertflow_backend(expertflow_backend)
_install_traceable()
_install_eager_fallback()
