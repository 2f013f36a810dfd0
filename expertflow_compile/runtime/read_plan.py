"""Per-expert read programs: how ONE expert's tensor is made from checkpoint bytes.

The disk tier (:class:`~expertflow_compile.runtime.store.SafetensorsExpertStore`) reads
one expert at a time. What it reads for expert ``e`` of a tensor is a small tree of
immutable nodes, built once at load time (by the loader, from transformers' own
conversion rules for the family, see :mod:`expertflow_compile.loading.convert`):

* :class:`FileSlice` - bytes ``[offset, offset + nbytes)`` of a safetensors file,
  viewed as ``shape`` / ``dtype`` (a per-expert tensor, or row ``e`` of a fused one);
* :class:`Stack` - ``torch.stack(parts)`` along a new dim 0;
* :class:`Cat` - ``torch.cat(parts, dim)`` (gate and up pieces into ``gate_up_proj``);
* :class:`Transpose` - ``x.transpose(dim0, dim1)``;
* :class:`Narrow` - ``x.narrow(dim, start, length)`` (one chunk of a fused tensor);
* :class:`Interleave` - transformers' ``Interleave`` op (de-interleave along ``dim``).

Invariants:

* every node is purely structural: each output element is exactly one input element,
  so a program applied to a quantized checkpoint's raw data and (scaled to block units)
  to its block scales commutes with block dequantization, provided blocks do not
  straddle a cut (the loader checks that before it builds such a pair);
* every node knows its ``shape`` and ``dtype`` (``None`` when the parts of a
  :class:`Cat` differ); :func:`write_into` converts to the destination's dtype exactly
  like ``Tensor.to`` (``copy_``), which is what transformers does when it materializes
  a checkpoint tensor in the parameter's dtype before its conversion ops;
* :func:`write_into` reads straight into the destination's memory where it can (a
  :class:`FileSlice` into a contiguous CPU destination of its dtype, a :class:`Cat`
  along dim 0 into contiguous row ranges); anything else goes through one small
  temporary of one expert's piece.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Node", "FileSlice", "Stack", "Cat", "Transpose", "Narrow", "Interleave", "narrow", "write_into",
           "materialize", "files_of", "slices_of", "describe"]

#: reader(file, writable byte view, absolute offset): fill the view from the file
Reader = Callable[[str, memoryview, int], None]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Node:
    """A per-expert read program (see the module docstring)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None

    def children(self) -> tuple["Node", ...]:
        return ()


@dataclass(frozen=True)
class FileSlice(Node):
    """``nbytes`` bytes of ``file`` at absolute ``offset``, viewed as ``shape`` / ``dtype``.
    ``key`` is the checkpoint tensor the bytes belong to (for messages)."""

    file: str
    key: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self):
        want = math.prod(self.shape) * _itemsize(self.dtype)
        if want != self.nbytes:
            raise ValueError(f"FileSlice of {self.key!r} in {self.file}: {self.nbytes} bytes cannot be viewed as "
                             f"{self.dtype} {list(self.shape)} ({want} bytes)")

    def row(self, start: int, length: int) -> "FileSlice":
        """Rows ``[start, start + length)`` along dim 0 (still one contiguous byte range)."""
        if not self.shape or not 0 <= start <= start + length <= self.shape[0]:
            raise ValueError(f"rows [{start}, {start + length}) out of range for {self.key!r} {list(self.shape)}")
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        return FileSlice(self.file, self.key, self.offset + start * row_bytes, length * row_bytes,
                         (length, *self.shape[1:]), self.dtype)


@dataclass(frozen=True)
class Stack(Node):
    parts: tuple[Node, ...]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("Stack needs at least one part")
        first = self.parts[0].shape
        for p in self.parts[1:]:
            if p.shape != first:
                raise ValueError(f"Stack of parts with different shapes: {list(first)} and {list(p.shape)} "
                                 f"({describe(p)})")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {p.dtype for p in self.parts}
        return dts.pop() if len(dts) == 1 else None

    def children(self):
        return self.parts


@dataclass(frozen=True)
class Cat(Node):
    dim: int
    parts: tuple[Node, ...]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("Cat needs at least one part")
        first = self.parts[0].shape
        d = self.dim
        if not 0 <= d < len(first):
            raise ValueError(f"Cat along dim {d} of {len(first)}-D parts")
        for p in self.parts[1:]:
            if len(p.shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(p.shape, first)) if i != d):
                raise ValueError(f"Cat along dim {d}: part shapes {[list(q.shape) for q in self.parts]} differ "
                                 "outside that dim")

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.parts[0].shape)
        s[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(s)

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {p.dtype for p in self.parts}
        return dts.pop() if len(dts) == 1 else None

    def children(self):
        return self.parts


@dataclass(frozen=True)
class Transpose(Node):
    dim0: int
    dim1: int
    x: Node

    def __post_init__(self):
        n = len(self.x.shape)
        if not (0 <= self.dim0 < n and 0 <= self.dim1 < n):
            raise ValueError(f"Transpose({self.dim0}, {self.dim1}) of a {n}-D tensor")

    @property
    def shape(self):
        s = list(self.x.shape)
        s[self.dim0], s[self.dim1] = s[self.dim1], s[self.dim0]
        return tuple(s)

    @property
    def dtype(self):
        return self.x.dtype

    def children(self):
        return (self.x,)


@dataclass(frozen=True)
class Narrow(Node):
    dim: int
    start: int
    length: int
    x: Node

    def __post_init__(self):
        s = self.x.shape
        if not 0 <= self.dim < len(s) or not 0 <= self.start <= self.start + self.length <= s[self.dim]:
            raise ValueError(f"Narrow(dim={self.dim}, start={self.start}, length={self.length}) of {list(s)}")

    @property
    def shape(self):
        s = list(self.x.shape)
        s[self.dim] = self.length
        return tuple(s)

    @property
    def dtype(self):
        return self.x.dtype

    def children(self):
        return (self.x,)


@dataclass(frozen=True)
class Interleave(Node):
    """transformers' ``Interleave(dim, inverse)``: split ``dim`` into ``(n/2, 2)`` (inverse:
    ``(2, n/2)``), swap the two, merge back."""

    dim: int
    inverse: bool
    x: Node

    def __post_init__(self):
        s = self.x.shape
        if not 0 <= self.dim < len(s) or s[self.dim] % 2:
            raise ValueError(f"Interleave(dim={self.dim}) of {list(s)}: needs an even size along dim")

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    def children(self):
        return (self.x,)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        n = shape[self.dim]
        shape[self.dim:self.dim + 1] = [2, n // 2] if self.inverse else [n // 2, 2]
        return t.reshape(shape).transpose(self.dim, self.dim + 1).reshape(t.shape)


def narrow(x: Node, dim: int, start: int, length: int) -> Node:
    """``Narrow`` simplified: rows of a :class:`FileSlice` stay one byte range."""
    if dim == 0 and isinstance(x, FileSlice):
        return x.row(start, length)
    if start == 0 and length == x.shape[dim]:
        return x
    return Narrow(dim, start, length, x)


# --------------------------------------------------------------------------- evaluation


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def materialize(node: Node, read: Reader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh CPU tensor holding ``node`` (in ``dtype``, default the node's own)."""
    dt = dtype or node.dtype
    if dt is None:
        raise ValueError(f"{describe(node)} mixes dtypes: give the destination dtype")
    out = torch.empty(node.shape, dtype=dt)
    write_into(node, out, read)
    return out


def write_into(node: Node, dest: torch.Tensor, read: Reader) -> None:
    """Fill ``dest`` (shape ``node.shape``, any dtype, any strides) with ``node``'s values."""
    if tuple(dest.shape) != tuple(node.shape):
        raise ValueError(f"{describe(node)} has shape {list(node.shape)}, the destination {list(dest.shape)}")
    if isinstance(node, FileSlice):
        if node.nbytes == 0:
            return
        if dest.dtype == node.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            read(node.file, _bytes_view(dest), node.offset)   # straight into the destination
            return
        tmp = torch.empty(node.shape, dtype=node.dtype)
        read(node.file, _bytes_view(tmp), node.offset)
        with torch.no_grad():
            dest.copy_(tmp)
        return
    if isinstance(node, Stack):
        for i, p in enumerate(node.parts):
            write_into(p, dest[i], read)
        return
    if isinstance(node, Cat):
        off = 0
        for p in node.parts:
            n = p.shape[node.dim]
            write_into(p, dest.narrow(node.dim, off, n), read)
            off += n
        return
    if isinstance(node, Transpose):
        write_into(node.x, dest.transpose(node.dim0, node.dim1), read)
        return
    if isinstance(node, Narrow):
        tmp = materialize(node.x, read, node.x.dtype or dest.dtype)
        with torch.no_grad():
            dest.copy_(tmp.narrow(node.dim, node.start, node.length))
        return
    if isinstance(node, Interleave):
        tmp = materialize(node.x, read, node.x.dtype or dest.dtype)
        with torch.no_grad():
            dest.copy_(node.apply(tmp))
        return
    raise TypeError(f"not a read-program node: {type(node).__name__}")


def slices_of(node: Node) -> Iterator[FileSlice]:
    """Every :class:`FileSlice` the program reads, in order."""
    if isinstance(node, FileSlice):
        yield node
    for c in node.children():
        yield from slices_of(c)


def files_of(node: Node) -> set[str]:
    return {s.file for s in slices_of(node)}


def describe(node: Node) -> str:
    """A one-line description naming the checkpoint tensors (for messages)."""
    keys = list(dict.fromkeys(f"{s.key!r} in {s.file}" for s in slices_of(node)))
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
