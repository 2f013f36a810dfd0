"""Belady's MIN on a recorded sequence of MoE layer calls: the fewest loads any demand-paging
policy can make with ``slots`` slots shared by all layers (pure Python, no torch).

A *layer call* is ``(layer, experts)``: the distinct experts one MoE layer call uses. The
model is the engine's sequential one: within a call the resident experts are used first,
then the missing ones are loaded furthest-next-use first (the last one loaded, which stays
cached, is the one needed soonest); a load into a full cache evicts the expert whose next
use is furthest (never used again: first), least recently used among ties. O(uses log
slots) with a lazily invalidated heap.

:func:`min_loads` returns ``(loads, resident)``: MIN's transfers and its uses that found
their expert resident when the call began (its resident rate is ``resident / uses``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

__all__ = ["min_loads", "next_use_table"]


def next_use_table(calls: Sequence[tuple[int, Sequence[int]]]) -> list[list[float]]:
    """``out[i][j]``: index of the next call after ``i`` that uses ``calls[i][1][j]`` (inf: none)."""
    nxt: dict[tuple[int, int], float] = {}
    out: list[list[float]] = [[] for _ in calls]
    for i in range(len(calls) - 1, -1, -1):
        layer, experts = calls[i]
        row = []
        for e in experts:
            key = (layer, e)
            row.append(nxt.get(key, math.inf))
        for e in experts:
            nxt[(layer, e)] = i
        out[i] = row
    return out


def min_loads(calls: Sequence[tuple[int, Sequence[int]]], slots: int, per_call: list | None = None,
              resident_sets: list | None = None) -> tuple[int, int]:
    """Belady's MIN over ``calls`` with ``slots`` slots: ``(loads, resident uses)``;
    ``per_call`` (a list) receives each call's loads, ``resident_sets`` each call's experts
    that were resident when it began."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    calls = [(int(layer), list(dict.fromkeys(int(e) for e in experts))) for layer, experts in calls]
    nxt = next_use_table(calls)
    cached: dict[tuple[int, int], int] = {}      # key -> tick of its live heap entry
    heap: list = []                              # (-next use, tick, key): furthest, then LRU, first
    tick = loads = resident = 0
    for i, (layer, experts) in enumerate(calls):
        hit, miss = [], []
        for e, n in zip(experts, nxt[i]):
            (hit if (layer, e) in cached else miss).append((e, n))
        for e, n in hit:
            tick += 1
            cached[(layer, e)] = tick
            heapq.heappush(heap, (-n, tick, (layer, e)))
            resident += 1
        miss.sort(key=lambda t: -t[1])
        if resident_sets is not None:
            resident_sets.append({e for e, _n in hit})
        if per_call is not None:
            per_call.append(len(miss))
        for e, n in miss:
            if len(cached) >= slots:
                while True:
                    _neg, t, key = heapq.heappop(heap)
                    if cached.get(key) == t:
                        del cached[key]
                        break
            tick += 1
            cached[(layer, e)] = tick
            heapq.heappush(heap, (-n, tick, (layer, e)))
            loads += 1
        if len(heap) > 4 * len(cached) + 64:
            heap = [x for x in heap if cached.get(x[2]) == x[1]]
            heapq.heapify(heap)
    return loads, resident

