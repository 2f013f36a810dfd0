"""A host tier of stacked CPU tensors that can fill many cache slots in one call.

:class:`StackedTensorStore` holds, per MoE layer, ``{name: [E, ...]}`` CPU tensors (the
model's own parameters, by reference, as :class:`~expertflow_compile.runtime.store.TensorExpertStore`
keeps them) and adds :meth:`StackedTensorStore.read_many`: the experts of one layer call
copied into their slots with one gather and one scatter per tensor name, instead of one
``read_into`` (validation and a copy per tensor) per expert. The cache uses ``read_many``
whenever a store has it (``ExpertCache`` docstring); wrappers that do not forward it (fault
injection, an emulated link) keep the per-expert reads.

Only plain CPU tensors: the engine uses ``TensorExpertStore`` for everything else (CUDA
tensors copied to pinned memory, per-expert tensor lists).
"""

from __future__ import annotations

import torch

from .store import ExpertSpec, ExpertStore

__all__ = ["StackedTensorStore"]

_FEW = 16   # experts per read_many call up to which they are copied view to view (one _foreach_copy_)


class StackedTensorStore(ExpertStore):
    """Experts from stacked CPU tensors (see the module docstring)."""

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]]):
        specs, kept = {}, {}
        for layer, tensors in layers.items():
            if not tensors:
                raise ValueError(f"layer {layer}: no expert tensors given")
            first = next(iter(tensors.values()))
            for name, t in tensors.items():
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dim() < 1:
                    raise ValueError(f"layer {layer} tensor {name!r}: expected a CPU tensor with an expert axis")
                if t.shape[0] != first.shape[0] or t.dtype != first.dtype:
                    raise ValueError(f"layer {layer}: tensor {name!r} is {tuple(t.shape)} {t.dtype}; the layer's "
                                     f"other tensors have {first.shape[0]} experts of {first.dtype}")
            kept[int(layer)] = {name: t.detach() for name, t in tensors.items()}
            specs[int(layer)] = ExpertSpec(int(first.shape[0]), {n: tuple(t.shape[1:]) for n, t in tensors.items()},
                                           first.dtype)
        self.specs = specs
        self._tensors = kept
        self._per_expert: dict[int, dict[str, tuple]] = {}   # layer -> {name: its experts' views}

    def read_into(self, layer: int, expert: int, out) -> None:
        self._check_key(layer, expert)
        for name, views in self._views(layer).items():   # detached tensors: nothing to record
            out[name].copy_(views[expert])

    def _views(self, layer: int) -> dict[str, tuple]:
        """``{name: per-expert views}`` of ``layer`` (made once)."""
        per = self._per_expert.get(layer)
        if per is None:
            per = self._per_expert[layer] = {name: t.unbind(0) for name, t in self._tensors[layer].items()}
        return per

    def read_many(self, layer: int, experts: list[int], out: dict[str, torch.Tensor], rows: list[int],
                  out_rows: dict[str, tuple] | None = None) -> None:
        """``out[name][rows[i]] = expert experts[i]'s tensor`` for every name: ``out`` holds
        ``[S, *shape]`` tensors (the cache's pool viewed in this layer's layout; ``out_rows``,
        when given, the same as per-row views made once). A few experts (a decode step) are
        copied from per-expert views made once per layer, in one ``_foreach_copy_`` (cheaper than
        building index tensors); more, with one gather and one scatter per name."""
        spec = self._check_key(layer, max(experts))
        if min(experts) < 0:
            raise IndexError(f"expert {min(experts)} out of range for layer {layer} ({spec.num_experts} experts)")
        if len(experts) <= _FEW:
            dsts, srcs = [], []
            for name, views in self._views(layer).items():
                dst = out[name] if out_rows is None else out_rows[name]
                dsts += [dst[r] for r in rows]
                srcs += [views[e] for e in experts]
            torch._foreach_copy_(dsts, srcs)   # one dispatch for every copy of the call
            return
        src_idx = torch.tensor(experts, dtype=torch.int64)
        dst_idx = torch.tensor(rows, dtype=torch.int64)
        for name, t in self._tensors[layer].items():
            out[name].index_copy_(0, dst_idx, t.index_select(0, src_idx))

    def close(self) -> None:
        self._tensors = {}
        self._per_expert = {}
