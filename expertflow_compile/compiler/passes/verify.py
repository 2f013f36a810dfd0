"""Compile-time self-check: each rewrite must reproduce the block it replaces.

The original graph is interpreted once on the real first inputs (inputs it mutates
are cloned first, so running it has no side effects), capturing each block's
(hidden, ids, weights, output). The replacement math then runs on the captured
inputs and must match the captured output within the dtype's tolerance; a block that
does not is left untouched and reported. This is the guarantee behind "a block we
cannot match with certainty is left as it was": structure finds the candidates, the
numbers confirm them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ...kernels.reference import grouped_experts_reference
from .match import MoEBlock

__all__ = ["BlockCheck", "check_blocks", "tolerance"]


@dataclass
class BlockCheck:
    ok: bool
    max_abs_diff: float
    tolerance: float
    note: str = ""


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """Allowed max abs difference for an output of magnitude ``scale``."""
    rel = {torch.float32: 1e-5, torch.float64: 1e-9}.get(dtype, 2 ** -6)
    return rel * max(scale, 1e-6)


class _Capture(fx.Interpreter):
    def __init__(self, gm, wanted: set[fx.Node]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out.detach() if isinstance(out, torch.Tensor) else out
        return out


def _real(x) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type != "meta"


def _concrete(x):
    """A private copy of an input for the check run: real ints for SymInts, clones of
    non-parameter tensors (the graph may mutate them, e.g. a static KV cache)."""
    if isinstance(x, torch.SymInt):
        hint = x.node.hint if x.node.has_hint() else None
        if hint is None:
            raise _Unverifiable("a symbolic size without a hint")
        return int(hint)
    if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
        return x.clone()
    return x


class _Unverifiable(Exception):
    pass


def check_blocks(
    gm: fx.GraphModule, example_inputs: list, blocks: list[MoEBlock], placeholder_values: dict
) -> dict[int, BlockCheck]:
    """Check every block; returns {index in ``blocks``: BlockCheck}."""
    if not blocks:
        return {}
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not all(_real(x) for x in tensors):
        return {i: BlockCheck(True, 0.0, 0.0, "not verified: inputs are not real tensors") for i in range(len(blocks))}
    for i, b in enumerate(blocks):
        for p in b.params():
            t = placeholder_values.get(p)
            if t is not None and t.numel() > 1 and all(s == 0 for s in t.stride()):   # any dim (DBRX: 2-D)
                return {i: BlockCheck(True, 0.0, 0.0, "not verified: expert weights are offloaded placeholders")
                        for i in range(len(blocks))}
    try:
        inputs = [_concrete(x) for x in example_inputs]
    except _Unverifiable as exc:
        return {i: BlockCheck(True, 0.0, 0.0, f"not verified: {exc}") for i in range(len(blocks))}
    wanted = {n for b in blocks for n in (b.hidden, b.topk_ids, b.topk_weights, b.output)}
    cap = _Capture(gm, wanted)
    with torch.no_grad():
        cap.run(*inputs)
    results = {}
    from ..ops import permute

    for i, b in enumerate(blocks):
        v = cap.values
        if b.output not in v:
            results[i] = BlockCheck(False, float("inf"), 0.0, "the block's output was not computed")
            continue
        hidden, ids, wts, ref = v[b.hidden], v[b.topk_ids], v[b.topk_weights], v[b.output]
        up, down, bu, bd, up2 = b.tensors(placeholder_values, viewed=True)

        def weights_of(e, up=up, down=down, bu=bu, bd=bd, up2=up2):
            return {"up": up[e], "down": down[e], "up_bias": None if bu is None else bu[e],
                    "down_bias": None if bd is None else bd[e], "up2": None if up2 is None else up2[e]}

        with torch.no_grad():
            order, offsets = permute(ids, b.num_experts)
            try:
                ours = grouped_experts_reference(hidden, wts, order, offsets.tolist(), weights_of, b.math,
                                                 b.out_features, b.rows_dtype)
            except Exception as exc:  # the recovered math does not even run: not this block
                results[i] = BlockCheck(False, float("inf"), 0.0, f"replacement failed to run: {exc}")
                continue
        if ours.shape != ref.shape or ours.dtype != ref.dtype:
            results[i] = BlockCheck(False, float("inf"), 0.0,
                                    f"replacement gives {tuple(ours.shape)} {ours.dtype}, graph gives "
                                    f"{tuple(ref.shape)} {ref.dtype}")
            continue
        diff = (ours.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
        tol = tolerance(ref.dtype, ref.float().abs().max().item() if ref.numel() else 1.0)
        ok = diff <= tol
        results[i] = BlockCheck(ok, diff, tol, "" if ok else "replacement disagrees with the original block")
    return results
