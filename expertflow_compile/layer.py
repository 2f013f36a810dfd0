"""The ground floor: the description of one MoE layer that passes, runtime and kernels read.

Four plain value types, importing nothing of the package (only ``torch``), so every
wing imports them downward:

* :class:`ExpertMath` - how the layer's experts compute (layouts, gating, post-expert
  function, where the routing weight multiplies);
* :class:`SplitGate` - the gating of a family whose gate and up weights are separate;
* :class:`ExpertList` - one projection's experts kept as E separate tensors, addressed
  like one ``[E, ...]`` tensor;
* :class:`LayerPlan` - one rewritten MoE layer as the engine runs it (the matcher's
  ``MoEBlock.plan()`` produces it);

and the two rules about names every wing shares: :func:`layer_index` (which layer a
module or parameter name belongs to) and :func:`unwrap_compiled` (the module behind a
``torch.compile`` result).

Invariants: every type here is a description, never a holder of engine state; an
``ExpertList``'s tensors share one shape, dtype and device (checked on construction).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ExpertMath", "SplitGate", "ExpertList", "LayerPlan", "TENSOR_ORDER", "layer_index", "unwrap_compiled"]

# The order of one layer's expert tensors everywhere a list of them is passed (the
# matcher's ``MoEBlock.tensors``, ``ExpertEngine.register_layer``): the up projection
# (the gate when ``up2`` is given), the down projection, their biases, the separate up.
TENSOR_ORDER = ("up", "down", "up_bias", "down_bias", "up2")


@dataclass(frozen=True)
class ExpertMath:
    """How one MoE layer's experts compute, as recovered from the graph.

    ``up_transposed``/``down_transposed``: the stored weight is [in, out] per expert
    (GPT-OSS) rather than the usual [out, in]. ``gate_fn`` maps the up projection's
    output [S, N_up] to [S, I] exactly as the model does (SiLU/GELU gating, GPT-OSS's
    clamped SwiGLU, a plain activation, ...). ``post_fn`` runs on the down projection's
    output before the routing weight (None for most families). ``prescale``: the
    routing weight multiplies the expert's input rows instead of its output (Llama-4:
    ``expert(w * x)``); the combine then only sums.
    """

    up_transposed: bool
    down_transposed: bool
    gate_fn: Callable[[torch.Tensor], torch.Tensor]
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    prescale: bool = False


class SplitGate:
    """The gating of a family with separate gate and up weights (DBRX): the up
    projection's output is ``cat([x @ gate.T, x @ up.T], -1)``; ``fn(gate_out, up_out)``
    is the two-input function extracted from the graph, ``split`` the gate's width."""

    def __init__(self, fn: Callable, split: int):
        self.fn, self.split = fn, split

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h[..., :self.split], h[..., self.split:])


class ExpertList:
    """The experts of one projection kept as E separate tensors (a ModuleDict of Linear
    layers: Switch Transformers), addressed like one ``[E, ...]`` tensor: ``x[e]`` is
    expert e's tensor, ``shape`` is ``(E, *expert_shape)``."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        if not self.tensors:
            raise ValueError("ExpertList needs at least one expert tensor")
        first = self.tensors[0]
        for i, t in enumerate(self.tensors):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"expert {i}: {tuple(t.shape)} {t.dtype} on {t.device}, expert 0: "
                                 f"{tuple(first.shape)} {first.dtype} on {first.device}")

    def __getitem__(self, e):
        if isinstance(e, slice):
            return ExpertList(self.tensors[e])
        return self.tensors[int(e)]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.tensors), *self.tensors[0].shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def is_cuda(self) -> bool:
        return self.tensors[0].is_cuda

    def dim(self) -> int:
        return self.tensors[0].dim() + 1

    def detach(self) -> "ExpertList":
        return ExpertList(t.detach() for t in self.tensors)


@dataclass
class LayerPlan:
    """One rewritten MoE layer as the engine runs it."""

    layer: int
    num_experts: int
    top_k: int
    hidden_size: int
    math: ExpertMath
    rows_dtype: torch.dtype          # dtype of the down projection's output rows
    out_features: int                # hidden size of the expert output
    has_up_bias: bool = False
    has_down_bias: bool = False
    has_up2: bool = False            # separate gate and up weights (``up`` = gate, ``up2`` = up)
    views: tuple = ()                # ((name, [E, N, K]), ...): 2-D parameters viewed per expert

    def viewed(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` with the expert axis first, as the math expects it."""
        for n, shape in self.views:
            if n == name and t is not None:
                return t.view(shape)
        return t


# Where a layer number sits in a name, tried in this order on each name: Dynamo's
# placeholder names (``L_self_modules_model_modules_layers_modules_3_...``, older
# ``L__self___model_layers_3_...``), dotted module paths (``model.layers.3.mlp``,
# ``transformer.h.3``, ``blocks.3``), then any module-list index (``.3.``).
_LAYER_IN_NAME = (
    re.compile(r"(?:^|[._])(?:layers?|blocks?|h)(?:_modules)?_(\d+)_"),
    re.compile(r"(?:^|\.)(?:layers?|blocks?|h)\.(\d+)(?:\.|$)"),
    re.compile(r"\.(\d+)\."),
)


def layer_index(*names: str) -> int | None:
    """The layer number in the first of ``names`` that carries one (the leftmost
    ``layers.N`` / ``blocks.N`` / ``h.N`` of a module path or Dynamo placeholder name),
    None if none does. The one rule for the matcher, the loader and the routing traces."""
    for name in names:
        for pattern in _LAYER_IN_NAME:
            m = pattern.search(str(name))
            if m:
                return int(m.group(1))
    return None


def unwrap_compiled(model):
    """The module behind ``model``: what ``torch.compile(module)`` wrapped (its
    ``OptimizedModule._orig_mod``), else ``model`` itself."""
    return getattr(model, "_orig_mod", model)
