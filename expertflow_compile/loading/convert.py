"""Experts through transformers' own conversion rules, one expert at a time.

transformers 5 turns checkpoint tensors into model parameters with per-family
``WeightConverter`` chains (``conversion_mapping.py``: ``MergeModulelist`` stacks the
per-expert tensors, ``Concatenate`` joins gate and up, ``Transpose``, ``Chunk``,
``Split``, ``Interleave``) and, for pre-quantized checkpoints, its quantizers' load ops
(``Fp8Dequantize`` for block-FP8, ``Mxfp4Dequantize`` for GPT-OSS's MXFP4), all
applied to whole ``[E, ...]`` tensors at load time. Here the SAME chain (the converter
instance transformers built for the parameter, with its operations in order) is run
symbolically, on read-program nodes instead of tensors
(:mod:`expertflow_compile.runtime.read_plan`: each op becomes the node of the torch op
it performs, a dequantize op a :class:`Dequant` node), which gives the parameter as a
program over checkpoint bytes. Expert ``e``'s tensor is then that program with "row e"
pushed down to the leaves (:func:`select` / :func:`rows`): it reads only expert e's
bytes. Finally a :class:`Dequant` is hoisted to the root (:func:`hoist`): the structural
steps are applied to the compressed data and, in block units, to its scales, which is
exact because every step moves whole blocks (checked; refused otherwise), so the cache
holds the expert compressed and it is dequantized when it computes.

Invariants: the per-expert programs reproduce transformers' parameter bit for bit (each
op node performs the op's torch call; ``Dequant`` is transformers' arithmetic, see
:mod:`expertflow_compile.kernels.dequant`); an op, a quantization format or a layout
that cannot be applied per expert is refused with a :class:`ConversionRefused` naming
the op (or format), the parameter and the checkpoint tensor and file - never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..runtime.read_plan import Cat, FileSlice, Interleave, Narrow, Node, Stack, Transpose, describe, narrow, slices_of

__all__ = ["ConversionRefused", "Dequant", "OpContext", "run_converter", "select", "rows", "hoist", "star_regex",
           "whole"]


class ConversionRefused(ValueError):
    """A checkpoint's expert tensors cannot be served per expert (the message says why)."""


@dataclass(frozen=True)
class Dequant(Node):
    """A quantized tensor: ``fmt`` ``"fp8"`` (``data`` FP8 ``[..., N, K]``, ``scale`` the
    per-block scales ``[..., N/bn, K/bk]``) or ``"mxfp4"`` (``data`` blocks ``[..., N, G, B]``
    uint8, ``scale`` ``[..., N, G]`` uint8; the result is transposed: ``[..., 2GB, N]``),
    dequantized to ``out_dtype``. Symbolic: the store never reads one (see :func:`hoist`)."""

    fmt: str
    data: Node
    scale: Node
    out_dtype: torch.dtype

    @property
    def shape(self):
        if self.fmt == "fp8":
            return self.data.shape
        *prefix, n, g, b = self.data.shape
        return (*prefix, g * b * 2, n)

    @property
    def dtype(self):
        return self.out_dtype

    def children(self):
        return (self.data, self.scale)

    def block(self) -> tuple[int, int]:
        """FP8 block (rows, cols), as transformers derives it from the scale grid."""
        (r, c), s = self.data.shape[-2:], self.scale.shape
        sr, sc = (s[-2], s[-1]) if len(s) >= 2 else (1, 1)
        return r // sr, c // sc


# --------------------------------------------------------------------------- per-expert slicing


def _refuse(node: Node, why: str):
    raise ConversionRefused(f"{why} (checkpoint tensors: {describe(node)})")


def select(node: Node, i: int) -> Node:
    """Expert ``i`` of ``node`` along dim 0, that axis removed, reading only its bytes."""
    if isinstance(node, FileSlice):
        r = node.row(i, 1)
        return FileSlice(r.file, r.key, r.offset, r.nbytes, node.shape[1:], node.dtype)
    if isinstance(node, Stack):
        return node.parts[i]
    if isinstance(node, Cat):
        if node.dim >= 1:
            return Cat(node.dim - 1, tuple(select(p, i) for p in node.parts))
        off = 0
        for p in node.parts:
            if i < off + p.shape[0]:
                return select(p, i - off)
            off += p.shape[0]
        raise IndexError(i)
    if isinstance(node, Transpose):
        if 0 in (node.dim0, node.dim1):
            _refuse(node, "a conversion step transposes the expert axis")
        return Transpose(node.dim0 - 1, node.dim1 - 1, select(node.x, i))
    if isinstance(node, Narrow):
        if node.dim == 0:
            return select(node.x, node.start + i)
        return narrow(select(node.x, i), node.dim - 1, node.start, node.length)
    if isinstance(node, Interleave):
        if node.dim == 0:
            _refuse(node, "a conversion step interleaves along the expert axis")
        return Interleave(node.dim - 1, node.inverse, select(node.x, i))
    if isinstance(node, Dequant):
        lead = 3 if node.fmt == "mxfp4" else 2
        if len(node.data.shape) <= lead or node.scale.shape[:1] != node.data.shape[:1]:
            _refuse(node, f"{node.fmt} data {list(node.data.shape)} has no expert axis of its own")
        return Dequant(node.fmt, select(node.data, i), select(node.scale, i), node.out_dtype)
    raise TypeError(type(node).__name__)


def rows(node: Node, start: int, length: int) -> Node:
    """Rows ``[start, start + length)`` of ``node`` along dim 0 (a 2-D ``[E * N, K]``
    parameter's expert is a block of rows), reading only those bytes."""
    if isinstance(node, FileSlice):
        return node.row(start, length)
    if isinstance(node, Stack):
        return Stack(node.parts[start:start + length])
    if isinstance(node, Cat):
        if node.dim >= 1:
            return Cat(node.dim, tuple(rows(p, start, length) for p in node.parts))
        out, off = [], 0
        for p in node.parts:
            lo, hi = max(start, off), min(start + length, off + p.shape[0])
            if lo < hi:
                out.append(rows(p, lo - off, hi - lo))
            off += p.shape[0]
        return out[0] if len(out) == 1 else Cat(0, tuple(out))
    if isinstance(node, Transpose):
        if 0 in (node.dim0, node.dim1):
            _refuse(node, "a conversion step transposes the expert axis")
        return Transpose(node.dim0, node.dim1, rows(node.x, start, length))
    if isinstance(node, Narrow):
        if node.dim == 0:
            return rows(node.x, node.start + start, length)
        return Narrow(node.dim, node.start, node.length, rows(node.x, start, length))
    if isinstance(node, Interleave):
        if node.dim == 0:
            _refuse(node, "a conversion step interleaves along the expert axis")
        return Interleave(node.dim, node.inverse, rows(node.x, start, length))
    if isinstance(node, Dequant):
        if node.fmt != "fp8" or len(node.data.shape) != 2:
            _refuse(node, f"rows of a {len(node.data.shape)}-D {node.fmt} tensor")
        bm, _ = node.block()
        if start % bm or length % bm:
            _refuse(node, f"an expert's rows [{start}, {start + length}) cut FP8 blocks of {bm} rows")
        return Dequant("fp8", rows(node.data, start, length), rows(node.scale, start // bm, length // bm),
                       node.out_dtype)
    raise TypeError(type(node).__name__)


def _has_dequant(node: Node) -> bool:
    return isinstance(node, Dequant) or any(_has_dequant(c) for c in node.children())


def hoist(node: Node) -> Node:
    """``node`` with its dequantization moved to the root: a plain program, or
    ``Dequant(fmt, data_program, scale_program)`` whose programs hold no Dequant."""
    if isinstance(node, FileSlice):
        return node
    if isinstance(node, Dequant):
        if _has_dequant(node.data) or _has_dequant(node.scale):
            _refuse(node, "a tensor dequantized twice")
        return node
    kids = [hoist(c) for c in node.children()]
    quant = [k for k in kids if isinstance(k, Dequant)]
    if not quant:
        return _rebuild(node, kids)
    if len(quant) != len(kids):
        _refuse(node, "a conversion step mixes quantized and unquantized checkpoint tensors")
    fmt, dt = quant[0].fmt, quant[0].out_dtype
    if fmt != "fp8":
        _refuse(node, f"transformers applies a {type(node).__name__} step after dequantizing {fmt}; expertflow "
                      f"keeps {fmt} experts compressed and applies no step to them")
    if any(q.fmt != fmt or q.out_dtype != dt or q.block() != quant[0].block() for q in quant):
        _refuse(node, "FP8 parts with different block sizes are joined")
    if any(len(q.data.shape) != 2 for q in quant):
        _refuse(node, "a conversion step on a batched FP8 tensor")
    bm, bn = quant[0].block()
    block = (bm, bn)
    if isinstance(node, (Cat, Transpose)):
        return Dequant(fmt, _rebuild(node, [q.data for q in quant]), _rebuild(node, [q.scale for q in quant]), dt)
    if isinstance(node, Narrow):
        b = block[node.dim]
        if node.start % b or node.length % b:
            _refuse(node, f"a conversion step cuts FP8 blocks of {b} along dim {node.dim}")
        return Dequant(fmt, _rebuild(node, [quant[0].data]),
                       Narrow(node.dim, node.start // b, node.length // b, quant[0].scale), dt)
    if isinstance(node, Interleave) and block[node.dim] == 1:
        return Dequant(fmt, _rebuild(node, [quant[0].data]), _rebuild(node, [quant[0].scale]), dt)
    _refuse(node, f"a {type(node).__name__} step cannot be applied to FP8 blocks of {block[0]}x{block[1]}")


def _rebuild(node: Node, kids: list[Node]) -> Node:
    if isinstance(node, Cat):
        return Cat(node.dim, tuple(kids))
    if isinstance(node, Stack):
        return Stack(tuple(kids))
    if isinstance(node, Transpose):
        return Transpose(node.dim0, node.dim1, kids[0])
    if isinstance(node, Narrow):
        return Narrow(node.dim, node.start, node.length, kids[0])
    if isinstance(node, Interleave):
        return Interleave(node.dim, node.inverse, kids[0])
    raise TypeError(type(node).__name__)


# --------------------------------------------------------------------------- transformers' ops


def star_regex(pattern: str) -> re.Pattern:
    """A converter source pattern (``mlp.experts.*.gate_proj.weight``) with its ``*``
    capturing the expert index."""
    return re.compile(pattern.replace("*", r"(\d+)", 1))


@dataclass
class OpContext:
    """What an op may look at besides its input (as transformers' ``convert`` kwargs)."""

    model: torch.nn.Module
    config: object
    layer_name: str                      # the converter's first target parameter (full name)
    source_patterns: list[str]
    target_patterns: list[str]
    expert_index: Callable[[str], int | None]   # checkpoint key -> its '*' expert index


def _first(value):
    return value[0] if isinstance(value, list) else value


def _param(ctx: OpContext, name: str) -> torch.Tensor:
    try:
        return ctx.model.get_parameter(name)
    except AttributeError:
        raise ConversionRefused(f"transformers' conversion targets {name!r}, which is not a parameter of "
                                f"{type(ctx.model).__name__}") from None


def _merge(op, d, ctx):
    if op.dim != 0:
        raise ConversionRefused(f"MergeModulelist(dim={op.dim}) for {ctx.layer_name}: only dim 0 stacks experts")
    size, out = len(d), {}
    for pattern in list(d):
        tensors = d.pop(pattern)
        if size == 1:
            if len(ctx.target_patterns) != 1:
                raise ConversionRefused(f"MergeModulelist with {len(ctx.target_patterns)} targets for "
                                        f"{ctx.layer_name}")
            target = ctx.target_patterns[0]
        else:
            target = pattern
        if isinstance(tensors, Node):
            out[target] = tensors
            continue
        _check_expert_order(tensors, ctx)
        out[target] = Stack(tuple(tensors))
    return out


def _check_expert_order(tensors: list[Node], ctx: OpContext) -> None:
    """The merged list must be experts 0, 1, ..., n-1 (transformers stacks them in key order),
    n no more than the parameter's experts, each of one shape."""
    limit = _param(ctx, ctx.layer_name).shape[0]
    if len(tensors) > limit:
        extra = next(slices_of(tensors[limit]))
        raise ConversionRefused(
            f"checkpoint tensor {extra.key!r} in {extra.file} is expert {limit} of {ctx.layer_name}, but the config "
            f"has {limit} experts (0..{limit - 1}); the checkpoint has {len(tensors)}")
    for t in tensors[1:]:
        if t.shape != tensors[0].shape:
            odd = next(slices_of(t))
            raise ConversionRefused(
                f"checkpoint tensor {odd.key!r} in {odd.file} has shape {list(t.shape)}, the other experts' "
                f"{list(tensors[0].shape)} ({ctx.layer_name})")
    for pos, t in enumerate(tensors):
        key = next(slices_of(t)).key
        idx = ctx.expert_index(key)
        if idx is not None and idx != pos:
            first = next(slices_of(t))
            if idx > pos:
                raise ConversionRefused(
                    f"checkpoint has no tensor for expert {pos} of {ctx.layer_name}: after expert {pos - 1} the "
                    f"next one is {key!r} in {first.file} (expert {idx})")
            raise ConversionRefused(f"checkpoint tensor {key!r} in {first.file} repeats expert {idx} of "
                                    f"{ctx.layer_name}")


def _concatenate(op, d, ctx):
    if len(ctx.target_patterns) > 1:
        raise ConversionRefused(f"Concatenate with several targets for {ctx.layer_name}")
    parts = []
    for sp in ctx.source_patterns:
        if sp not in d:
            continue
        t = d.pop(sp)
        parts.extend(t if isinstance(t, list) else [t])
    dim = op.dim % len(parts[0].shape)
    try:
        return {ctx.target_patterns[0]: parts[0] if len(parts) == 1 else Cat(dim, tuple(parts))}
    except ValueError as exc:
        raise ConversionRefused(f"transformers concatenates {' and '.join(describe(p) for p in parts)} into "
                                f"{ctx.layer_name}, but their shapes {[list(p.shape) for p in parts]} do not join "
                                f"along dim {dim} ({exc})") from None


def _chunk(op, d, ctx):
    if len(d) > 1:
        raise ConversionRefused(f"Chunk over {len(d)} inputs for {ctx.layer_name}")
    t = _first(next(iter(d.values())))
    targets = op.get_target_patterns(ctx.target_patterns, config=ctx.config)
    dim = op.dim % len(t.shape)
    sizes = [c.shape[dim] for c in torch.empty(t.shape, device="meta").chunk(len(targets), dim=dim)]
    out, off = {}, 0
    for target, n in zip(targets, sizes):
        out[target] = narrow(t, dim, off, n)
        off += n
    return out


def _split(op, d, ctx):
    if len(d) > 1:
        raise ConversionRefused(f"Split over {len(d)} inputs for {ctx.layer_name}")
    t = _first(next(iter(d.values())))
    dim = op.dim % len(t.shape)
    out, off = {}, 0
    for target in ctx.target_patterns:
        n = _param(ctx, ctx.layer_name.replace(ctx.target_patterns[0], target)).shape[dim]
        out[target] = narrow(t, dim, off, n)
        off += n
    return out


def _transpose(op, d, ctx):
    target = op.get_target_pattern(d, ctx.source_patterns, ctx.target_patterns)
    t = _first(next(iter(d.values())))
    if op.check_dims and tuple(t.shape) == tuple(_param(ctx, ctx.layer_name).shape):
        return {target: t}
    n = len(t.shape)
    return {target: Transpose(op.dim0 % n, op.dim1 % n, t)}


def _interleave(op, d, ctx):
    t = _first(next(iter(d.values())))
    return {ctx.target_patterns[0]: Interleave(op.dim % len(t.shape), bool(op.inverse), t)}


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _fp8_pair(w: Node, s: Node, dtype: torch.dtype, ctx: OpContext) -> Dequant:
    if w.dtype not in _FP8_DTYPES:
        what = "packed FP4 (two E2M1 values per int8)" if w.dtype == torch.int8 else str(w.dtype)
        raise ConversionRefused(f"FP8 checkpoint stores the experts of {ctx.layer_name} as {what} "
                                f"({describe(w)}): expertflow serves float8_e4m3fn/e5m2 block-FP8 experts")
    if s.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        raise ConversionRefused(f"FP8 scales of {ctx.layer_name} are {s.dtype} ({describe(s)}): expertflow "
                                "serves float32/bfloat16/float16 or UE8M0 (uint8) block scales")
    if len(w.shape) < 2:
        raise ConversionRefused(f"FP8 tensor {describe(w)} is {len(w.shape)}-D: block scales need 2 dims")
    (r, c), g = w.shape[-2:], s.shape[-2:] if len(s.shape) >= 2 else (1, 1)
    if r % g[0] or c % g[1]:
        raise ConversionRefused(f"FP8 tensor {describe(w)} of shape {list(w.shape)} is not divisible into its "
                                f"scale grid {list(s.shape)} ({describe(s)})")
    return Dequant("fp8", w, s, dtype)


def _fp8_dequantize(op, d, ctx):
    dtype = _param(ctx, ctx.layer_name).dtype
    if "weight" in d:
        w = _first(d["weight"])
        if "weight_scale_inv" in d:
            return {ctx.layer_name: _fp8_pair(w, _first(d["weight_scale_inv"]), dtype, ctx)}
        return {ctx.layer_name: w}
    out = {}
    for key, value in d.items():
        if "activation_scale" in key or "weight_scale_inv" in key:
            continue
        scale_key = f"{key}_scale_inv"
        if scale_key not in d:
            out[key] = value
            continue
        ws = value if isinstance(value, list) else [value]
        ss = d[scale_key] if isinstance(d[scale_key], list) else [d[scale_key]]
        if len(ws) != len(ss):
            raise ConversionRefused(f"checkpoint has {len(ws)} FP8 tensors but {len(ss)} scales for "
                                    f"{ctx.layer_name} ({describe(ws[0])}; {describe(ss[0])})")
        out[key] = [_fp8_pair(w, s, dtype, ctx) for w, s in zip(ws, ss)]
    return out


def _mxfp4_dequantize(op, d, ctx):
    proj = "gate_up_proj" if "gate_up_proj" in ctx.layer_name else "down_proj"
    blocks, scales = d.get(f"{proj}_blocks"), d.get(f"{proj}_scales")
    if blocks is None or scales is None:
        raise ConversionRefused(f"MXFP4 checkpoint lacks {proj}_blocks or {proj}_scales for {ctx.layer_name}")
    blocks, scales = _first(blocks), _first(scales)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ConversionRefused(f"MXFP4 tensors of {ctx.layer_name} are {blocks.dtype} {list(blocks.shape)} / "
                                f"{scales.dtype} {list(scales.shape)} ({describe(blocks)}): expected uint8 "
                                "blocks [..., N, G, 16] and uint8 scales [..., N, G]")
    return {ctx.layer_name: Dequant("mxfp4", blocks, scales, _param(ctx, ctx.layer_name).dtype)}


def _inkling2_loop_dequantize(op, d, ctx):
    if len(d) == 1:   # an unquantized checkpoint: the op passes its tensor through
        return {ctx.target_patterns[0]: _first(next(iter(d.values())))}
    raise ConversionRefused(f"the experts of {ctx.layer_name} are NVFP4/MXFP8-quantized (transformers' "
                            "Inkling2LoopDequantizeExperts): expertflow serves block-FP8 and MXFP4 experts")


_OPS = {
    "MergeModulelist": _merge,
    "Concatenate": _concatenate,
    "Chunk": _chunk,
    "Split": _split,
    "Transpose": _transpose,
    "Interleave": _interleave,
    "Fp8Dequantize": _fp8_dequantize,
    "Mxfp4Dequantize": _mxfp4_dequantize,
    "Inkling2LoopDequantizeExperts": _inkling2_loop_dequantize,
}


def run_converter(converter, collected: dict[str, list[Node]], ctx: OpContext) -> dict[str, Node]:
    """transformers' ``WeightConverter.convert`` for ``converter`` on symbolic inputs
    (``collected``: source pattern -> one node per checkpoint tensor, in transformers'
    order) -> {full parameter name: node of the whole parameter}."""
    d: dict = dict(collected)
    for op in converter.operations:
        fn = _OPS.get(type(op).__name__)
        if fn is None:
            raise ConversionRefused(
                f"transformers converts {ctx.layer_name} with {type(op).__name__}, which expertflow cannot apply one "
                f"expert at a time (it handles {', '.join(sorted(_OPS))})")
        d = fn(op, d, ctx)
    full = ctx.layer_name.replace("*.", "0.") if "*." in ctx.layer_name else ctx.layer_name
    key = next((k for k in d if k in full), None)
    if key is not None:   # the prefix/suffix rule of WeightConverter.convert
        prefix, _, suffix = full.partition(key)
        d = {prefix + k + suffix: v for k, v in d.items()}
    return {k: _first(v) for k, v in d.items()}


def whole(entry, key: str) -> FileSlice:
    """The checkpoint tensor ``key`` (a safetensors ``TensorEntry``) as a leaf node."""
    return FileSlice(entry.file, key, entry.begin, entry.end - entry.begin, tuple(entry.shape), entry.dtype)
