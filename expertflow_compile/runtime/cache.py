"""The device tier: a fixed pool of expert slots, a slot table and a prefetcher.

:class:`ExpertCache` owns ``num_slots`` slots. A slot is one flat ``uint8``
buffer of ``slot_bytes`` (the largest layer's ``ExpertSpec.slot_nbytes()``) on
the compute device, allocated the first time it is needed, so at most
``budget_bytes = num_slots * slot_bytes`` are ever allocated. A slot can hold an
expert of ANY MoE layer: the per-tensor views are made per layer layout. The
slot table maps ``(layer, expert) -> slot`` for all layers at once, so layers
share the budget by demand.

Slot states: FREE (no expert), QUEUED (a prefetch is waiting for the worker),
LOADING (being read, by the worker or a demand load), READY (loaded). QUEUED and
LOADING are "in flight": never evicted by ``prefetch``. Pinned slots (acquired
and not yet released) are never evicted.

Replacement policies (which unpinned READY slot to evict):

* ``"lru"``: least recently used. ``acquire`` and ``prefetch`` of a resident
  expert both count as a reference; a freshly prefetched expert counts as
  referenced when the prefetch was issued.
* ``"lfu"``: least frequently used, counting every ``acquire`` of an expert over
  the cache's life (counts survive eviction, so popular experts win back their
  place); ties go to the least recently used.
* ``"predictive"``: evict the expert whose predicted next use is furthest away
  (Belady's rule on predictions). Predictions come from
  ``set_predicted(layer, experts, distance)`` (``distance``: MoE layers ahead of
  the current one) and, when none was given, from ``prefetch(layer, experts)``
  (distance = how many MoE layers ahead ``layer`` is, in the order of the
  store's layers, wrapping around to the next forward pass). Experts without a
  live prediction are evicted first, least recently used first; with no hints
  at all this is exactly LRU. A prediction is consumed by the expert's next
  ``acquire``, and the predictions for a layer that are still unconsumed when
  execution moves on from that layer are dropped (they were wrong).

With every policy, an expert prefetched and not yet used is "protected" until
execution has gone through its layer without using it (then it was a
misprediction and competes normally): while protected, a demand load evicts it
only when no other victim exists, and another prefetch never evicts it.

Predictions and protection follow the order in which layers are acquired, so
they assume one thread runs the MoE layers in order (the compiled model does);
other threads may still acquire concurrently, correctly, with less useful hints.

Prefetching runs off the caller's thread: on CPU a daemon worker thread reads
from the store straight into the slot; on CUDA the worker reads into a pinned
staging buffer and copies it on a side stream, recording an event that
``acquire`` makes the current stream wait on (and a slot's refill on the side
stream waits on the event recorded at its last ``release``). A load that fails
in the worker frees its slot, is logged once (logger ``"expertflow_compile"``)
and the expert is demand-loaded by the next ``acquire`` (which raises only if
that load fails too). ``acquire`` of an expert whose prefetch is still QUEUED
(the worker has not started it) does the load itself instead of waiting behind
the worker's queue: the prefetch bought nothing, so it counts as a miss (and as
``prefetch_late``).

See :mod:`expertflow_compile.runtime.stats` for what each counter means.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections import Counter

import torch

from .stats import RuntimeStats
from .store import ExpertStore

__all__ = ["ExpertCache", "VALID_POLICIES", "WORKER_THREAD_NAME"]

logger = logging.getLogger("expertflow_compile")

VALID_POLICIES = ("lru", "lfu", "predictive")
WORKER_THREAD_NAME = "expertflow-prefetch"

_FREE, _QUEUED, _LOADING, _READY = "free", "queued", "loading", "ready"


class _Slot:
    __slots__ = (
        "index", "buf", "key", "state", "pins", "last_use", "prefetched", "protected", "load_id", "loader",
        "views", "ready_event", "release_event",
    )

    def __init__(self, index: int, buf: torch.Tensor):
        self.index = index
        self.buf = buf
        self.key: tuple[int, int] | None = None
        self.state = _FREE
        self.pins = 0
        self.last_use = 0
        self.prefetched = False      # loaded/queued by prefetch and not used yet
        self.protected = False       # prefetched for a layer that has not run yet: evicted last
        self.load_id = 0             # bumps whenever the slot's pending load changes hands
        self.loader: threading.Thread | None = None
        self.views: dict = {}        # layout -> {name: view}
        self.ready_event = None      # CUDA: event after the last copy into the slot
        self.release_event = None    # CUDA: event after the last use of the slot


class _Staging:
    """A pinned host buffer for CUDA copies, reused once its last copy is done."""

    def __init__(self, nbytes: int, pin: bool):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.event = None
        self.views: dict = {}


def _make_views(buf: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out = {}
    for name, off, shape, dtype in layout:
        itemsize = torch.empty((), dtype=dtype).element_size()
        n = max(math.prod(shape), 1) * itemsize
        out[name] = buf[off:off + n].view(dtype)[: math.prod(shape)].view(shape)
    return out


def _worker_main(ref, q: queue.SimpleQueue, device: torch.device) -> None:
    # Holds only a weak reference to the cache between items, so a dropped cache is
    # collected and its finalizer stops this thread.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    while True:
        item = q.get()
        if item is None:
            return
        cache = ref()
        if cache is None:
            return
        try:
            cache._worker_load(item)
        except BaseException:  # _worker_load handles load errors; never let the thread die silently
            logger.exception("expertflow_compile: unexpected error in the prefetch worker")
        finally:
            del cache


def _shutdown(q: queue.SimpleQueue, stop: threading.Event, thread: threading.Thread | None) -> None:
    stop.set()
    if thread is None:
        return
    q.put(None)
    if thread is not threading.current_thread():
        thread.join()


class ExpertCache:
    """A budgeted pool of expert slots on ``device`` in front of an :class:`ExpertStore`.

    Thread-safe. Typical use per MoE layer call: ``prefetch`` the experts
    predicted for coming layers; for each expert needed now, ``acquire`` (returns
    its tensors, pinned) and ``release`` when the computation using them has been
    issued. At most ``num_slots`` experts may be pinned at once.
    """

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        *,
        policy: str = "lru",
        device: torch.device | str = "cpu",
        prefetch: bool = True,
        stats: RuntimeStats | None = None,
    ):
        if policy not in VALID_POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; valid policies: {', '.join(VALID_POLICIES)}")
        specs = dict(store.specs)
        if not specs:
            raise ValueError("the expert store has no MoE layers")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"expert cache device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        self.store = store
        self.specs = specs
        self.policy = policy
        self.device = device
        self._layouts = {layer: spec.layout() for layer, spec in specs.items()}
        self._slot_need = {layer: spec.slot_nbytes() for layer, spec in specs.items()}
        self._expert_bytes = {layer: spec.expert_nbytes() for layer, spec in specs.items()}
        self._layer_pos = {layer: i for i, layer in enumerate(sorted(specs))}
        self.slot_bytes = max(self._slot_need.values())
        self.total_experts = sum(s.num_experts for s in specs.values())
        self.num_slots = min(num_slots, self.total_experts)
        self.budget_bytes = self.num_slots * self.slot_bytes
        self.stats = stats if stats is not None else RuntimeStats()
        self.stats.budget_bytes = self.budget_bytes

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._table: dict[tuple[int, int], _Slot] = {}
        self._tick = 0
        self._freq: Counter = Counter()
        self._hints: dict[int, dict[int, int]] = {}
        self._clock = 0
        self._layer_runs: Counter = Counter()
        # predictive policy: experts without a prediction get an estimated next use from
        # their layer's position and their use frequency (False: unpredicted = never again)
        self.estimate_unhinted = True
        self._last_layer: int | None = None
        self._protected: dict[int, set[_Slot]] = {}   # layer -> its protected prefetched slots
        self._load_ids = itertools.count(1)
        self._error_logged = False
        self._closed = False

        self._cuda = device.type == "cuda"
        # load through a host staging buffer (CUDA: pinned + async copy); CPU reads go straight into the slot.
        # Tests set it on a CPU cache to run the staging path.
        self._staged = device.type != "cpu"
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        self._staging: list[_Staging] = []      # worker's (CUDA / non-CPU devices)
        self._staging_turn = 0
        self._demand_staging: _Staging | None = None
        self._demand_lock = threading.Lock()

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch:
            self._thread = threading.Thread(
                target=_worker_main, args=(weakref.ref(self), self._queue, device),
                name=WORKER_THREAD_NAME, daemon=True,
            )
            self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, self._stop, self._thread)

    # ------------------------------------------------------------------ public

    def prefetch(self, layer: int, experts) -> int:
        """Enqueue asynchronous loads of the non-resident ``experts`` of ``layer``.

        Never blocks on I/O. Never evicts pinned or in-flight slots, nor experts of
        this same request; stops early when no slot can be freed. Returns how many
        loads were enqueued (0 when prefetching is off or the cache is closed).
        """
        layer = int(layer)
        req = list(dict.fromkeys(int(e) for e in experts))
        for e in req:
            self._check_key(layer, e)
        protect = {(layer, e) for e in req}
        issued = []
        with self._lock:
            if self.policy == "predictive":
                pos, last = self._layer_pos[layer], self._layer_pos.get(self._last_layer)
                dist = pos if last is None else (pos - last) % len(self._layer_pos)
                self._add_hints(layer, req, dist, replace=False)
            if self._thread is None or self._closed:
                return 0
            for e in req:
                key = (layer, e)
                slot = self._table.get(key)
                if slot is not None:
                    if slot.state == _READY:
                        self._touch(slot)
                    continue
                slot = self._find_victim(protect, demand=False)
                if slot is None:
                    break
                self._assign(slot, key, _QUEUED)
                slot.prefetched = slot.protected = True
                self._protected.setdefault(layer, set()).add(slot)
                self._touch(slot)
                issued.append((slot, key, slot.load_id))
            for item in issued:
                self._queue.put(item)
        if issued:
            self.stats.add(layer, prefetch_issued=len(issued))
        return len(issued)

    def set_predicted(self, layer: int, experts, distance: int = 1) -> None:
        """Hint for the ``"predictive"`` policy: ``experts`` of ``layer`` will be used
        ``distance`` MoE layers from now (0 = the layer running now). Ignored by
        the other policies."""
        if self.policy != "predictive":
            return
        layer = int(layer)
        req = [int(e) for e in experts]
        for e in req:
            self._check_key(layer, e)
        with self._lock:
            self._add_hints(layer, req, max(int(distance), 0), replace=False)

    def acquire(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Return ``{name: tensor}`` views into the expert's slot and pin the slot.

        Resident -> hit. Being loaded -> waits (a hit and an in-flight wait; stall
        time). Missing, or its prefetch still queued -> loads it in this thread (a
        miss), evicting per policy.
        Raises ``RuntimeError`` when every slot is pinned.
        """
        layer, expert = int(layer), int(expert)
        self._check_key(layer, expert)
        key = (layer, expert)
        t_wait = None           # when this call first blocked
        while True:
            with self._cond:
                self._advance_clock(layer)
                while True:
                    slot = self._table.get(key)
                    if slot is None:
                        slot = self._find_victim(frozenset(), demand=True)
                        if slot is None:             # only in-flight slots are left: one will finish
                            if t_wait is None:
                                t_wait = time.perf_counter()
                            self._cond.wait(0.05)
                            continue
                        self._assign(slot, key, _LOADING)
                        slot.loader = threading.current_thread()
                        mode = "demand"
                        break
                    if slot.state == _READY:
                        return self._use(slot, key, waited=t_wait is not None, t_wait=t_wait)
                    if slot.state == _QUEUED:
                        # take the queued prefetch over rather than wait behind the worker's queue
                        slot.state = _LOADING
                        slot.load_id = next(self._load_ids)
                        slot.loader = threading.current_thread()
                        mode = "steal"
                        break
                    # LOADING elsewhere: wait for it
                    if t_wait is None:
                        t_wait = time.perf_counter()
                    loader = slot.loader
                    if loader is not None and not loader.is_alive():
                        self._free_slot(slot)   # its loader died without finishing: reload
                        continue
                    self._cond.wait(0.05)
            if t_wait is None:
                t_wait = time.perf_counter()
            try:
                self._load(slot, layer, expert, background=False)
            except BaseException as exc:
                if mode == "steal":
                    self._load_failed(slot, key, exc, prefetch=True)
                    continue        # the prefetch failed: demand-load it
                self._load_failed(slot, key, exc, prefetch=False)
                raise RuntimeError(
                    f"expertflow_compile: loading expert {expert} of layer {layer} into the expert cache failed: {exc}"
                ) from exc
            with self._cond:
                slot.state = _READY
                slot.loader = None
                self._unprotect(slot)
                slot.pins += 1
                self._freq[key] += 1
                self._touch(slot)
                self._consume_hint(key)
                self.stats.add(layer, misses=1, demand_loads=1, prefetch_late=int(mode == "steal"),
                               bytes_moved=self._expert_bytes[layer], stall=time.perf_counter() - t_wait)
                self._cond.notify_all()
                return self._views_for(slot, layer)

    def release(self, layer: int, expert: int) -> None:
        """Unpin the expert (one ``release`` per ``acquire``)."""
        key = (int(layer), int(expert))
        with self._cond:
            slot = self._table.get(key)
            if slot is None or slot.state != _READY or slot.pins <= 0:
                raise RuntimeError(f"release(layer={key[0]}, expert={key[1]}) without a matching acquire")
            slot.pins -= 1
            if self._cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                slot.release_event = ev
            if slot.pins == 0:
                self._cond.notify_all()

    def is_resident(self, layer: int, expert: int) -> bool:
        """Loaded and ready (not in flight)."""
        with self._lock:
            slot = self._table.get((int(layer), int(expert)))
            return slot is not None and slot.state == _READY

    def resident_experts(self, layer: int) -> set[int]:
        layer = int(layer)
        with self._lock:
            return {e for (lay, e), s in self._table.items() if lay == layer and s.state == _READY}

    def in_flight(self) -> int:
        """Number of loads queued or running."""
        with self._lock:
            return sum(1 for s in self._table.values() if s.state in (_QUEUED, _LOADING))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no load is in flight (tests, benchmarks). Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(s.state in (_QUEUED, _LOADING) for s in self._table.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
        return True

    @property
    def allocated_bytes(self) -> int:
        return len(self._slots) * self.slot_bytes

    def close(self) -> None:
        """Stop and join the prefetch worker (queued prefetches are dropped). Idempotent.
        The cache still serves ``acquire`` afterwards, with demand loads only."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"ExpertCache(policy={self.policy!r}, device={str(self.device)!r}, num_slots={self.num_slots}, "
            f"slot_bytes={self.slot_bytes}, budget_bytes={self.budget_bytes}, resident={len(self._table)})"
        )

    # ------------------------------------------------------------ internals

    def _check_key(self, layer: int, expert: int) -> None:
        spec = self.specs.get(layer)
        if spec is None:
            raise KeyError(f"no MoE layer {layer} in the expert cache (layers: {sorted(self.specs)})")
        if not 0 <= expert < spec.num_experts:
            raise IndexError(f"expert {expert} out of range for layer {layer} ({spec.num_experts} experts)")

    def _touch(self, slot: _Slot) -> None:
        self._tick += 1
        slot.last_use = self._tick

    def _assign(self, slot: _Slot, key, state) -> None:
        self._unprotect(slot)
        slot.key = key
        slot.state = state
        slot.load_id = next(self._load_ids)
        self._table[key] = slot

    def _free_slot(self, slot: _Slot) -> None:
        """Drop the slot's expert (lock held)."""
        if slot.key is not None and self._table.get(slot.key) is slot:
            del self._table[slot.key]
        self._unprotect(slot)
        slot.key = None
        slot.state = _FREE
        slot.loader = None
        slot.load_id = next(self._load_ids)
        self._free.append(slot)
        self._cond.notify_all()

    def _unprotect(self, slot: _Slot) -> None:
        if slot.protected and slot.key is not None:
            self._protected.get(slot.key[0], set()).discard(slot)
        slot.prefetched = slot.protected = False

    def _advance_clock(self, layer: int) -> None:
        if layer != self._last_layer:
            if self._last_layer is not None:
                # the layer ran: its unconsumed predictions and unused prefetches were wrong
                self._hints.pop(self._last_layer, None)
                for slot in self._protected.pop(self._last_layer, ()):
                    slot.protected = False
            self._last_layer = layer
            self._clock += 1
            self._layer_runs[layer] += 1

    def _add_hints(self, layer: int, experts, distance: int, *, replace: bool) -> None:
        due = self._clock + distance
        hints = self._hints.setdefault(layer, {})
        for e in experts:
            old = hints.get(e)
            hints[e] = due if old is None or replace else min(old, due)

    def _consume_hint(self, key) -> None:
        hints = self._hints.get(key[0])
        if hints:
            hints.pop(key[1], None)

    def _eviction_key(self, slot: _Slot):
        if self.policy == "lru":
            return slot.last_use
        if self.policy == "lfu":
            return (self._freq[slot.key], slot.last_use)
        layer, expert = slot.key
        due = self._hints.get(layer, {}).get(expert)
        if due is not None:     # on equal distances an unpredicted expert goes first
            return (-(due - self._clock), 1, slot.last_use)
        return (-self._estimated_distance(slot.key), 0, slot.last_use)

    def _estimated_distance(self, key) -> float:
        """Layer calls until an unpredicted expert is likely needed: the calls until its
        layer runs again, plus whole passes while it is not chosen (its past share of
        its layer's runs as the chance of being chosen in a run)."""
        if not self.estimate_unhinted:
            return math.inf
        layer = key[0]
        n = len(self._layer_pos)
        here = self._layer_pos.get(self._last_layer, 0)
        steps = (self._layer_pos[layer] - here) % n or n
        chance = min(1.0, self._freq[key] / max(1, self._layer_runs[layer]))
        return math.inf if chance <= 0 else steps + n * (1.0 / chance - 1.0)

    def _find_victim(self, protect, *, demand: bool) -> _Slot | None:
        """A slot to load into (lock held): a free one, a new one within budget, or
        one evicted per policy. ``demand``: may also cancel a queued prefetch, and
        raises when every slot is pinned. None: nothing can be freed now."""
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.num_slots:
            slot = _Slot(len(self._slots), torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device))
            self._slots.append(slot)
            self.stats.set_cache_bytes(len(self._slots) * self.slot_bytes)
            return slot
        best = best_pref = None
        for slot in self._slots:
            if slot.state != _READY or slot.pins or slot.key in protect:
                continue
            k = self._eviction_key(slot)
            if slot.protected:
                if best_pref is None or k < best_pref[0]:
                    best_pref = (k, slot)
            elif best is None or k < best[0]:
                best = (k, slot)
        if not demand:
            best_pref = None     # a prefetch never throws away another prefetch that is still expected
        victim = (best or best_pref or (None, None))[1]
        if victim is not None:
            layer = victim.key[0]
            wasted = int(victim.prefetched)
            self.stats.add(layer, evictions=1, prefetch_wasted=wasted)
            self._free_slot(victim)
            self._free.remove(victim)
            return victim
        if not demand:
            return None
        queued = [s for s in self._slots if s.state == _QUEUED and s.key not in protect]
        if queued:   # cancel the most recently queued prefetch (the furthest-ahead prediction)
            victim = max(queued, key=lambda s: s.last_use)
            self.stats.add(victim.key[0], prefetch_wasted=1)
            self._free_slot(victim)
            self._free.remove(victim)
            return victim
        if any(s.state == _LOADING for s in self._slots):
            return None
        raise RuntimeError(
            f"expertflow_compile: all {self.num_slots} expert cache slots are pinned (acquired and not released), "
            f"so no expert can be loaded; hold at most {self.num_slots} experts at once or raise expert_budget"
        )

    def _use(self, slot: _Slot, key, *, waited: bool, t_wait) -> dict[str, torch.Tensor]:
        """Pin a READY slot for an acquire and count it (lock held)."""
        slot.pins += 1
        self._freq[key] += 1
        self._touch(slot)
        self._consume_hint(key)
        used = int(slot.prefetched)
        self._unprotect(slot)
        if waited:
            self.stats.add(key[0], hits=1, inflight_waits=1, prefetch_used=used,
                           stall=time.perf_counter() - t_wait)
        else:
            self.stats.add(key[0], hits=1, prefetch_used=used)
        views = self._views_for(slot, key[0])
        if self._cuda and slot.ready_event is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_event)
        return views

    def _views_for(self, slot: _Slot, layer: int) -> dict[str, torch.Tensor]:
        layout = self._layouts[layer]
        views = slot.views.get(layout)
        if views is None:
            views = slot.views[layout] = _make_views(slot.buf, layout)
        return dict(views)

    def _staging_views(self, st: _Staging, layer: int) -> dict[str, torch.Tensor]:
        layout = self._layouts[layer]
        views = st.views.get(layout)
        if views is None:
            views = st.views[layout] = _make_views(st.buf, layout)
        return dict(views)

    def _load(self, slot: _Slot, layer: int, expert: int, *, background: bool) -> None:
        """Read the expert into the slot (no lock held; the slot is in flight)."""
        if not self._staged:
            self.store.read_into(layer, expert, self._views_for(slot, layer))
            return
        n = self._slot_need[layer]
        if background:
            if not self._staging:
                self._staging = [_Staging(self.slot_bytes, self._cuda) for _ in range(2)]
            st = self._staging[self._staging_turn]
            self._staging_turn ^= 1
            self._copy_via(st, slot, layer, expert, n, self._side_stream)
        else:
            with self._demand_lock:
                if self._demand_staging is None:
                    self._demand_staging = _Staging(self.slot_bytes, self._cuda)
                stream = torch.cuda.current_stream(self.device) if self._cuda else None
                self._copy_via(self._demand_staging, slot, layer, expert, n, stream)

    def _copy_via(self, st: _Staging, slot: _Slot, layer: int, expert: int, n: int, stream) -> None:
        if st.event is not None:
            st.event.synchronize()          # the staging buffer's previous copy must be done
        self.store.read_into(layer, expert, self._staging_views(st, layer))
        if not self._cuda:                  # other devices: a plain blocking copy
            slot.buf[:n].copy_(st.buf[:n])
            return
        with torch.cuda.stream(stream):
            for ev in (slot.release_event, slot.ready_event):
                if ev is not None:
                    stream.wait_event(ev)   # the slot's last users and last fill come first
            slot.buf[:n].copy_(st.buf[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        st.event = ev
        slot.ready_event = ev

    def _worker_load(self, item) -> None:
        slot, key, load_id = item
        with self._cond:
            if slot.load_id != load_id or slot.state != _QUEUED:
                return                      # taken over by an acquire, or cancelled
            if self._stop.is_set():
                self.stats.add(key[0], prefetch_wasted=1)
                self._free_slot(slot)
                return
            slot.state = _LOADING
            slot.loader = threading.current_thread()
        try:
            self._load(slot, key[0], key[1], background=True)
        except BaseException as exc:
            self._load_failed(slot, key, exc, prefetch=True)
            return
        with self._cond:
            slot.state = _READY
            slot.loader = None
            self.stats.add(key[0], prefetch_loads=1, bytes_moved=self._expert_bytes[key[0]])
            self._cond.notify_all()

    def _load_failed(self, slot: _Slot, key, exc: BaseException, *, prefetch: bool) -> None:
        with self._cond:
            if prefetch:
                self.stats.add(key[0], prefetch_failed=1, prefetch_wasted=1)
            self._free_slot(slot)
            first = not self._error_logged
            self._error_logged = True
        if not prefetch:
            return                          # the caller raises
        msg = ("expertflow_compile: prefetching expert %d of layer %d failed (%s: %s); it will be loaded on "
               "demand when needed")
        if first:
            logger.error(msg + " (further load errors of this cache are logged at DEBUG level)",
                         key[1], key[0], type(exc).__name__, exc, exc_info=exc)
        else:
            logger.debug(msg, key[1], key[0], type(exc).__name__, exc)
