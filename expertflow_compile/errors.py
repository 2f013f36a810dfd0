"""The exceptions expertflow raises for what a user gave it, and how they reach the user.

Dynamo calls a backend at a compiled model's first call (not at ``torch.compile`` /
``model.compile`` time: torch hands the options to no backend code before that), and it
wraps whatever a backend raises in ``torch._dynamo.exc.BackendCompilerFailed``, except
for the exceptions derived from ``torch._dynamo.exc.ShortenTraceback``, which it passes
through unchanged (torch 2.13: ``OutputGraph.call_user_compiler``, ``convert_frame``,
``eval_frame``). Our user errors derive from it, so ``except ValueError`` around the first
call of a compiled model catches a bad option as it would around
:meth:`ExpertFlowConfig.from_options`.

* :class:`OptionError` (a ``ValueError``): an unknown option or a bad value, a budget
  below what one MoE layer needs, a ``predictor_path`` that is missing or not a file.
* :class:`InferenceOnlyError` (a ``RuntimeError``): a forward with autograd recording
  through a rewritten MoE block (expertflow serves experts from a cache: no gradients).

Invariant: ``str(exc)`` is the one-line message we wrote, whatever Dynamo appends to
``exc.args`` on the way out.
"""

from __future__ import annotations

try:   # the pass-through base Dynamo re-raises unwrapped (torch >= 2.6)
    from torch._dynamo.exc import ShortenTraceback as _PassThroughBase
except ImportError:  # pragma: no cover - older torch: the error reaches the user wrapped
    _PassThroughBase = None

__all__ = ["ExpertFlowError", "OptionError", "InferenceOnlyError"]


class ExpertFlowError(_PassThroughBase or Exception):
    """Base of expertflow's user errors; Dynamo passes it through unwrapped."""

    def __init__(self, message: str):
        self.message = str(message)
        if _PassThroughBase is not None:
            _PassThroughBase.__init__(self, self.message, first_useful_frame=None)
        else:  # pragma: no cover
            Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message,))


class OptionError(ExpertFlowError, ValueError):
    """A bad ``expertflow`` option (or a budget too small for the model): a ``ValueError``."""


class InferenceOnlyError(ExpertFlowError, RuntimeError):
    """Autograd was recording through a rewritten MoE block: expertflow is inference-only."""
