"""Runtime counters of the expert cache (thread-safe), and the figures every report uses.

The figures (the stats, ``expertflow run`` / ``bench`` / ``eval`` / ``simulate``, the replay
and the benchmarks all use these and only these):

uses
    One use is one expert of one MoE layer call (``acquire_layer`` counts each distinct
    expert once; ``acquire`` is a call of one expert).
resident rate
    ``resident / uses``: the expert was in the cache when its layer call began, and not
    brought there by a speculative load still waiting for its first use - the classic
    demand hit rate, comparable with Belady's MIN and with papers' hit rates.
ready rate
    ``(resident + arrived) / uses``: resident, or brought in by a speculative load (a
    prefetch) that had landed by the time the call reached the expert - no wait, no load
    of its own. ``ready >= resident``; with no prefetching they are equal.
loads
    Every transfer into a slot: ``demand_loads`` (a layer call's own misses, whoever reads
    them: the caller, or the worker when ``queue_misses`` hands them to it - they are never
    counted as prefetches) + ``prefetch_loads`` (speculative: issued by ``prefetch``).
wasted loads
    ``wasted_loads``: speculative loads that completed and were evicted before any use
    (queued prefetches dropped before they were read are ``prefetch_cancelled``, not loads).
stall seconds
    Wall time layer calls spent blocked on data: waiting for in-flight loads plus doing
    demand loads.
MIN loads
    Belady's MIN (:mod:`~expertflow_compile.runtime.belady`) on the layer calls this cache
    served since the last reset, with the same slot count: the fewest loads any policy
    could have made; ``loads_over_min = loads / min_loads``. Reported while the routing log
    (``routing_limit`` layer calls, see :meth:`RuntimeStats.as_dict`) holds every call since
    the reset; else ``None``.

Counters kept (every use is exactly one of *hit* or *miss*, ``hits + misses == uses``):

hits
    Uses that did not load the expert themselves: ``resident + arrived + inflight_waits``.
resident, arrived
    See the resident and ready rates above.
inflight_waits
    Uses that found a speculative load still running and waited for it (right but late).
misses
    Uses whose expert this call loaded (a demand load): not resident, not in flight, or its
    prefetch was still queued (taken over: ``prefetch_late``) or failed.
prefetch_issued
    Speculative loads enqueued by ``prefetch`` (resident or in-flight experts not counted).
prefetch_used
    Speculative loads used (ready, or waited for) at the first use after the prefetch.
prefetch_late
    Prefetches still queued when needed: the use loaded them itself (a miss).
prefetch_wasted
    Prefetches that moved no useful data: ``wasted_loads + prefetch_cancelled`` + failed.
prefetch_failed
    Prefetch loads that raised (subset of ``prefetch_wasted``); see the log.
demand_loads, prefetch_loads, wasted_loads, prefetch_cancelled
    See loads and wasted loads above.
bytes_moved
    Bytes copied from the expert store into cache slots (completed loads).
evictions
    Resident experts dropped to make room.
peak_cache_bytes, budget_bytes
    Largest number of bytes of slots allocated at once (``<= budget_bytes``); the budget
    ``num_slots * slot_bytes``.

Derived in :meth:`RuntimeStats.as_dict`: ``uses``, ``resident_rate``, ``ready_rate``,
``loads``, ``speculative_loads`` (= ``prefetch_loads``), ``min_loads``, ``loads_over_min``,
``prefetch_precision = (prefetch_used + prefetch_late) / prefetch_issued``.
``per_layer[layer]`` holds the counters in ``LAYER_COUNTERS`` for that MoE layer.

A failed ``acquire`` (it raised) counts as no use.
"""

from __future__ import annotations

import threading

from .belady import min_loads

__all__ = ["RuntimeStats", "LAYER_COUNTERS", "ROUTING_LIMIT"]

_COUNTERS = (
    "hits", "resident", "arrived", "misses", "inflight_waits", "prefetch_issued", "prefetch_used", "prefetch_late",
    "prefetch_wasted", "prefetch_failed", "prefetch_cancelled", "demand_loads", "prefetch_loads", "wasted_loads",
    "bytes_moved", "evictions",
)
LAYER_COUNTERS = (
    "hits", "resident", "arrived", "misses", "inflight_waits", "prefetch_issued", "prefetch_used", "prefetch_late",
    "prefetch_wasted", "demand_loads", "prefetch_loads", "wasted_loads", "bytes_moved",
)
_LAYER_COUNTERS = LAYER_COUNTERS
ROUTING_LIMIT = 100_000


class RuntimeStats:
    """Thread-safe counters; see the module docstring for what each one means."""

    def __init__(self, routing_limit: int = ROUTING_LIMIT):
        self._lock = threading.Lock()
        self.budget_bytes = 0
        self.current_cache_bytes = 0
        self.num_slots = 0                # set by the cache: the slot count MIN is computed for
        self.routing_limit = int(routing_limit)
        self._min_cache: tuple | None = None
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
            # the layer calls served since the reset, for MIN; None once more than routing_limit
            self.routing: list | None = [] if self.routing_limit > 0 else None
            self._min_cache = None

    def log_call(self, layer: int, experts) -> None:
        """Record one layer call's distinct experts (the cache calls it once per layer call)."""
        log = self.routing
        if log is not None:
            if len(log) >= self.routing_limit:
                self.routing = None
            else:
                log.append((layer, tuple(experts)))

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

    def add_each(self, per_layer: dict[int, dict[str, int]]) -> None:
        """:meth:`add` of ``counts`` for each ``layer: counts`` of ``per_layer``, under one lock."""
        with self._lock:
            for layer, counts in per_layer.items():
                per = self.per_layer.get(layer)
                if per is None:
                    per = self.per_layer[layer] = dict.fromkeys(_LAYER_COUNTERS, 0)
                for name, n in counts.items():
                    setattr(self, name, getattr(self, name) + n)
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
            routing = None if self.routing is None else list(self.routing)
        uses = d["hits"] + d["misses"]
        d["uses"] = uses
        d["resident_rate"] = d["resident"] / uses if uses else 0.0
        d["ready_rate"] = (d["resident"] + d["arrived"]) / uses if uses else 0.0
        d["loads"] = d["demand_loads"] + d["prefetch_loads"]
        d["speculative_loads"] = d["prefetch_loads"]
        issued = d["prefetch_issued"]
        d["prefetch_precision"] = (d["prefetch_used"] + d["prefetch_late"]) / issued if issued else 0.0
        d["min_loads"] = self._min(routing)
        d["loads_over_min"] = (d["loads"] / d["min_loads"]) if d["min_loads"] else None
        d["num_slots"] = self.num_slots
        return d

    def _min(self, routing) -> int | None:
        """MIN loads of the logged calls (cached per log length and slot count)."""
        if routing is None or not self.num_slots or not routing:
            return None
        key = (len(routing), self.num_slots)
        if self._min_cache is not None and self._min_cache[0] == key:
            return self._min_cache[1]
        n = min_loads(routing, self.num_slots)[0]
        self._min_cache = (key, n)
        return n

    def __repr__(self) -> str:
        d = self.as_dict()
        return (
            f"RuntimeStats(uses={d['uses']}, resident_rate={d['resident_rate']:.3f}, "
            f"ready_rate={d['ready_rate']:.3f}, loads={d['demand_loads']}+{d['prefetch_loads']}, "
            f"wasted_loads={d['wasted_loads']}, min_loads={d['min_loads']}, "
            f"bytes_moved={d['bytes_moved']}, stall_seconds={d['stall_seconds']:.4f}, "
            f"peak_cache_bytes={d['peak_cache_bytes']}, budget_bytes={d['budget_bytes']})"
        )
