"""The public helpers around the backend: ``explain``, ``stats``, ``reset_stats``."""

from __future__ import annotations

import torch

from .compiler.backend import collect_reports, expertflow_backend
from .config import ExpertFlowConfig
from .layer import unwrap_compiled
from .compiler.passes.report import ExplainReport
from .runtime.engine import engines_for_module
from .compiler.traceable import mark_expertflow_backend

__all__ = ["explain", "stats", "reset_stats"]


def _module_of(model) -> torch.nn.Module:
    """The nn.Module behind ``model`` (an ``OptimizedModule`` from torch.compile or a module)."""
    inner = unwrap_compiled(model)
    if not isinstance(inner, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or the result of torch.compile(module), got {type(model).__name__}")
    return inner


def explain(model, *args, options: dict | None = None, **kwargs) -> ExplainReport:
    """Compile ``model`` with the expertflow backend, run it once on ``args``/``kwargs``
    and report what was found and rewritten in each graph.

    ``model`` is left as it was (the compiled copy is thrown away).
    """
    config = ExpertFlowConfig.from_options(options)
    module = _module_of(model)
    report = ExplainReport()

    opts = {k: getattr(config, k) for k in ExpertFlowConfig.valid_keys()}
    backend = mark_expertflow_backend(lambda gm, ex: expertflow_backend(gm, ex, options=opts))
    compiled = torch.compile(module, backend=backend)
    before = {id(e) for e in engines_for_module(module)}
    with collect_reports(report.graphs.append), torch.no_grad():
        compiled(*args, **kwargs)
    for eng in engines_for_module(module):   # the throw-away compile's engine ends here: the
        if id(eng) not in before:            # module's eager calls stay its own (fallback.py)
            eng.close()
    return report


def stats(model) -> dict:
    """Cache and prefetch counters of a compiled model (see ``runtime/stats.py``).

    ``model`` is the module after ``model.compile(backend="expertflow", ...)`` or what
    ``torch.compile`` returned; it must have run at least once.
    """
    engines = engines_for_module(_module_of(model))
    if not engines:
        raise ValueError("this model has no expertflow engine: compile it with backend='expertflow' "
                         "and run it once (generate or forward) before asking for stats")
    return engines[-1].stats_dict()


def reset_stats(model) -> None:
    """Zero the counters of ``model``'s engine."""
    for eng in engines_for_module(_module_of(model)):
        eng.reset_stats()
