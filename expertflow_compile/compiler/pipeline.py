"""The expertflow passes as one named, ordered list, run by one loop.

``PASSES`` is the pipeline every graph goes through (``compile_graph`` in
``backend.py`` runs it):

=============  ==========================================================================
``match``      find the MoE blocks (:func:`.passes.match.find_moe_blocks`); never edits
``verify``     run each replacement against the original block on the real first inputs
               (:func:`.passes.verify.check_blocks`); off with ``verify=False``
``bind``       the engine for the blocks that passed, the final layer numbers, and each
               layer's :class:`~expertflow_compile.layer.LayerPlan` registered with it
``lookahead``  where each layer's experts can first be predicted
               (:func:`.passes.lookahead.plan_lookahead`), registered as its router chain
``rewrite``    replace each bound block's dispatch with the expertflow ops
               (:func:`.passes.rewrite.rewrite_moe_block`)
``recompile``  lint the graph, regenerate its code
=============  ==========================================================================

Each pass is a :class:`Pass`: a name, a function ``(state) -> blocks`` that reads and
writes the one :class:`GraphState` of the graph and returns how many blocks it leaves
for the next pass, and a switch (``enabled(config)``). The loop (:func:`run_passes`)
times every pass and logs ``pass <name>: <n> block(s), <ms> ms`` at DEBUG on the logger
``expertflow_compile.compiler.pipeline``; the timings also land in the graph's report
(``GraphReport.passes``). With the environment variable ``EXPERTFLOW_DUMP_PASSES=<dir>``
(or ``run_passes(..., dump_dir=<dir>)``) it writes the graph's code before and after each
pass to ``<dir>/graph<g>_<n>_<pass>_{before,after}.py`` (g: the graph's number in this
process, n: the pass's position).

Invariants: only ``bind`` chooses an engine or a layer number; only ``rewrite`` and
``recompile`` edit the graph; a block refused by ``verify`` is never bound or rewritten.
"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from ..config import ExpertFlowConfig
from ..runtime.engine import ExpertEngine, attached_store, engine_for_store, engine_for_tensor
from ..runtime.registry import GraphBinding
from .passes.lookahead import LookaheadSource, plan_lookahead
from .passes.match import MatchResult, MoEBlock, find_moe_blocks
from .passes.report import BlockReport, GraphReport, PassTiming
from .passes.rewrite import rewrite_moe_block
from .passes.verify import BlockCheck, check_blocks

__all__ = ["Pass", "GraphState", "PASSES", "run_passes", "DUMP_ENV", "LOGGER_NAME"]

LOGGER_NAME = "expertflow_compile.compiler.pipeline"
DUMP_ENV = "EXPERTFLOW_DUMP_PASSES"
log = logging.getLogger(LOGGER_NAME)
warn_log = logging.getLogger("expertflow_compile")


@dataclass
class GraphState:
    """Everything the passes know about one graph being compiled."""

    gm: fx.GraphModule
    example_inputs: list
    config: ExpertFlowConfig
    report: GraphReport
    options: dict | None = None            # the torch.compile call's options dict (shares engines)
    values: dict = field(default_factory=dict)   # placeholder -> its real (or fake) value
    match: MatchResult = field(default_factory=MatchResult)
    checks: dict[int, BlockCheck] = field(default_factory=dict)   # index in match.blocks -> check
    bound: list[MoEBlock] = field(default_factory=list)           # blocks to rewrite, in graph order
    tensors: list[list] = field(default_factory=list)             # each bound block's expert tensors
    engine: ExpertEngine | None = None
    binding: GraphBinding | None = None
    lookahead: dict[int, LookaheadSource] = field(default_factory=dict)
    rewritten: list[MoEBlock] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[GraphState], int]        # returns the blocks it leaves for the next pass
    enabled: Callable[[ExpertFlowConfig], bool] = lambda config: True


# ----- the passes ---------------------------------------------------------------------------

def _match(state: GraphState) -> int:
    phs = [n for n in state.gm.graph.nodes if n.op == "placeholder"]
    state.values = dict(zip(phs, state.example_inputs))
    state.match = find_moe_blocks(state.gm)
    state.bound = list(state.match.blocks)
    return len(state.bound)


def _verify(state: GraphState) -> int:
    blocks = state.match.blocks
    state.checks = check_blocks(state.gm, state.example_inputs, blocks, state.values)
    state.bound = [b for i, b in enumerate(blocks) if i not in state.checks or state.checks[i].ok]
    for i, check in state.checks.items():
        if not check.ok:
            warn_log.warning("expertflow: layer %s left untouched: %s", blocks[i].layer, _refusal(check))
    return len(state.bound)


# engines by the options object of one torch.compile call: Dynamo hands every graph of
# that call the same dict, so graphs that share no weights (an encoder and its decoder, one
# frame per decoder layer after a graph break in attention) still land in one engine and
# one budget. The entry holds the dict itself, so its id cannot be reused while it lives.
_ENGINES_BY_OPTIONS: dict[tuple, tuple[dict, "weakref.ref[ExpertEngine]"]] = {}


def _engine_for(first_tensors: list, config: ExpertFlowConfig, options: dict | None) -> ExpertEngine:
    """The engine for experts whose first tensors are ``first_tensors``: the one those tensors
    already hold (runtime/registry.py's rule) if its options match; for experts on disk, the
    open engine reading their store; else the one made for the same ``torch.compile`` call
    (same options object); else a new one."""
    for t in first_tensors:
        eng = engine_for_tensor(t)
        if eng is not None and eng.config.key() == config.key():
            return eng
    store = next((s for s in (attached_store(getattr(t, "tensors", [t])[0]) for t in first_tensors)
                  if s is not None), None)
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


def _bind(state: GraphState) -> int:
    """The one place an engine is chosen and a layer numbered: a number the matcher took
    from the names may already belong to other experts of the engine."""
    if not state.bound:
        return 0
    state.tensors = [b.tensors(state.values) for b in state.bound]
    engine = state.engine = _engine_for([t[0] for t in state.tensors], state.config, state.options)
    binding = state.binding = GraphBinding(engine)
    state.gm._expertflow_binding = binding   # the graph holds its recipe (the registry holds it weakly)
    numbers: list[int] = []
    for block, tensors in zip(state.bound, state.tensors):   # all numbered before any is registered
        block.layer = engine.layer_number_for(block.layer, tensors[0], numbers)
        numbers.append(block.layer)
    for block, tensors in zip(state.bound, state.tensors):
        plan = block.plan()
        engine.register_layer(plan, tensors)
        binding.add(plan)
    return len(state.bound)


def _lookahead(state: GraphState) -> int:
    state.lookahead = plan_lookahead(state.bound)
    for layer, source in state.lookahead.items():
        state.engine.register_router(layer, source.fn, [state.values.get(p) for p in source.params],
                                     ranking=source.ranking)
    return len(state.lookahead)


def _prediction_width(blocks: list[MoEBlock], config: ExpertFlowConfig) -> int:
    """Room for every expert of ``lookahead_depth`` layers (a batch can touch them all)."""
    widest = max((b.num_experts for b in blocks), default=1)
    return max(1, config.lookahead_depth * widest)


def _rewrite(state: GraphState) -> int:
    width = _prediction_width(state.bound, state.config)
    for block in state.bound:
        source = state.lookahead.get(block.layer)
        rewrite_moe_block(state.gm, block, state.binding.id, width, source.source if source is not None else None)
        state.rewritten.append(block)
    return len(state.rewritten)


def _recompile(state: GraphState) -> int:
    state.gm.graph.lint()
    state.gm.recompile()
    return len(state.rewritten)


PASSES: tuple[Pass, ...] = (
    Pass("match", _match),
    Pass("verify", _verify, enabled=lambda config: config.verify),
    Pass("bind", _bind),
    Pass("lookahead", _lookahead),
    Pass("rewrite", _rewrite),
    Pass("recompile", _recompile),
)


# ----- the loop -----------------------------------------------------------------------------

def _graph_code(gm: fx.GraphModule) -> str:
    """The graph's current code (generated from the graph, so true between recompiles)."""
    return gm.graph.python_code("self").src


def _dump(dump_dir: pathlib.Path | None, state: GraphState, n: int, name: str, when: str) -> None:
    if dump_dir is None:
        return
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / f"graph{state.report.index}_{n}_{name}_{when}.py").write_text(_graph_code(state.gm), encoding="utf-8")


def run_passes(state: GraphState, passes: tuple[Pass, ...] = PASSES,
               dump_dir: str | os.PathLike | None = None) -> GraphState:
    """Run ``passes`` in order on ``state`` (each one whose switch is on), timing and
    logging each; dump the graph around each to ``dump_dir`` (default: ``$EXPERTFLOW_DUMP_PASSES``)."""
    where = dump_dir if dump_dir is not None else os.environ.get(DUMP_ENV) or None
    where = pathlib.Path(where) if where else None
    for n, p in enumerate(passes):
        if not p.enabled(state.config):
            log.debug("graph %d: pass %s off", state.report.index, p.name)
            continue
        _dump(where, state, n, p.name, "before")
        start = time.perf_counter()
        blocks = p.run(state)
        ms = (time.perf_counter() - start) * 1e3
        state.report.passes.append(PassTiming(p.name, blocks, ms))
        log.debug("graph %d: pass %s: %d block(s), %.2f ms", state.report.index, p.name, blocks, ms)
        _dump(where, state, n, p.name, "after")
    _fill_report(state)
    return state


def _refusal(check: BlockCheck) -> str:
    return f"{check.note} (max |diff| {check.max_abs_diff:.3g} > {check.tolerance:.3g}); left as it was"


def _fill_report(state: GraphState) -> None:
    """One entry per block found (rewritten, or refused with the reason), then the
    routers whose experts were not found."""
    rewritten = {id(b) for b in state.rewritten}
    for i, block in enumerate(state.match.blocks):
        check = state.checks.get(i)
        entry = BlockReport(
            layer=block.layer, where=block.scope, rewritten=id(block) in rewritten, routing=block.routing,
            dispatch=block.dispatch, layout=block.layout, activation=block.activation,
            num_experts=block.num_experts, top_k=block.top_k, params=block.weight_names(),
            check=("not checked (verify=False)" if check is None else
                   check.note or f"matches the original block: max |diff| {check.max_abs_diff:.3g} "
                                 f"<= {check.tolerance:.3g}"),
        )
        if check is not None and not check.ok:
            entry.reason = _refusal(check)
        state.report.blocks.append(entry)
    for u in state.match.unmatched:
        state.report.blocks.append(BlockReport(layer=u.layer, where=u.where, rewritten=False, reason=u.reason))
    state.report.code = state.gm.code
    state.report.num_nodes = len(state.gm.graph.nodes)
