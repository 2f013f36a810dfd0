"""The host tier: where every expert's weights live when they are not cached.

An :class:`ExpertStore` maps ``(layer, expert)`` to that expert's tensors. The
cache (:mod:`expertflow_compile.runtime.cache`) asks it to fill preallocated
tensors (``read_into``), possibly from its prefetch worker thread, so every
store must be safe to read from several threads at once.

Two stores:

* :class:`TensorExpertStore` - the model's own expert parameters, already in
  memory. CPU tensors are referenced (no copy); CUDA tensors are copied once to
  pinned CPU memory so that the caller can free the device copies.
* :class:`SafetensorsExpertStore` - the checkpoint on disk, read on demand: the
  safetensors headers are parsed here (no whole-file load, no mmap of all
  experts) and each read fetches exactly one expert's byte range with
  ``os.preadv`` straight into the destination tensor's memory.

:class:`FaultInjectingStore` wraps a store and raises on chosen reads (tests).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..layer import ExpertList
from .read_plan import Cat, FileSlice, Node, Transpose, describe, slices_of, write_into

__all__ = [
    "ExpertSpec",
    "ExpertStore",
    "ExpertTensorSource",
    "FaultInjectingStore",
    "SafetensorsExpertStore",
    "TensorEntry",
    "TensorExpertStore",
    "TensorSource",
    "safetensors_index",
    "SAFETENSORS_DTYPES",
]

#: Byte alignment of each tensor inside a cache slot (see ExpertSpec.layout).
SLOT_ALIGN = 64

#: safetensors dtype strings -> torch dtypes (those this torch build has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
        ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ]
    if hasattr(torch, attr)
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _align(n: int, a: int = SLOT_ALIGN) -> int:
    return (n + a - 1) // a * a


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ExpertSpec:
    """The per-expert tensors of one MoE layer.

    ``shapes`` maps a tensor name (``"up"``, ``"down"``, ``"up_bias"`` ...) to the
    shape of ONE expert's tensor (the fused parameter's shape without its leading
    expert axis). ``dtype`` is the layer's compute dtype (the model parameters'), which
    every tensor has unless ``dtypes`` names another one for it: a quantized layer keeps
    its experts compressed (``up`` in ``float8_e4m3fn`` next to ``up_scale_inv`` in
    float32, or ``up_blocks`` / ``up_scales`` in ``uint8``; see
    :mod:`expertflow_compile.kernels.dequant`), so slots, budget and bytes moved count
    the compressed bytes.
    """

    num_experts: int
    shapes: dict[str, tuple[int, ...]] = field(hash=False)
    dtype: torch.dtype
    dtypes: dict[str, torch.dtype] | None = field(default=None, hash=False)

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"ExpertSpec.num_experts must be an int >= 1, got {self.num_experts!r}")
        if not self.shapes:
            raise ValueError("ExpertSpec.shapes is empty: an expert needs at least one tensor")
        norm = {}
        for name, shape in self.shapes.items():
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"ExpertSpec tensor {name!r} has a negative dimension: {shape}")
            norm[name] = shape
        object.__setattr__(self, "shapes", norm)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"ExpertSpec.dtype must be a torch.dtype, got {self.dtype!r}")
        own = {}
        for name, dt in (self.dtypes or {}).items():
            if name not in norm:
                raise ValueError(f"ExpertSpec.dtypes names {name!r}, which is not a tensor of the layer "
                                 f"({sorted(norm)})")
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"ExpertSpec.dtypes[{name!r}] must be a torch.dtype, got {dt!r}")
            if dt != self.dtype:
                own[name] = dt
        object.__setattr__(self, "dtypes", own)   # only the tensors whose dtype differs

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self.dtypes.get(name, self.dtype)

    @property
    def quantized(self) -> bool:
        """Whether the experts are held compressed (then only the torch path computes them)."""
        from ..kernels.dequant import is_quantized_name

        return any(is_quantized_name(n) for n in self.shapes)

    def tensor_nbytes(self, name: str) -> int:
        return _numel(self.shapes[name]) * _itemsize(self.tensor_dtype(name))

    def expert_nbytes(self) -> int:
        """Bytes of ONE expert: the sum of its tensors' sizes (no padding)."""
        return sum(self.tensor_nbytes(n) for n in self.shapes)

    def layout(self) -> tuple[tuple[str, int, tuple[int, ...], torch.dtype], ...]:
        """Where each tensor sits inside a cache slot: ``(name, byte offset, shape, dtype)``.

        Tensors are laid out in ``shapes`` order, each starting at a multiple of
        ``SLOT_ALIGN`` bytes, so a flat ``uint8`` slot can be viewed as any dtype.
        """
        out, off = [], 0
        for name, shape in self.shapes.items():
            off = _align(off)
            out.append((name, off, shape, self.tensor_dtype(name)))
            off += self.tensor_nbytes(name)
        return tuple(out)

    def slot_nbytes(self) -> int:
        """Bytes a cache slot needs to hold one expert of this layer (layout incl. alignment)."""
        name, off, _shape, _dtype = self.layout()[-1]
        return _align(off + self.tensor_nbytes(name))


def _check_out(spec: ExpertSpec, layer: int, out: Mapping[str, torch.Tensor]) -> None:
    if set(out) != set(spec.shapes):
        raise ValueError(f"read_into(layer={layer}): expected tensors {sorted(spec.shapes)}, got {sorted(out)}")
    for name, t in out.items():
        if tuple(t.shape) != spec.shapes[name] or t.dtype != spec.tensor_dtype(name):
            raise ValueError(
                f"read_into(layer={layer}): tensor {name!r} must be {spec.shapes[name]} {spec.tensor_dtype(name)}, "
                f"got {tuple(t.shape)} {t.dtype}"
            )


# -------------------------------------------------------------------------- stores


class ExpertStore:
    """Abstract host tier. Subclasses set ``specs`` and implement ``read_into``.

    ``read_into`` may be called concurrently from several threads (the prefetch
    worker and the compute thread's demand loads).
    """

    specs: dict[int, ExpertSpec]

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        """Fill ``out`` (preallocated, shapes/dtype as ``specs[layer]``) with the expert's weights."""
        raise NotImplementedError

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Convenience: allocate CPU tensors and ``read_into`` them."""
        spec = self.specs[layer]
        out = {n: torch.empty(s, dtype=spec.tensor_dtype(n)) for n, s in spec.shapes.items()}
        self.read_into(layer, expert, out)
        return out

    def total_expert_bytes(self) -> int:
        return sum(s.num_experts * s.expert_nbytes() for s in self.specs.values())

    def close(self) -> None:
        """Release files/memory. Idempotent."""

    def _check_key(self, layer: int, expert: int) -> ExpertSpec:
        spec = self.specs.get(layer)
        if spec is None:
            raise KeyError(f"no MoE layer {layer} in this expert store (layers: {sorted(self.specs)})")
        if not 0 <= expert < spec.num_experts:
            raise IndexError(f"expert {expert} out of range for layer {layer} ({spec.num_experts} experts)")
        return spec

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorExpertStore(ExpertStore):
    """Experts from tensors already in memory.

    ``layers`` maps layer -> {name: tensor with the expert axis first}, e.g.
    ``{"up": [E, 2I, H], "down": [E, H, I], "up_bias": [E, 2I], "down_bias": [E, H]}``.
    CPU tensors are kept by reference (no copy, any strides); CUDA tensors are
    copied to pinned CPU memory (the caller then frees the device copies).
    """

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]]):
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        specs = {}
        for layer, tensors in layers.items():
            if not tensors:
                raise ValueError(f"layer {layer}: no expert tensors given")
            num, dtype, shapes, kept = None, None, {}, {}
            for name, t in tensors.items():
                if isinstance(t, ExpertList):   # per-expert tensors: kept (or copied to host) one by one
                    if num is None:
                        num, dtype = len(t), t.dtype
                    if len(t) != num or t.dtype != dtype:
                        raise ValueError(f"layer {layer}: tensor {name!r} has {len(t)} experts of {t.dtype}, "
                                         f"expected {num} of {dtype} like the layer's other tensors")
                    kept[name] = ExpertList(
                        x.detach() if x.device.type == "cpu" else
                        torch.empty(x.shape, dtype=x.dtype, pin_memory=torch.cuda.is_available()).copy_(x)
                        for x in t.tensors)
                    shapes[name] = tuple(t.shape[1:])
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"layer {layer} tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
                if t.device.type == "meta":
                    raise ValueError(f"layer {layer} tensor {name!r} is on the meta device: it has no data to store")
                if t.dim() < 1:
                    raise ValueError(f"layer {layer} tensor {name!r} has no expert axis (0-dim tensor)")
                if num is None:
                    num, dtype = t.shape[0], t.dtype
                if t.shape[0] != num:
                    raise ValueError(
                        f"layer {layer}: tensor {name!r} has {t.shape[0]} experts on dim 0, expected {num} "
                        "like the layer's other tensors"
                    )
                if t.dtype != dtype:
                    raise ValueError(f"layer {layer}: tensor {name!r} is {t.dtype}, the layer's other tensors are {dtype}")
                t = t.detach()
                if t.device.type != "cpu":
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                    host.copy_(t)
                    t = host
                kept[name] = t
                shapes[name] = tuple(t.shape[1:])
            specs[int(layer)] = ExpertSpec(int(num), shapes, dtype)
            self._tensors[int(layer)] = kept
        self.specs = specs

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        spec = self._check_key(layer, expert)
        _check_out(spec, layer, out)
        with torch.no_grad():
            for name, t in self._tensors[layer].items():
                out[name].copy_(t[expert])

    def close(self) -> None:
        self._tensors = {}


# ------------------------------------------------------------------- safetensors


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file. ``begin``/``end`` are ABSOLUTE byte
    offsets in ``file`` (header already added), so ``end - begin`` is its size."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: str, cache: dict | None = None) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header (validated; never reads tensor data).

    Every entry is checked: a known dtype, ``data_offsets`` of exactly dtype x shape
    bytes, inside the file, and not overlapping another tensor's bytes; an error names
    the tensor and the file. ``cache``: path -> parsed header, shared by the reads of
    one construction."""
    path = os.fspath(path)
    if cache is not None and path in cache:
        return cache[path]
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint {path} is not a safetensors file: {size} bytes, no 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(
                f"checkpoint {path} is not a valid safetensors file or is truncated: header claims {n} bytes "
                f"but the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint {path}: safetensors header is not a JSON object")
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"checkpoint {path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if dt not in SAFETENSORS_DTYPES:
            raise ValueError(f"checkpoint {path}: tensor {name!r} has unsupported dtype {dt!r}")
        dtype = SAFETENSORS_DTYPES[dt]
        want = _numel(shape) * _itemsize(dtype)
        if not (isinstance(b, int) and isinstance(e, int)) or b < 0 or e - b != want:
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} has data_offsets {[b, e]} but {dt}{list(shape)} needs {want} bytes"
            )
        if base + e > size:
            raise ValueError(
                f"checkpoint {path} is truncated: tensor {name!r} needs bytes up to {base + e} but the file has {size}"
            )
        entries[name] = TensorEntry(path, dtype, shape, base + b, base + e)
    # byte ranges must not overlap (else one tensor, e.g. one expert, reads another's bytes)
    last = None
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.end == entry.begin:
            continue
        if last is not None and entry.begin < last[1].end:
            raise ValueError(
                f"checkpoint {path}: tensors {last[0]!r} (bytes {last[1].begin - base}..{last[1].end - base}) and "
                f"{name!r} (bytes {entry.begin - base}..{entry.end - base}) overlap in the data section; "
                "the file is corrupt"
            )
        last = (name, entry)
    if cache is not None:
        cache[path] = entries
    return entries


def _expand_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            idx = os.path.join(p, "model.safetensors.index.json")
            if os.path.isfile(idx):
                out.append(idx)
            else:
                found = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
                if not found:
                    raise ValueError(f"checkpoint directory {p} has no model.safetensors.index.json and no .safetensors files")
                out.extend(os.path.join(p, f) for f in found)
        else:
            out.append(p)
    return out


def safetensors_index(paths) -> dict[str, TensorEntry]:
    """Map every tensor name of a checkpoint to where its bytes are.

    ``paths``: a ``.safetensors`` file, a ``model.safetensors.index.json`` (sharded
    checkpoint; shard names are relative to the index's directory), a directory
    holding either, or a list of those. Returns ``name -> TensorEntry(file, dtype,
    shape, begin, end)`` with absolute byte offsets. Only headers are read.
    """
    result: dict[str, TensorEntry] = {}
    headers: dict[str, dict[str, TensorEntry]] = {}

    def add(name, entry, origin):
        if name in result and result[name].file != entry.file:
            raise ValueError(f"tensor {name!r} appears in both {result[name].file} and {origin}")
        result[name] = entry

    for p in _expand_paths(paths):
        if p.endswith(".json"):
            if not os.path.isfile(p):
                raise ValueError(f"checkpoint index {p} does not exist")
            try:
                with open(p) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"checkpoint index {p} is not a valid safetensors index ({exc!r})") from None
            root = os.path.dirname(p)
            for name, shard in weight_map.items():
                shard_path = os.path.join(root, shard)
                entry = _read_header(shard_path, headers).get(name)
                if entry is None:
                    raise ValueError(f"tensor {name!r} listed in {p} is missing from {shard_path}")
                add(name, entry, shard_path)
        else:
            for name, entry in _read_header(p, headers).items():
                add(name, entry, p)
    return result


@dataclass(frozen=True)
class TensorSource:
    """Where one per-expert tensor of one layer lives in a safetensors checkpoint.

    Exactly one of:

    * ``fused``: ``(file, name)`` of a tensor ``[E, ...]``; expert ``e`` is row ``e``.
    * ``per_expert``: for each expert ``e``, pieces ``((file, name), ...)`` that are
      concatenated along dim 0 (e.g. Mixtral's ``w1`` and ``w3`` -> gate_up).

    ``transpose``: swap the last two dims of each piece after reading (for
    checkpoints storing ``[in, out]`` where the model wants ``[out, in]``).

    For anything else (transformers' conversion steps of a family, quantized experts)
    give an :class:`ExpertTensorSource`.
    """

    fused: tuple[str, str] | None = None
    per_expert: tuple[tuple[tuple[str, str], ...], ...] | None = None
    transpose: bool = False

    def __post_init__(self):
        if (self.fused is None) == (self.per_expert is None):
            raise ValueError("TensorSource needs exactly one of fused=(file, name) or per_expert=((pieces), ...)")


@dataclass(frozen=True)
class ExpertTensorSource:
    """One per-expert tensor as a read program per expert (``programs[e]``, see
    :mod:`expertflow_compile.runtime.read_plan`), built by the loader from transformers'
    conversion rules. ``dtype``: what the tensor is held in (None: the store's dtype, else
    the programs' own); a quantized tensor keeps its on-disk dtype."""

    programs: tuple[Node, ...]
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if not self.programs:
            raise ValueError("ExpertTensorSource needs one program per expert, got none")


def _pread_into(fd: int, path: str, buf: memoryview, offset: int) -> None:
    got, n = 0, len(buf)
    while got < n:
        k = os.preadv(fd, [buf[got:]], offset + got)
        if k <= 0:
            raise OSError(f"short read from {path}: wanted {n} bytes at offset {offset}, got {got} (file changed?)")
        got += k


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, incl. bf16)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class SafetensorsExpertStore(ExpertStore):
    """Experts read on demand from safetensors files; never all experts in RAM.

    ``sources``: layer -> {tensor name in the expert (e.g. ``"up"``): TensorSource or
    ExpertTensorSource}. ``dtype`` (one, or one per layer): the layer's dtype, which its
    tensors are converted to when reading (default: the checkpoint's dtype, or
    ``expected[layer].dtype`` when ``expected`` is given); an ExpertTensorSource with its
    own ``dtype`` keeps that one (a quantized tensor: its on-disk dtype). ``expected``: the model's specs to
    check the checkpoint against (experts, shapes).

    Construction validates everything (files exist, headers parse, byte ranges inside
    their files, tensors present, shapes/dtypes consistent) so reads cannot fail for
    those reasons later. Each ``read_into`` runs the expert's read programs: one
    ``preadv`` per piece straight into the destination when no conversion is needed,
    else through a small temporary of that piece.
    """

    def __init__(
        self,
        sources: dict[int, dict[str, TensorSource | ExpertTensorSource]],
        dtype: torch.dtype | Mapping[int, torch.dtype] | None = None,
        *,
        expected: dict[int, ExpertSpec] | None = None,
    ):
        if sys.byteorder != "little":
            raise ValueError("SafetensorsExpertStore needs a little-endian host (safetensors data is little-endian)")
        self._plans: dict[int, dict[str, tuple[Node, ...]]] = {}
        self._fds: dict[str, int] = {}
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        self._sizes: dict[str, int] = {}
        specs = {}
        try:
            for layer, tensors in sources.items():
                layer = int(layer)
                if not tensors:
                    raise ValueError(f"layer {layer}: no expert tensors given")
                exp = expected.get(layer) if expected else None
                if expected is not None and exp is None:
                    raise ValueError(f"layer {layer} is not in the expected specs (layers {sorted(expected)})")
                shapes, plans, own, disk_dtypes, num = {}, {}, {}, set(), None
                for name, src in tensors.items():
                    if isinstance(src, ExpertTensorSource):
                        programs = self._check_programs(layer, name, src.programs)
                        if src.dtype is not None:
                            own[name] = src.dtype
                    elif isinstance(src, TensorSource):
                        programs = self._programs(layer, name, src)
                    else:
                        raise ValueError(f"layer {layer} tensor {name!r}: expected a TensorSource or "
                                         f"ExpertTensorSource, got {type(src).__name__}")
                    if num is None:
                        num = len(programs)
                    elif len(programs) != num:
                        raise ValueError(f"layer {layer}: tensor {name!r} has {len(programs)} experts, the layer's "
                                         f"other tensors have {num}")
                    shapes[name], plans[name] = programs[0].shape, programs
                    if name not in own:
                        disk_dtypes |= {p.dtype for p in programs}
                if exp is not None:
                    if exp.num_experts != num or exp.shapes != shapes:
                        raise ValueError(
                            f"layer {layer}: checkpoint gives {num} experts with shapes {shapes}, "
                            f"the model expects {exp.num_experts} experts with shapes {exp.shapes}"
                        )
                target = (dtype.get(layer) if isinstance(dtype, Mapping) else dtype) or (
                    exp.dtype if exp is not None else None)
                if target is None:
                    if None in disk_dtypes or len(disk_dtypes) > 1:
                        raise ValueError(
                            f"layer {layer}: expert tensors have mixed dtypes "
                            f"{sorted(map(str, disk_dtypes - {None}))} in the checkpoint; pass dtype= to convert "
                            "them to one"
                        )
                    (target,) = disk_dtypes or set(own.values())
                specs[layer] = ExpertSpec(num, shapes, target, dtypes=own)
                self._plans[layer] = plans
                for programs in plans.values():
                    for prog in programs:
                        for sl in slices_of(prog):
                            self._open(sl.file, sl.key, sl.offset + sl.nbytes)
        except BaseException:
            self._close_fds(self._fds)
            raise
        self.specs = specs
        self._headers, self._sizes = {}, {}
        self._finalizer = weakref.finalize(self, SafetensorsExpertStore._close_fds, self._fds)

    # -- construction helpers

    def _open(self, file: str, name: str, end: int) -> None:
        size = self._sizes.get(file)
        if size is None:
            if not os.path.isfile(file):
                raise ValueError(f"checkpoint file {file} does not exist")
            size = self._sizes[file] = os.path.getsize(file)
        if size < end:
            raise ValueError(f"checkpoint {file} is truncated: tensor {name!r} needs bytes up to {end} "
                             f"but the file has {size}")
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def _entry(self, file: str, name: str) -> TensorEntry:
        file = os.fspath(file)
        entry = _read_header(file, self._headers).get(name)
        if entry is None:
            raise ValueError(f"tensor {name!r} missing from {file}")
        return entry

    @staticmethod
    def _check_programs(layer: int, name: str, programs) -> tuple[Node, ...]:
        programs = tuple(programs)
        for e, prog in enumerate(programs):
            if not isinstance(prog, Node):
                raise ValueError(f"layer {layer} tensor {name!r} expert {e}: expected a read program, got "
                                 f"{type(prog).__name__}")
            if prog.shape != programs[0].shape:
                raise ValueError(f"layer {layer} tensor {name!r}: expert {e} has shape {list(prog.shape)} "
                                 f"({describe(prog)}), expert 0 has {list(programs[0].shape)} "
                                 f"({describe(programs[0])})")
        return programs

    def _programs(self, layer: int, name: str, src: TensorSource) -> tuple[Node, ...]:
        """A :class:`TensorSource` as one read program per expert."""

        def piece(file, tname):
            entry = self._entry(file, tname)
            node = FileSlice(entry.file, tname, entry.begin, entry.end - entry.begin, entry.shape, entry.dtype)
            return self._transposed(node, src.transpose)

        if src.fused is not None:
            file, tname = src.fused
            entry = self._entry(file, tname)
            if len(entry.shape) < 1:
                raise ValueError(f"tensor {tname!r} in {file} is 0-dim: a fused expert tensor needs an expert axis")
            whole = FileSlice(entry.file, tname, entry.begin, entry.end - entry.begin, entry.shape, entry.dtype)
            out = []
            for e in range(entry.shape[0]):
                row = whole.row(e, 1)
                row = FileSlice(row.file, row.key, row.offset, row.nbytes, entry.shape[1:], row.dtype)
                out.append(self._transposed(row, src.transpose))
            return tuple(out)
        if len(src.per_expert) == 0:
            raise ValueError(f"layer {layer} tensor {name!r}: per_expert lists no experts")
        out = []
        for e, pieces in enumerate(src.per_expert):
            if len(pieces) == 0:
                raise ValueError(f"layer {layer} tensor {name!r}: expert {e} has no pieces")
            nodes = [piece(f, t) for f, t in pieces]
            if len(nodes) == 1:
                out.append(nodes[0])
                continue
            for (f, t), n in zip(pieces, nodes):
                if len(n.shape) < 1:
                    raise ValueError(f"tensor {t!r} in {f} is 0-dim: cannot concatenate it along dim 0")
                if n.shape[1:] != nodes[0].shape[1:]:
                    raise ValueError(
                        f"layer {layer} tensor {name!r} expert {e}: piece {t!r} in {f} has shape {list(n.shape)}, "
                        f"which cannot be concatenated along dim 0 with trailing dims {list(nodes[0].shape[1:])}")
            out.append(Cat(0, tuple(nodes)))
        return self._check_programs(layer, name, out)

    @staticmethod
    def _transposed(node: Node, transpose: bool) -> Node:
        if not transpose:
            return node
        n = len(node.shape)
        if n < 2:
            raise ValueError(f"tensor {node.key!r} in {node.file} has shape {list(node.shape)}: cannot transpose "
                             "its last two dims")
        return Transpose(n - 2, n - 1, node)

    @staticmethod
    def _close_fds(fds: dict[str, int]) -> None:
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()

    # -- reading

    def programs(self, layer: int, name: str) -> tuple[Node, ...]:
        """The read programs of tensor ``name`` of ``layer`` (one per expert)."""
        return self._plans[layer][name]

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        spec = self._check_key(layer, expert)
        _check_out(spec, layer, out)
        fds = self._fds
        if not fds:
            raise RuntimeError("SafetensorsExpertStore is closed")

        def read(file: str, buf: memoryview, offset: int) -> None:
            _pread_into(fds[file], file, buf, offset)

        for name, programs in self._plans[layer].items():
            write_into(programs[expert], out[name], read)

    def close(self) -> None:
        self._finalizer()


# ------------------------------------------------------------------- test hook


class FaultInjectingStore(ExpertStore):
    """Test hook: wraps a store and misbehaves on chosen reads.

    ``faults``: ``{(layer, expert): n}`` raise ``exc`` on the first ``n`` reads of
    that expert (``None``: on every read); an iterable of keys means always.
    ``thread_prefix``: only fail reads made from threads whose name starts with
    it (the cache's prefetch worker is named ``"expertflow-prefetch"``).
    ``gate``: a ``threading.Event`` every read waits on first (lets a test hold a
    load "in flight"); ``delay``: seconds each read sleeps.
    ``reads`` counts reads per key (attempts, failed ones included).
    """

    def __init__(
        self,
        inner: ExpertStore,
        faults: Mapping[tuple[int, int], int | None] | Iterable[tuple[int, int]] = (),
        *,
        exc: type[BaseException] = OSError,
        thread_prefix: str | None = None,
        gate: threading.Event | None = None,
        delay: float = 0.0,
    ):
        self.inner = inner
        self.specs = inner.specs
        self.faults = dict(faults) if isinstance(faults, Mapping) else {tuple(k): None for k in faults}
        self.exc, self.thread_prefix, self.gate, self.delay = exc, thread_prefix, gate, delay
        self.reads: dict[tuple[int, int], int] = {}
        self.failures = 0
        self._lock = threading.Lock()

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        key = (layer, expert)
        if self.gate is not None:
            self.gate.wait()
        if self.delay:
            import time

            time.sleep(self.delay)
        with self._lock:
            self.reads[key] = self.reads.get(key, 0) + 1
            fail = False
            if key in self.faults and (
                self.thread_prefix is None or threading.current_thread().name.startswith(self.thread_prefix)
            ):
                left = self.faults[key]
                if left is None:
                    fail = True
                elif left > 0:
                    self.faults[key] = left - 1
                    fail = True
            if fail:
                self.failures += 1
        if fail:
            raise self.exc(f"injected fault reading expert {expert} of layer {layer}")
        self.inner.read_into(layer, expert, out)

    def close(self) -> None:
        self.inner.close()
