"""The ``expertflow`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so after ``pip install``
``torch.compile(model, backend="expertflow", options={...})`` works without importing
this package first. Per graph it parses the options, runs the passes of
:mod:`.pipeline` (match, verify, bind, lookahead, rewrite, recompile) and hands the
graph to the inner backend (eager by default).

Importing this module installs the traceable forms of the loop-dispatched MoE blocks
(``traceable.py``): they replace the per-expert loops only while Dynamo traces for this
backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch.fx as fx

from ..config import ExpertFlowConfig
from ..errors import OptionError
from ..runtime.engine import ExpertEngine
from .fallback import install as _install_eager_fallback
from .passes.lower import lower_for_eager
from .passes.report import GraphReport
from .pipeline import GraphState, run_passes
from .traceable import install as _install_traceable
from .traceable import mark_expertflow_backend

__all__ = ["expertflow_backend", "compile_graph", "collect_reports"]

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


def compile_graph(
    gm: fx.GraphModule, example_inputs: list, config: ExpertFlowConfig,
    report_sink: Callable[[GraphReport], None] | None = None, options: dict | None = None,
) -> tuple[fx.GraphModule, GraphReport, ExpertEngine | None]:
    """Run the expertflow passes (``pipeline.PASSES``) on ``gm`` in place; returns (gm, report, engine)."""
    _GRAPH_COUNTER[0] += 1
    gm._expertflow_binding = None   # the bind pass sets the graph's recipe when it has MoE blocks
    state = run_passes(GraphState(gm, list(example_inputs), config, GraphReport(index=_GRAPH_COUNTER[0]),
                                  options))
    if state.engine is not None:
        state.engine.graph_reports.append(state.report)
        state.engine.on_graph_compiled(state.values)
    if report_sink is not None:
        report_sink(state.report)
    return gm, state.report, state.engine


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
