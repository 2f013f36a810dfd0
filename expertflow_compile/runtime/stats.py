"""Runtime counters of the expert cache (thread-safe).

Vocabulary: a **use** is one ``ExpertCache.acquire(layer, expert)`` call. Every
use is exactly one of *hit* or *miss*, so ``hits + misses == uses``:

hits
    Uses that did not read the expert themselves: it was resident, or a load of
    it was already running (a prefetch the worker had started, or another
    thread's demand load) and the use waited for it.
inflight_waits
    The subset of ``hits`` that found the expert still in flight and waited for
    it (the prefetch was right but late). These are "not ready" uses.
misses
    Uses that read the expert synchronously in the calling thread (a demand
    load): it was not resident, or its prefetch was still queued (not started:
    the use takes it over, see ``prefetch_late``), or its prefetch failed.
prefetch_issued
    Loads enqueued by ``prefetch`` (experts already resident or in flight are
    not counted).
prefetch_used
    Prefetched experts that were used after the worker loaded them or while it
    was loading them (first use after the prefetch).
prefetch_late
    Prefetched experts used while their load was still queued: the use loaded
    them itself (counted as a miss). Right prediction, no time saved.
prefetch_wasted
    Prefetched experts evicted before any use, plus prefetches whose load failed.
prefetch_failed
    Prefetch loads that raised (subset of ``prefetch_wasted``); see the log.
demand_loads, prefetch_loads
    Loads completed by each path; ``loads`` = their sum.
bytes_moved
    Bytes copied from the expert store into cache slots (completed loads).
stall_seconds
    Wall time ``acquire`` spent blocked on data: waiting for in-flight loads plus
    doing demand loads.
evictions
    Resident experts dropped to make room.
peak_cache_bytes
    Largest number of bytes of slots allocated at once (``<= budget_bytes``).
budget_bytes
    The cache's budget: ``num_slots * slot_bytes``.

Derived in :meth:`RuntimeStats.as_dict`: ``hit_rate = hits / (hits + misses)``,
``ready_rate = (hits - inflight_waits) / uses`` (share of uses whose expert was
resident and complete when needed), ``loads``, ``prefetch_precision =
(prefetch_used + prefetch_late) / prefetch_issued`` (share of prefetches for
experts that were then used). ``per_layer[layer]`` holds ``hits``, ``misses``,
``inflight_waits``, ``prefetch_issued``, ``prefetch_used``, ``prefetch_late``,
``prefetch_wasted``, ``bytes_moved`` for that MoE layer.

A failed ``acquire`` (it raised) counts as no use.
"""

from __future__ import annotations

import threading

__all__ = ["RuntimeStats"]

_COUNTERS = (
    "hits", "misses", "inflight_waits", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
    "prefetch_failed", "demand_loads", "prefetch_loads", "bytes_moved", "evictions",
)
_LAYER_COUNTERS = (
    "hits", "misses", "inflight_waits", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
    "bytes_moved",
)


class RuntimeStats:
    """Thread-safe counters; see the module docstring for what each one means."""

    def __init__(self):
        self._lock = threading.Lock()
        self.budget_bytes = 0
        self.current_cache_bytes = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter. ``budget_bytes`` is kept and ``peak_cache_bytes``
        restarts from the bytes allocated now."""
        with self._lock:
            for name in _COUNTERS:
                setattr(self, name, 0)
            self.stall_seconds = 0.0
            self.peak_cache_bytes = self.current_cache_bytes
            self.per_layer: dict[int, dict[str, int | float]] = {}

    # -- recording (called by the cache)

    def add(self, layer: int | None = None, *, stall: float = 0.0, **counts: int) -> None:
        """Add ``counts`` to the global counters and, when ``layer`` is given, to
        that layer's (for the counters kept per layer)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            self.stall_seconds += stall
            if layer is not None:
                per = self.per_layer.get(layer)
                if per is None:
                    per = self.per_layer[layer] = dict.fromkeys(_LAYER_COUNTERS, 0)
                for name, n in counts.items():
                    if name in per:
                        per[name] += n

    def set_cache_bytes(self, current: int) -> None:
        with self._lock:
            self.current_cache_bytes = current
            self.peak_cache_bytes = max(self.peak_cache_bytes, current)

    # -- reading

    @property
    def uses(self) -> int:
        return self.hits + self.misses

    def as_dict(self) -> dict:
        with self._lock:
            d = {name: getattr(self, name) for name in _COUNTERS}
            d["stall_seconds"] = self.stall_seconds
            d["peak_cache_bytes"] = self.peak_cache_bytes
            d["budget_bytes"] = self.budget_bytes
            d["per_layer"] = {k: dict(v) for k, v in sorted(self.per_layer.items())}
        uses = d["hits"] + d["misses"]
        d["uses"] = uses
        d["hit_rate"] = d["hits"] / uses if uses else 0.0
        d["ready_rate"] = (d["hits"] - d["inflight_waits"]) / uses if uses else 0.0
        d["loads"] = d["demand_loads"] + d["prefetch_loads"]
        issued = d["prefetch_issued"]
        d["prefetch_precision"] = (d["prefetch_used"] + d["prefetch_late"]) / issued if issued else 0.0
        return d

    def __repr__(self) -> str:
        d = self.as_dict()
        return (
            f"RuntimeStats(uses={d['uses']}, hit_rate={d['hit_rate']:.3f}, ready_rate={d['ready_rate']:.3f}, "
            f"misses={d['misses']}, prefetch_issued={d['prefetch_issued']}, prefetch_used={d['prefetch_used']}, "
            f"bytes_moved={d['bytes_moved']}, stall_seconds={d['stall_seconds']:.4f}, "
            f"peak_cache_bytes={d['peak_cache_bytes']}, budget_bytes={d['budget_bytes']})"
        )
