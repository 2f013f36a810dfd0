"""The expert cache's memory: one pool of equal slots and the slot table.

:class:`SlotPool` owns ``num_slots`` slots of ``slot_bytes`` each, carved from ONE flat
``uint8`` buffer on the compute device. The buffer is created the first time a slot is
needed (on CPU its pages are only committed when written, so resident memory still grows
with the slots in use; on CUDA the whole budget is allocated then). A slot can hold an
expert of any MoE layer: per layer layout (``ExpertSpec.layout()``) the pool is viewed as
``[num_slots, *shape]`` tensors of the layer's dtype (``stacked``), and per slot as a
``{name: tensor}`` mapping (``views``, made once per slot and layout, read-only).

The slot table is an int64 tensor ``[num_layers, max_experts]``: ``table[row(layer), e]``
is the slot holding expert ``e`` of ``layer`` when it is loaded and ready, else -1. The
cache keeps it in step with its host structures (``set`` / ``clear``, O(1) through a NumPy
view of the same memory). The fused Triton kernels read a layer's row as their
``slot_of_expert`` together with the pool's per-layer :class:`SlotTable` s, so a layer call
needs no per-expert host work. On CUDA, :meth:`SlotPool.device_row` copies the layer's row
to the device table ``[num_layers, max_experts]`` through a ring of pinned staging rows
(asynchronous, ordered on the current stream, no host sync), so the kernels read it on the
device; the rows a kernel reads are those of experts the caller holds pinned.

Invariant: ``table[row(l), e] == s`` iff the cache's slot ``s`` holds ``(l, e)`` READY.
"""

from __future__ import annotations

import math
import types

import torch

__all__ = ["SlotPool"]

_RING = 8     # pinned staging rows for device-table updates (CUDA)


class SlotPool:
    """Slots, their views and the slot table (see the module docstring)."""

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device, specs: dict):
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.device = device
        self.layers = sorted(specs)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.layouts = {layer: spec.layout() for layer, spec in specs.items()}
        self.max_experts = max(spec.num_experts for spec in specs.values())
        self.buf: torch.Tensor | None = None
        self._views: dict = {}        # layout -> [mapping or None per slot]
        self._stacked: dict = {}      # layout -> {name: [S, *shape] view}
        self._stacked_rows: dict = {}  # layout -> {name: per-slot views of it}
        self._tables: dict = {}       # (layout, transposed flags) -> Triton SlotTables
        cuda = device.type == "cuda"
        self.table = torch.full((len(self.layers), self.max_experts), -1, dtype=torch.int64,
                                pin_memory=cuda)
        self._np = self.table.numpy()
        self._device_table = None
        self._ring = None
        self._ring_events: list = []
        self._ring_turn = 0

    # ------------------------------------------------------------------ memory
    def _buffer(self) -> torch.Tensor:
        if self.buf is None:
            self.buf = torch.empty(self.num_slots * self.slot_bytes, dtype=torch.uint8, device=self.device)
        return self.buf

    def slot_buffer(self, index: int) -> torch.Tensor:
        """Slot ``index`` as a flat ``uint8`` tensor of ``slot_bytes``."""
        start = index * self.slot_bytes
        return self._buffer()[start:start + self.slot_bytes]

    def stacked(self, layer: int) -> dict[str, torch.Tensor]:
        """``{name: [num_slots, *shape]}``: the whole pool viewed in ``layer``'s layout."""
        layout = self.layouts[layer]
        out = self._stacked.get(layout)
        if out is None:
            pool = self._buffer().view(self.num_slots, self.slot_bytes)
            out = {}
            for name, off, shape, dtype in layout:
                itemsize = torch.empty((), dtype=dtype).element_size()
                n = math.prod(shape)
                width = max(n, 1) * itemsize
                flat = pool[:, off:off + width].view(dtype)[:, :n]
                out[name] = flat.reshape(self.num_slots, *shape) if n else flat.view(self.num_slots, *shape)
            self._stacked[layout] = out
        return out

    def stacked_rows(self, layer: int) -> dict[str, tuple]:
        """``{name: (slot 0's view, slot 1's, ...)}`` of :meth:`stacked` (made once per layout)."""
        layout = self.layouts[layer]
        out = self._stacked_rows.get(layout)
        if out is None:
            out = self._stacked_rows[layout] = {n: t.unbind(0) for n, t in self.stacked(layer).items()}
        return out

    def views(self, index: int, layer: int):
        """``{name: tensor}`` of slot ``index`` in ``layer``'s layout (made once, read-only)."""
        layout = self.layouts[layer]
        per = self._views.get(layout)
        if per is None:
            per = self._views[layout] = [None] * self.num_slots
        v = per[index]
        if v is None:
            stacked = self.stacked(layer)
            v = per[index] = types.MappingProxyType({name: t[index] for name, t in stacked.items()})
        return v

    def triton_tables(self, layer: int, *, up_transposed: bool, down_transposed: bool) -> dict:
        """The pool as Triton ``SlotTable`` s for ``layer`` (``up_weights``, ``down_weights``,
        ``up_bias``, ``down_bias``), indexed by slot; made once per layout."""
        key = (self.layouts[layer], up_transposed, down_transposed)
        tables = self._tables.get(key)
        if tables is None:
            from ..kernels.triton_moe import SlotTable

            stacked = self.stacked(layer)
            get = lambda name, tr: None if name not in stacked else SlotTable.from_stacked(stacked[name], tr)  # noqa: E731
            tables = self._tables[key] = dict(
                up_weights=get("up", up_transposed), down_weights=get("down", down_transposed),
                up_bias=get("up_bias", False), down_bias=get("down_bias", False))
        return tables

    # ------------------------------------------------------------------ the table
    def set(self, layer: int, expert: int, index: int) -> None:
        self._np[self.row[layer], expert] = index

    def clear(self, layer: int, expert: int) -> None:
        self._np[self.row[layer], expert] = -1

    def host_row(self, layer: int) -> torch.Tensor:
        return self.table[self.row[layer]]

    def device_row(self, layer: int, num_experts: int) -> torch.Tensor:
        """``layer``'s slot-table row where the kernels read it: the host row on CPU; on
        CUDA the device table's row, refreshed from a snapshot of the host row by an
        asynchronous copy on the current stream."""
        r = self.row[layer]
        if self.device.type != "cuda":
            return self.table[r, :num_experts]
        if self._device_table is None:
            self._device_table = torch.full(tuple(self.table.shape), -1, dtype=torch.int64, device=self.device)
            self._ring = torch.empty((_RING, self.max_experts), dtype=torch.int64, pin_memory=True)
            self._ring_events = [None] * _RING
        i = self._ring_turn
        self._ring_turn = (i + 1) % _RING
        ev = self._ring_events[i]
        if ev is not None:
            ev.synchronize()             # that staging row's previous copy has finished (rarely waits)
        staging = self._ring[i]
        staging.copy_(self.table[r])
        dst = self._device_table[r]
        dst.copy_(staging, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._ring_events[i] = ev
        return dst[:num_experts]
