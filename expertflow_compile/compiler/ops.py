"""The ``expertflow::*`` custom ops that rewritten graphs call.

Each op is a ``torch.library.custom_op`` with a fake implementation, so graphs that
contain them can be traced with fake tensors (Dynamo, AOTAutograd, inductor). The
ops look up the per-model :class:`~expertflow_compile.runtime.engine.ExpertEngine`
by the integer ``engine_id`` baked into the graph, and the MoE layer by ``layer``.

Data flow per MoE block::

    predicted = predict(hidden, engine_id, layer, width)      # expert ids, -1 padded
    token     = prefetch(predicted, engine_id, layer)          # enqueues loads only
    order, offsets = permute(topk_ids, num_experts)            # (token, k) pairs by expert
    out       = grouped_gemm(hidden, topk_weights, order, offsets, token,
                             w_up, w_down, b_up, b_down, engine_id, layer)

``token`` feeds ``grouped_gemm`` so that dead-code elimination keeps ``prefetch`` and
the prefetch is issued before the block computes.

A graph run eagerly calls the plain functions at the end of this module instead
(``passes/lower.py``): ``run_prediction`` (predict + prefetch) and ``run_routed_experts``
(permute + grouped_gemm), same work without the dispatcher's route to a Python op; they
call the ops themselves when autograd records.

Inference only: the expert ops have an autograd registration whose ``setup_context``
raises :class:`~expertflow_compile.errors.InferenceOnlyError`, so a forward with autograd
recording (grad enabled and an input that requires grad, e.g. the model's parameters)
stops at the first rewritten block with our message instead of failing later at
``backward()``. Under ``torch.no_grad()`` / ``inference_mode()`` (``generate()``) autograd
never calls it.
"""

from __future__ import annotations

import torch

from ..errors import InferenceOnlyError
from ..kernels.reference import permute_math

__all__ = ["predict", "prefetch", "permute", "grouped_gemm", "grouped_gemm_modules", "permute_math",
           "run_prediction", "run_routed_experts", "run_routed_expert_modules"]


def _engine(engine_id: int):
    """The engine graph ``engine_id`` served last (None: it outlived its models)."""
    from ..runtime.engine import get_engine

    return get_engine(engine_id)


def _serving(engine_id: int, layer: int, tensors: list):
    """The engine of the expert ``tensors`` this op received (runtime/registry.py's rule)."""
    from ..runtime.registry import serving_engine

    return serving_engine(engine_id, layer, tensors)


@torch.library.custom_op("expertflow::predict", mutates_args=())
def predict(hidden: torch.Tensor, engine_id: int, layer: int, width: int) -> torch.Tensor:
    """Expert ids predicted for the coming MoE layers, as an int64 tensor of ``width``
    entries encoded ``layer * 2**20 + expert`` and padded with -1."""
    eng = _engine(engine_id)
    if eng is None:
        return torch.full((width,), -1, dtype=torch.int64, device=hidden.device)
    return eng.predict(layer, hidden, width)


@predict.register_fake
def _(hidden, engine_id, layer, width):
    return hidden.new_empty((width,), dtype=torch.int64)


@torch.library.custom_op("expertflow::prefetch", mutates_args=())
def prefetch(predicted: torch.Tensor, engine_id: int, layer: int) -> torch.Tensor:
    """Enqueue asynchronous loads of the predicted experts; returns a 1-element token."""
    eng = _engine(engine_id)
    if eng is not None:
        eng.prefetch(layer, predicted)
    return torch.zeros(1, dtype=torch.uint8, device=predicted.device)


@prefetch.register_fake
def _(predicted, engine_id, layer):
    return predicted.new_empty((1,), dtype=torch.uint8)


@torch.library.custom_op("expertflow::permute", mutates_args=())
def permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, k) pairs by expert.

    Returns ``order`` (int64 [T*K]: pair indices grouped by expert, stable within an
    expert) and ``offsets`` (int64 [E+1]: expert e owns ``order[offsets[e]:offsets[e+1]]``).
    Ids outside ``[0, num_experts)`` are counted in no expert (they sort to the tail).
    """
    return permute_math(topk_ids, num_experts)


@permute.register_fake
def _(topk_ids, num_experts):
    n = topk_ids.numel()
    return (topk_ids.new_empty((n,), dtype=torch.int64),
            topk_ids.new_empty((num_experts + 1,), dtype=torch.int64))


@torch.library.custom_op("expertflow::grouped_gemm", mutates_args=())
def grouped_gemm(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    token: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    engine_id: int,
    layer: int,
    w_up2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the routed experts of one MoE layer and combine them into token order.

    ``hidden`` is [T, H]; ``topk_weights`` [T, K]; ``order``/``offsets`` come from
    :func:`permute`. The expert weights ``w_up``/``w_down`` (and biases) are the
    model's own tensors when every expert is resident; when the engine offloads, it
    reads each expert from its device cache instead and these may be placeholders.
    ``w_up2`` is the up weight of families whose gate and up weights are separate
    (``w_up`` is then the gate). 2-D weights are viewed per expert by the engine.
    """
    return _serving(engine_id, layer, [w_up, w_down, b_up, b_down, w_up2]).grouped_gemm(
        layer, hidden, topk_weights, order, offsets, w_up, w_down, b_up, b_down, w_up2
    )


@grouped_gemm.register_fake
def _(hidden, topk_weights, order, offsets, token, w_up, w_down, b_up, b_down, engine_id, layer, w_up2=None):
    return torch.empty_like(hidden)


@torch.library.custom_op("expertflow::grouped_gemm_modules", mutates_args=())
def grouped_gemm_modules(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    token: torch.Tensor,
    up_list: list[torch.Tensor],
    down_list: list[torch.Tensor],
    engine_id: int,
    layer: int,
) -> torch.Tensor:
    """:func:`grouped_gemm` for experts kept as one module per expert (a ModuleDict of
    Linear layers, Switch Transformers): ``up_list[e]``/``down_list[e]`` are expert e's
    weights."""
    from ..layer import ExpertList

    eng = _serving(engine_id, layer, [ExpertList(up_list), ExpertList(down_list), None, None, None])
    return eng.grouped_gemm(
        layer, hidden, topk_weights, order, offsets, None, None, None, None, None, up_list, down_list
    )


@grouped_gemm_modules.register_fake
def _(hidden, topk_weights, order, offsets, token, up_list, down_list, engine_id, layer):
    return torch.empty_like(hidden)


def _refuse_autograd(layer_arg: int):
    def setup_context(ctx, inputs, output):
        layer = inputs[layer_arg]
        raise InferenceOnlyError(
            f"expertflow is inference-only: MoE layer {layer} runs rewritten (its experts are served from "
            "expertflow's cache and have no gradient), but autograd is recording and an input requires grad; "
            "run the model under torch.no_grad() or torch.inference_mode() (generate() already does), or call "
            "model.requires_grad_(False)")

    return setup_context


def _never_called(ctx, *grads):   # pragma: no cover - setup_context refuses first
    raise InferenceOnlyError("expertflow is inference-only: no backward through its expert ops")


torch.library.register_autograd("expertflow::grouped_gemm", _never_called, setup_context=_refuse_autograd(10))
torch.library.register_autograd("expertflow::grouped_gemm_modules", _never_called,
                                setup_context=_refuse_autograd(8))


# ----- direct calls: what an eager-run graph calls instead of the ops (passes/lower.py) ------
# The dispatcher's route to a Python custom op (the autograd wrapper, redispatch, the backend
# wrapper) costs several times what the ops themselves do per decode step. A rewritten graph
# that runs eagerly (inner backend "eager") calls these plain functions instead: each does
# exactly what its ops do, and when autograd would record (grad enabled and an input that
# requires grad) it calls the ops themselves, so InferenceOnlyError stays as it is.

def _records(*args) -> bool:
    return torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args)


def run_prediction(hidden: torch.Tensor, engine_id: int, layer: int, width: int) -> None:
    """``prefetch(predict(hidden, ...))`` in one call; the token it returns is None (the
    graph's order of calls already issues the prefetch before the layer's experts)."""
    eng = _engine(engine_id)
    if eng is not None:
        eng.predict_and_prefetch(layer, hidden, width)


def run_routed_experts(hidden, topk_weights, topk_ids, num_experts, token, w_up, w_down, b_up, b_down, engine_id,
                       layer, w_up2=None):
    """``grouped_gemm(hidden, topk_weights, *permute(topk_ids, num_experts), token, ...)``."""
    if _records(hidden, topk_weights, w_up, w_down, b_up, b_down, w_up2):
        order, offsets = permute(topk_ids, num_experts)
        return grouped_gemm(hidden, topk_weights, order, offsets, _token(token, hidden), w_up, w_down, b_up, b_down,
                            engine_id, layer, w_up2)
    return _serving(engine_id, layer, [w_up, w_down, b_up, b_down, w_up2]).routed_experts(
        layer, hidden, topk_weights, topk_ids, w_up, w_down, b_up, b_down, w_up2)


def run_routed_expert_modules(hidden, topk_weights, topk_ids, num_experts, token, up_list, down_list, engine_id,
                              layer):
    """``grouped_gemm_modules(hidden, topk_weights, *permute(topk_ids, num_experts), token, ...)``."""
    if _records(hidden, topk_weights, up_list, down_list):
        order, offsets = permute(topk_ids, num_experts)
        return grouped_gemm_modules(hidden, topk_weights, order, offsets, _token(token, hidden), up_list, down_list,
                                    engine_id, layer)
    from ..layer import ExpertList

    eng = _serving(engine_id, layer, [ExpertList(up_list), ExpertList(down_list), None, None, None])
    return eng.routed_experts(layer, hidden, topk_weights, topk_ids, None, None, None, None, None, up_list,
                              down_list)


def _token(token, like: torch.Tensor) -> torch.Tensor:
    return token if token is not None else torch.zeros(1, dtype=torch.uint8, device=like.device)
