"""The device tier: a fixed pool of expert slots, a slot table and a prefetcher.

:class:`ExpertCache` owns ``num_slots`` slots of ``slot_bytes`` (the largest layer's
``ExpertSpec.slot_nbytes()``) in one :class:`~expertflow_compile.runtime.pool.SlotPool`, so
at most ``budget_bytes = num_slots * slot_bytes`` are ever allocated. A slot can hold an
expert of ANY MoE layer; the slot table maps ``(layer, expert) -> slot`` for all layers at
once (a dict on the host and an int64 tensor ``[layers, experts]`` the kernels read), so
layers share the budget by demand.

Slot states: FREE (no expert), QUEUED (assigned, load not started: waiting for the worker,
or reserved by a layer call that loads it itself), LOADING (being read, by the worker or a
caller), READY (loaded). QUEUED and LOADING are "in flight". Pinned slots (held by a layer
call or an ``acquire``) are never evicted nor cancelled.

**Prefetches do no harm**: a prefetch for a use ``d`` layer moves away evicts only an expert
whose predicted next use (``Policy.next_use``) is further than ``d``; otherwise it stops.

**Which slot to evict** is the policy's choice (:mod:`~expertflow_compile.runtime.policies`,
names in ``POLICIES``): the policy keeps the *candidates* (READY, unpinned, not protected)
in a structure ordered by its eviction key, so a victim is found in O(log n), independent
of the slot count. With every policy, an expert prefetched and not yet used is "protected"
until execution has gone through its layer without using it (then it was a misprediction:
loaded, it competes normally; still queued, it is cancelled): while protected, a demand load evicts it only when no other victim
exists (the few protected slots are then compared by the policy's key), and another
prefetch never evicts it. A demand load that finds no victim cancels the most recently
queued unpinned prefetch, else waits for a load in flight or for another thread's pins.

**One call per MoE layer call**: :meth:`ExpertCache.acquire_layer` takes the layer's unique
expert ids and answers for all of them under one lock: the resident ones are pinned, the
loads of the missing ones are issued at once (queued to the worker, so they overlap each
other and the resident experts' compute; ``queue_missing=False``: each is loaded by the
caller when it is reached), and a :class:`LayerLease` comes back. Iterating the lease
yields ``(expert, views)`` resident experts first, then each missing one as soon as it can
be had (already loaded by the worker, else a queued one the caller loads itself, else one
being loaded is waited for); each expert is released when the iteration moves past it, so
a layer touching more experts than there are slots runs in chunks. ``lease.wait_all()``
instead holds every expert at once (the fused kernels read them together through the slot
table; the reservation is then all-or-nothing, so two such calls never deadlock).
``lease.release()`` releases the rest; counters are added once per lease, at release.
``acquire(layer, expert)`` / ``release(layer, expert)`` do the same for one expert.

**Predictions**: ``set_predicted(layer, experts, distance)`` (``distance``: MoE layer moves
from the current one) and, when none was given, ``prefetch(layer, experts)`` (distance =
how many MoE layers ahead ``layer`` is, in the store's layer order, wrapping around) hint
the ``"predictive"`` policy. A prediction is consumed by the expert's next use; the
predictions of a layer still unconsumed when execution moves on from it are dropped.
Predictions and protection follow the order in which layers are entered (``acquire_layer``,
``acquire``, or ``enter_layer``), so they assume one thread runs the MoE layers in order
(the compiled model does); other threads may acquire concurrently, correctly, with less
useful hints. **Prediction that pays** (the engine's rule with the predictive policy): at a
layer's prediction the layer is entered (the previous one is done), every candidate is
hinted, and only candidates at list positions whose measured precision reaches
``min_precision`` are loaded (``prefetch(..., min_precision=)``); the router's choice
(``enter_layer(layer, routed=)``) scores the list, voids this call's predictions it did not
choose, cancels the layer's queued wrong prefetches and makes its loaded wrong ones the
first victims, so the call's own misses take back the slots they took.

**Threads**: when every slot is pinned, a call waits for other threads to release theirs
(bounded by ``pin_timeout`` seconds, then ``RuntimeError`` naming the cause) and raises at
once when the pins are the calling thread's own (waiting could never end). A model may thus
be called from several threads even at the minimum budget; they take turns for slots.

**Loads**: prefetching runs off the caller's thread: on CPU a daemon worker thread reads
from the store straight into the slot; on CUDA the worker reads into a pinned staging buffer
and copies it on a side stream, recording an event the consumer's stream waits on (and a
slot's refill waits on the event recorded at its last release). A worker load that fails is
logged once (logger ``"expertflow_compile"``) and the expert is demand-loaded when needed.
A caller's own load failing with an I/O error (``OSError``) raises ``RuntimeError`` (a
queued prefetch the caller took over is retried once as a demand load first); any other
exception - ``KeyboardInterrupt`` above all - propagates unchanged. Either way the slot is
freed and nothing of the failed call stays pinned or in flight. ``prefetch="deferred"``
queues prefetches without a worker: :meth:`ExpertCache.run_prefetches` performs them (a
deterministic replay of the same policy code).

See :mod:`expertflow_compile.runtime.stats` for what each counter means.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref

import torch

from .policies import POLICIES, Policy, PredictivePolicy, make_policy
from .pool import SlotPool
from .stats import RuntimeStats
from .store import ExpertStore

__all__ = ["ExpertCache", "LayerLease", "VALID_POLICIES", "WORKER_THREAD_NAME"]

logger = logging.getLogger("expertflow_compile")

VALID_POLICIES = POLICIES
WORKER_THREAD_NAME = "expertflow-prefetch"

_FREE, _QUEUED, _LOADING, _READY = 0, 1, 2, 3
_STATE_NAMES = {_FREE: "free", _QUEUED: "queued", _LOADING: "loading", _READY: "ready"}


class _Slot:
    __slots__ = (
        "index", "key", "state", "pins", "last_use", "prefetched", "demand", "protected", "load_id", "loader",
        "ready_event", "release_event", "pq_seq", "pq_group",
    )

    def __init__(self, index: int):
        self.index = index
        self.key: tuple[int, int] | None = None
        self.state = _FREE
        self.pins = 0
        self.last_use = 0
        self.prefetched = False      # queued to the worker and not used yet
        self.demand = False          # ... as a layer call's own miss (queue_misses): a demand load
        self.protected = False       # prefetched for a layer that has not run yet: evicted last
        self.load_id = 0             # bumps whenever the slot's pending load changes hands
        self.loader: threading.Thread | None = None
        self.ready_event = None      # CUDA: event after the last copy into the slot
        self.release_event = None    # CUDA: event after the last use of the slot
        self.pq_seq = 0              # the policy's live entry (policies.py)
        self.pq_group = None         # the policy structure holding it; None: not a candidate


class _Staging:
    """A pinned host buffer for CUDA copies, reused once its last copy is done."""

    def __init__(self, nbytes: int, pin: bool, specs: dict):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.event = None
        self.pool = SlotPool(1, nbytes, torch.device("cpu"), specs)
        self.pool.buf = self.buf


class _Counts:
    """Counters of one lease, added to the stats once."""

    __slots__ = ("hits", "resident", "arrived", "misses", "inflight_waits", "prefetch_used", "prefetch_late",
                 "prefetch_issued", "demand_loads", "bytes_moved", "stall")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def flush(self, stats: RuntimeStats, layer: int) -> None:
        counts = {}
        for name in _COUNT_NAMES:
            n = getattr(self, name)
            if n:
                counts[name] = n
                setattr(self, name, 0)
        stall, self.stall = self.stall, 0
        if counts or stall:
            stats.add(layer, stall=stall, **counts)


_COUNT_NAMES = _Counts.__slots__[:-1]   # every counter but stall


def _worker_main(ref, q: queue.SimpleQueue, device: torch.device) -> None:
    # Holds only a weak reference to the cache between batches, so a dropped cache is
    # collected and its finalizer stops this thread.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    while True:
        batch = q.get()
        if batch is None:
            return
        cache = ref()
        if cache is None:
            return
        try:
            cache._worker_batch(batch)
        except BaseException:  # _worker_load handles load errors; never let the thread die silently
            logger.exception("expertflow_compile: unexpected error in the prefetch worker")
        finally:
            del cache


def _shutdown(q, stop: threading.Event, thread: threading.Thread | None) -> None:
    stop.set()
    if thread is None:
        return
    q.put(None)
    if thread is not threading.current_thread():
        thread.join()


class LayerLease:
    """The experts of one MoE layer call, pinned together (see the module docstring).

    Iterate for ``(expert, views)``; or call :meth:`wait_all` to hold them all at once;
    then :meth:`release` (also after an error; idempotent).
    """

    __slots__ = ("cache", "layer", "experts", "tid", "_held", "_ready", "_pending", "_deferred", "_counts",
                 "_released")

    def __init__(self, cache: "ExpertCache", layer: int, experts: list[int]):
        self.cache = cache
        self.layer = layer
        self.experts = experts
        self.tid = threading.get_ident()
        self._held: dict[int, _Slot] = {}     # expert -> slot pinned by this lease
        self._ready: list = []                # (expert, slot): ready, use counted
        self._pending: list[int] = []         # held, in flight (the worker's), not counted yet
        self._deferred: list[int] = []        # not held yet: taken when reached
        self._counts = _Counts()
        self._released = False

    def __iter__(self):
        cache, layer = self.cache, self.layer
        views = cache.pool.views
        chunked = bool(self._deferred)        # slots are short: release each expert once used
        for e, slot in self._ready:
            if slot.ready_event is not None:
                cache._wait_ready(slot)
            yield e, views(slot.index, layer)
            if chunked:
                cache._unpin(self, e)
        while self._pending:
            e, slot = cache._next_pending(self)
            yield e, views(slot.index, layer)
            if chunked:
                cache._unpin(self, e)
        while self._deferred:
            e = self._deferred.pop(0)
            slot = cache._take_deferred(self, e)
            yield e, views(slot.index, layer)
            cache._unpin(self, e)

    def wait_all(self) -> dict:
        """Every expert loaded and held at once: ``{expert: views}``."""
        cache, layer = self.cache, self.layer
        views = cache.pool.views
        out = {}
        for e, slot in self._ready:
            if slot.ready_event is not None:
                cache._wait_ready(slot)
            out[e] = views(slot.index, layer)
        while self._pending:
            e, slot = cache._next_pending(self)
            out[e] = views(slot.index, layer)
        while self._deferred:                 # not reserved together (all_at_once=False): one by one
            e = self._deferred.pop(0)
            out[e] = views(cache._take_deferred(self, e).index, layer)
        return out

    @property
    def chunked(self) -> bool:
        """True when the slots could not take every expert at once: iterate (each expert is
        released once used) instead of ``wait_all``."""
        return bool(self._deferred)

    @property
    def held(self) -> dict[int, int]:
        """``{expert: slot index}`` of the experts this lease holds now."""
        return {e: s.index for e, s in self._held.items()}

    def release(self) -> None:
        """Unpin everything still held and add the lease's counters to the stats."""
        if self._released:
            return
        self._released = True
        self.cache._release_lease(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class ExpertCache:
    """A budgeted pool of expert slots on ``device`` in front of an :class:`ExpertStore`.

    Thread-safe. Typical use per MoE layer call: ``prefetch`` the experts predicted for
    coming layers; ``acquire_layer`` the experts needed now and compute each as the lease
    yields it; ``release`` the lease. ``policy``: a name in ``POLICIES`` or a
    :class:`~expertflow_compile.runtime.policies.Policy`. ``prefetch``: True (a worker
    thread), False (none), or ``"deferred"`` (queued; :meth:`run_prefetches` runs them).
    ``queue_misses``: queue a layer call's missing loads to the worker (default: on CUDA,
    where they overlap on the side stream; on CPU the caller reads them itself - a RAM
    copy under the GIL gains nothing from a thread hand-off).
    """

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        *,
        policy: "str | Policy" = "lru",
        device: torch.device | str = "cpu",
        prefetch: "bool | str" = True,
        stats: RuntimeStats | None = None,
        staging: bool | None = None,
        queue_misses: bool | None = None,
        pin_timeout: float = 30.0,
    ):
        strategy = make_policy(policy)
        specs = dict(store.specs)
        if not specs:
            raise ValueError("the expert store has no MoE layers")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        if prefetch not in (True, False, "deferred"):
            raise ValueError(f"prefetch must be True, False or 'deferred', got {prefetch!r}")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"expert cache device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        self.store = store
        self.specs = specs
        self.strategy = strategy
        self.policy = strategy.name
        self.device = device
        self.pin_timeout = float(pin_timeout)
        self._slot_need = {layer: spec.slot_nbytes() for layer, spec in specs.items()}
        self._expert_bytes = {layer: spec.expert_nbytes() for layer, spec in specs.items()}
        self._num_experts = {layer: spec.num_experts for layer, spec in specs.items()}
        order = sorted(specs)
        self._layer_pos = {layer: i for i, layer in enumerate(order)}
        self.slot_bytes = max(self._slot_need.values())
        self.total_experts = sum(s.num_experts for s in specs.values())
        self.num_slots = min(num_slots, self.total_experts)
        self.budget_bytes = self.num_slots * self.slot_bytes
        self.stats = stats if stats is not None else RuntimeStats()
        self.stats.budget_bytes = self.budget_bytes
        self.stats.num_slots = self.num_slots
        self.pool = SlotPool(self.num_slots, self.slot_bytes, device, specs)
        strategy.bind(order)
        self._on_use = None if type(strategy).on_use is Policy.on_use else strategy.on_use

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots: list[_Slot] = []          # handed out so far (index order)
        self._free: list[_Slot] = []
        self._table: dict[tuple[int, int], _Slot] = {}
        self._ready: dict[int, set[int]] = {layer: set() for layer in order}
        self._inflight = 0                     # QUEUED + LOADING
        self._loading = 0
        self._queued_idle: dict[_Slot, None] = {}        # unpinned QUEUED prefetches, in queue order
        self._protected: dict[int, dict[_Slot, None]] = {}   # layer -> its protected prefetched slots (in order)
        self._pins_by_thread: dict[int, int] = {}
        self._pins = 0
        self._waiting = 0                                # threads waiting on _cond
        self._evicted: dict[int, list[int]] = {}         # layer -> [evictions, wasted prefetches], to add
        self._tick = 0
        self._clock = 0
        self._last_layer: int | None = None
        self._load_ids = itertools.count(1)
        self._error_logged = False
        self._closed = False

        self._cuda = device.type == "cuda"
        # load through a host staging buffer (CUDA: pinned + async copy); CPU reads go straight into the slot
        self._staged = (device.type != "cpu") if staging is None else bool(staging)
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        self._staging: list[_Staging] = []      # worker's (CUDA / non-CPU devices)
        self._staging_turn = 0
        self._demand_staging: _Staging | None = None
        self._demand_lock = threading.Lock()

        self._deferred_mode = prefetch == "deferred"
        self._queue: "queue.SimpleQueue | None" = queue.SimpleQueue() if prefetch is True else None
        self._deferred_items: list = []
        self._queue_misses = self._cuda if queue_misses is None else bool(queue_misses)
        # a store that fills many slots in one call (runtime/host_tensors.py); direct reads only
        self._read_many = None if self._staged else getattr(store, "read_many", None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch is True:
            self._thread = threading.Thread(
                target=_worker_main, args=(weakref.ref(self), self._queue, device),
                name=WORKER_THREAD_NAME, daemon=True,
            )
            self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, self._stop, self._thread)

    # ------------------------------------------------------------------ public

    @property
    def prefetching(self) -> bool:
        """True when prefetches are queued (a worker, or deferred) and the cache is open."""
        return (self._thread is not None or self._deferred_mode) and not self._closed

    def prefetch(self, layer: int, experts, *, harm_limit: float | None = None,
                 min_precision: float | None = None, enter: bool = False) -> int:
        """Enqueue asynchronous loads of the non-resident ``experts`` of ``layer``.

        Never blocks on I/O. Never evicts pinned, in-flight or protected slots, nor experts
        of this same request, nor an expert predicted to be used within ``harm_limit`` layer
        moves (default: the prefetched layer's distance; a caller that knows the layer call
        will free better slots passes more); stops early when no slot can be freed. Returns
        how many loads were enqueued (0 when prefetching is off or the cache is closed).

        ``min_precision`` (``"predictive"`` policy): ``experts`` is the predictor's whole
        candidate list, best first; every one is hinted, but only those at list positions
        whose measured precision for this layer (``PredictivePolicy.precision``, scored by
        ``enter_layer(routed=)``) is at least ``min_precision`` are loaded - the rest wait for
        the router (what is worth a load).

        ``enter``: first move execution to ``layer`` (:meth:`enter_layer` without ``routed``),
        under the same lock.
        """
        layer = int(layer)
        req = list(dict.fromkeys(map(int, experts)))
        self._check_keys(layer, req)
        issued = []
        cands = req
        with self._lock:
            if enter:
                self._advance_clock(layer)
            dist = self._layer_distance(layer)
            if self.policy == "predictive":
                strategy = self.strategy
                hints = strategy.hints.get(layer)
                due = [hints[e] for e in req if e in hints] if hints else None
                strategy.hint(layer, req, dist, self._table.get)
                if due:       # an earlier hint (set_predicted) may be sooner than the layer distance
                    dist = min(dist, max(0, min(due) - strategy.clock))
                if min_precision is not None:
                    strategy.note_candidates(layer, req)
                    cands, req = req, strategy.precise(layer, req, min_precision)
            if harm_limit is not None:
                dist = max(dist, harm_limit)
            if not self.prefetching:
                return 0
            skip = protected = None
            table = self._table
            for e in req:
                key = (layer, e)
                slot = table.get(key)
                if slot is not None:
                    if slot.state == _READY:
                        self._touch(slot)
                    continue
                if skip is None:
                    skip = {(layer, x) for x in cands}
                # do no harm: evict only an expert predicted to be used later than this one
                slot = self._free_or_victim(skip, demand=False, harm_limit=dist)
                if slot is None:
                    break
                self._assign(slot, key, _QUEUED)
                slot.prefetched = slot.protected = True
                if protected is None:
                    protected = self._protected.setdefault(layer, {})
                protected[slot] = None
                self._queued_idle[slot] = None
                self._tick += 1
                slot.last_use = self._tick
                issued.append((slot, key, slot.load_id))
            self._submit(issued)
            evicted, self._evicted = self._evicted, {}
        if issued:
            self.stats.add(layer, prefetch_issued=len(issued))

        if evicted:
            self._flush_evictions(evicted)
        return len(issued)

    def set_predicted(self, layer: int, experts, distance: "int | None" = 1, *, complete: bool = False) -> None:
        """Hint for the ``"predictive"`` policy: ``experts`` of ``layer`` will be used
        ``distance`` MoE layers from now (0 = the layer running now; None: how many MoE layers
        ahead ``layer`` is, as :meth:`prefetch` counts). ``complete``: they are every candidate
        of that call (a predictor's whole list), so the layer's other cached experts are
        expected to skip it and go first as victims. Ignored by the other policies."""
        if self.policy != "predictive":
            return
        layer = int(layer)
        req = [int(e) for e in experts]
        self._check_keys(layer, req)
        with self._lock:
            if distance is None:
                distance = self._layer_distance(layer)
            if complete:
                self.strategy.hint(layer, req, max(int(distance), 0), self._table.get, complete=True)
            else:
                self.strategy.hint(layer, req, max(int(distance), 0), self._table.get)

    def enter_layer(self, layer: int, routed=None) -> None:
        """Move execution to ``layer`` as its first acquire would (predictions of the layer
        left behind are dropped, its unused prefetches lose their protection).

        ``routed``: the experts the router chose for this call, when known before they are
        acquired. The layer's predictions it did not choose are dropped, and the layer's own
        prefetches it disagrees with are demoted at once (do no
        harm): a queued one is cancelled before any transfer, a loaded one loses its
        protection and its prediction and becomes the first victim (``last_use = 0``: every
        policy evicts it first), so the call's own misses take its slot - the slot it took
        from the victim a demand load would have evicted - instead of evicting another expert."""
        layer = int(layer)
        chosen = None if routed is None else {int(e) for e in routed}
        self._check_keys(layer, sorted(chosen) if chosen else ())
        with self._lock:
            self._advance_clock(layer)
            if chosen is None:
                return
            wrong = [s for s in self._protected.get(layer, ()) if s.key[1] not in chosen]
            if self.policy == "predictive":    # the router decided: this call's predictions it did not choose are void
                self.strategy.observe(layer, chosen, {s.key[1] for s in self._protected.get(layer, ())
                                                      if s.state in (_READY, _LOADING)})
                hints = self.strategy.hints.get(layer)
                if hints:                      # (a hint due before the layer's next pass is this call's)
                    horizon = self.strategy.clock + len(self._layer_pos)
                    void = {e for e, due in hints.items() if due < horizon and e not in chosen}
                    void.update(s.key[1] for s in wrong)
                    for e in void:
                        if hints.pop(e, None) is not None:
                            slot = self._table.get((layer, e))
                            if slot is not None and slot.pq_group is not None:
                                self.strategy.refresh(slot)
            if not wrong:
                return
            protected = self._protected[layer]
            for slot in wrong:
                if slot.pins:
                    continue
                if slot.state == _QUEUED and slot.prefetched and not slot.demand:
                    self._count_eviction(layer, evicted=0, cancelled=1)
                    self._free_slot(slot)
                elif slot.state == _READY:           # (a load in flight keeps its protection until it lands)
                    protected.pop(slot, None)
                    slot.protected = False
                    slot.last_use = 0
                    self._settle(slot)
            evicted, self._evicted = self._evicted, {}
        if evicted:
            self._flush_evictions(evicted)

    def acquire_layer(self, layer: int, experts, *, resident_first: bool = True, loads: str = "issue",
                      all_at_once: bool = False) -> LayerLease:
        """Hold the ``experts`` of ``layer`` for one layer call; returns the
        :class:`LayerLease` (see the module docstring).

        Resident experts are pinned and counted as hits. ``loads="issue"``: every missing
        expert gets a slot now (evicting per policy) and its load is issued at once - queued
        to the worker (``queue_misses``), else read here, all of them, before returning;
        what finds no slot now is taken when the iteration reaches it. ``loads="lazy"``:
        each missing expert is given a slot and loaded when reached (one at a time, in
        order: exactly the per-expert ``acquire`` sequence). ``resident_first``: the lease
        yields resident experts first (False: in the given order, from the first missing
        one on lazily). ``all_at_once``: every expert is held together (``wait_all``); the
        reservation is all-or-nothing and waits until it can take all. Raises
        ``RuntimeError`` when more experts are asked at once than there are slots.
        """
        layer = int(layer)
        req = list(dict.fromkeys(map(int, experts)))
        self._check_keys(layer, req)
        if loads not in ("issue", "lazy"):
            raise ValueError(f"loads must be 'issue' or 'lazy', got {loads!r}")
        if all_at_once and len(req) > self.num_slots:
            raise RuntimeError(f"expertflow_compile: {len(req)} experts of layer {layer} cannot be held at once in "
                               f"{self.num_slots} expert cache slots")
        lease = LayerLease(self, layer, req)
        self.stats.log_call(layer, req)
        lazy = loads == "lazy" or not resident_first
        deadline = None
        with self._lock:
            self._advance_clock(layer)
            while True:
                batch = self._reserve(lease, req, resident_first, lazy, all_at_once)
                if batch is not None:
                    break
                # all_at_once and a slot was short: nothing is held now; wait for a change
                now = time.perf_counter()
                deadline = deadline or now + self.pin_timeout
                if now >= deadline:
                    raise self._pinned_error(waited=True)
                self._wait(min(0.05, deadline - now))
                lease._counts.stall += time.perf_counter() - now
        if batch:
            self._load_batch(lease, batch)
        return lease

    def acquire(self, layer: int, expert: int):
        """Pin one expert and return ``{name: tensor}`` views into its slot (read-only);
        ``release(layer, expert)`` unpins it.

        Resident -> hit. Being loaded by the worker -> waits (a hit and an in-flight wait;
        stall time). Missing, or its prefetch still queued -> loads it in this thread (a
        miss), evicting per policy. Raises ``RuntimeError`` when every slot stays pinned.
        """
        lease = self.acquire_layer(layer, [expert], loads="lazy")
        try:
            views = lease.wait_all()[int(expert)]
        except BaseException:
            lease.release()
            raise
        lease._held.clear()                    # the pin now belongs to the caller: release() drops it
        lease.release()
        return views

    def release(self, layer: int, expert: int) -> None:
        """Unpin the expert (one ``release`` per ``acquire``)."""
        key = (int(layer), int(expert))
        with self._lock:
            slot = self._table.get(key)
            if slot is None or slot.state != _READY or slot.pins <= 0:
                raise RuntimeError(f"release(layer={key[0]}, expert={key[1]}) without a matching acquire")
            self._unpin_slot(slot, threading.get_ident(), self._record_release())

    def run_prefetches(self) -> int:
        """``prefetch="deferred"``: perform the queued prefetches now, in order; returns how many."""
        batches, self._deferred_items = self._deferred_items, []
        for batch in batches:
            self._worker_batch(batch)
        return sum(len(b) for b in batches)

    def is_resident(self, layer: int, expert: int) -> bool:
        """Loaded and ready (not in flight)."""
        with self._lock:
            return int(expert) in self._ready.get(int(layer), ())

    def resident_experts(self, layer: int) -> set[int]:
        with self._lock:
            return set(self._ready.get(int(layer), ()))

    def assigned(self) -> list[tuple[int, int]]:
        """Every ``(layer, expert)`` holding a slot now (ready or in flight)."""
        with self._lock:
            return list(self._table)

    def in_flight(self) -> int:
        """Number of loads queued or running."""
        with self._lock:
            return self._inflight

    def pinned(self) -> int:
        """Number of pins held now (a slot held by two calls counts twice)."""
        with self._lock:
            return self._pins

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no load is in flight (tests, benchmarks). Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wait(0.05 if left is None else min(left, 0.05))
        return True

    @property
    def slot_table(self) -> torch.Tensor:
        """int64 ``[layers, max experts]`` (rows in layer order): slot of each ready expert, else -1."""
        return self.pool.table

    def slot_row(self, layer: int) -> torch.Tensor:
        """``layer``'s slot-table row on the compute device (see :mod:`.pool`)."""
        return self.pool.device_row(int(layer), self._num_experts[int(layer)])

    def check_consistency(self) -> None:
        """Raise ``AssertionError`` unless every structure agrees with the slots (tests; O(n)):
        the slot table (dict and tensor), ready sets, in-flight and pin counts, the policy's
        candidates (READY, unpinned, unprotected), the queued and protected sets."""
        with self._lock:
            table, ready = self._table, {l: set() for l in self._ready}
            inflight = loading = pins = candidates = 0
            for slot in self._slots:
                state, key = slot.state, slot.key
                pins += slot.pins
                assert slot.pins >= 0, f"slot {slot.index}: {slot.pins} pins"
                if state == _FREE:
                    assert key is None and slot.pins == 0 and slot.pq_group is None, f"free slot {slot.index}: {key}"
                    assert slot in self._free, f"free slot {slot.index} not on the free list"
                    continue
                assert table.get(key) is slot, f"slot {slot.index} holds {key} but the table says otherwise"
                row = self.pool.row[key[0]]
                shown = int(self.pool._np[row, key[1]])
                if state == _READY:
                    ready[key[0]].add(key[1])
                    assert shown == slot.index, f"{key} READY in slot {slot.index}, slot table shows {shown}"
                    assert slot.loader is None, f"{key} READY with a loader"
                else:
                    assert shown == -1, f"{key} in flight ({_STATE_NAMES[state]}) but the slot table shows {shown}"
                    inflight += 1
                    loading += state == _LOADING
                    assert (state == _LOADING) == (slot.loader is not None), f"{key} {_STATE_NAMES[state]} loader"
                want = state == _READY and slot.pins == 0 and not slot.protected
                assert (slot.pq_group is not None) == want, f"{key}: candidate={slot.pq_group is not None}, " \
                    f"state {_STATE_NAMES[state]}, {slot.pins} pins, protected={slot.protected}"
                candidates += want
                queued_idle = state == _QUEUED and slot.pins == 0
                assert (slot in self._queued_idle) == queued_idle, f"{key}: queued-idle set disagrees"
                if queued_idle:
                    assert slot.prefetched, f"{key}: unpinned QUEUED slot without a prefetch"
                assert slot.protected == (slot in self._protected.get(key[0], ())), f"{key}: protected set"
            assert len(table) == len(self._slots) - len(self._free), "the table has keys no slot holds"
            assert ready == self._ready, "ready sets disagree with the slots"
            assert inflight == self._inflight and loading == self._loading, \
                f"in flight {inflight}/{self._inflight}, loading {loading}/{self._loading}"
            assert pins == self._pins == sum(self._pins_by_thread.values()), \
                f"pins {pins}, counted {self._pins}, by thread {self._pins_by_thread}"
            assert candidates == self.strategy.candidates, f"{candidates} candidates, policy has " \
                f"{self.strategy.candidates}"
            assert int((self.pool.table >= 0).sum()) == sum(len(v) for v in ready.values()), \
                "the slot table shows experts no slot holds"

    @property
    def allocated_bytes(self) -> int:
        return len(self._slots) * self.slot_bytes

    def close(self) -> None:
        """Stop and join the prefetch worker (queued prefetches are dropped). Idempotent.
        The cache still serves ``acquire`` afterwards, with demand loads only."""
        with self._lock:
            self._closed = True
        self._finalizer()
        with self._lock:   # prefetches the worker never reached (deferred mode)
            for slot in list(self._queued_idle):
                if slot.state == _QUEUED and slot.pins == 0:   # noqa: SIM102
                    self._count_eviction(slot.key[0], evicted=0, cancelled=1)
                    self._free_slot(slot)
            self._deferred_items = []
            evicted, self._evicted = self._evicted, {}
        self._flush_evictions(evicted)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"ExpertCache(policy={self.policy!r}, device={str(self.device)!r}, num_slots={self.num_slots}, "
            f"slot_bytes={self.slot_bytes}, budget_bytes={self.budget_bytes}, resident={len(self._table)})"
        )

    # ------------------------------------------------------------ internals: bookkeeping (lock held)

    def _check_keys(self, layer: int, experts) -> None:
        n = self._num_experts.get(layer)
        if n is None:
            raise KeyError(f"no MoE layer {layer} in the expert cache (layers: {sorted(self.specs)})")
        if experts and (min(experts) < 0 or max(experts) >= n):
            bad = next(e for e in experts if not 0 <= e < n)
            raise IndexError(f"expert {bad} out of range for layer {layer} ({n} experts)")

    def _layer_distance(self, layer: int) -> int:
        """MoE layer moves from the current layer to ``layer`` in the store's order, wrapping
        around (lock held)."""
        pos, last = self._layer_pos[layer], self._layer_pos.get(self._last_layer)
        return pos if last is None else (pos - last) % len(self._layer_pos)

    def _settle(self, slot: _Slot) -> None:
        """Make the slot's candidacy match its state."""
        if slot.state == _READY and slot.pins == 0 and not slot.protected:
            if slot.pq_group is None:
                self.strategy.add(slot)
        elif slot.pq_group is not None:
            self.strategy.discard(slot)

    def _touch(self, slot: _Slot) -> None:
        self._tick += 1
        slot.last_use = self._tick
        if slot.pq_group is not None:
            self.strategy.refresh(slot)

    def _pin_slot(self, slot: _Slot, tid: int) -> None:
        slot.pins += 1
        self._pins += 1
        pins = self._pins_by_thread
        pins[tid] = pins.get(tid, 0) + 1
        if slot.pq_group is not None:
            self.strategy.discard(slot)
        elif slot.pins == 1 and slot.state == _QUEUED:
            self._queued_idle.pop(slot, None)

    def _drop_pin(self, slot: _Slot, tid: int) -> None:
        slot.pins -= 1
        self._pins -= 1
        pins = self._pins_by_thread
        left = pins.get(tid, 0) - 1
        if left > 0:
            pins[tid] = left
        else:
            pins.pop(tid, None)

    def _unpin_slot(self, slot: _Slot, tid: int, event=None) -> None:
        self._drop_pin(slot, tid)
        if event is not None:
            slot.release_event = event
        if slot.pins == 0:
            state = slot.state
            if state == _READY:
                if not slot.protected:
                    self.strategy.add(slot)
            elif state == _QUEUED:
                if not slot.prefetched:          # reserved by a call that never loaded it
                    self._free_slot(slot)
                    return
                self._queued_idle[slot] = None
            if self._waiting:
                self._cond.notify_all()

    def _wait(self, timeout: float) -> None:
        """Wait for a change of the slots."""
        self._waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _record_release(self):
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _assign(self, slot: _Slot, key, state) -> None:
        if slot.protected:
            self._unprotect(slot)
        slot.key = key
        slot.state = state
        slot.load_id = next(self._load_ids)
        slot.prefetched = slot.demand = False
        self._table[key] = slot
        self._inflight += 1

    def _set_ready(self, slot: _Slot) -> None:
        slot.state = _READY
        slot.loader = None
        self._inflight -= 1
        layer, expert = slot.key
        self._ready[layer].add(expert)
        self.pool.set(layer, expert, slot.index)
        if slot.pins == 0 and not slot.protected:
            self.strategy.add(slot)
        if self._waiting:
            self._cond.notify_all()

    def _used(self, slot: _Slot) -> None:
        """Count a use of the pinned slot's expert for the policy."""
        self._tick += 1
        slot.last_use = self._tick
        if self._on_use is not None:
            self._on_use(slot.key)
        if slot.protected:
            self._unprotect(slot)

    def _free_slot(self, slot: _Slot) -> None:
        """Drop the slot's expert; the slot joins the free list."""
        key = slot.key
        if key is not None:
            if self._table.get(key) is slot:
                del self._table[key]
            state = slot.state
            if state == _READY:
                self._ready[key[0]].discard(key[1])
                self.pool.clear(*key)
            elif state != _FREE:
                self._inflight -= 1
        if slot.pq_group is not None:
            self.strategy.discard(slot)
        if slot.prefetched:
            self._queued_idle.pop(slot, None)
        if slot.protected:
            self._unprotect(slot)
        slot.key = None
        slot.state = _FREE
        slot.loader = None
        slot.prefetched = slot.demand = False
        slot.load_id = next(self._load_ids)
        self._free.append(slot)
        if self._waiting:
            self._cond.notify_all()

    def _unprotect(self, slot: _Slot) -> None:
        if slot.protected:
            if slot.key is not None:
                self._protected.get(slot.key[0], {}).pop(slot, None)
            slot.protected = False

    def _advance_clock(self, layer: int) -> None:
        if layer == self._last_layer:
            return
        if self._last_layer is not None:
            # the layer ran: its unused prefetches were wrong (the router disagreed): the loaded
            # ones compete normally now, the ones still queued are cancelled (no transfer for them)
            for slot in self._protected.pop(self._last_layer, ()):
                slot.protected = False
                if slot.state == _QUEUED and slot.pins == 0 and slot.prefetched and not slot.demand:
                    self._count_eviction(slot.key[0], evicted=0, cancelled=1)
                    self._free_slot(slot)
                else:
                    self._settle(slot)
        self._last_layer = layer
        self._clock += 1
        self.strategy.on_enter_layer(layer, self._clock, self._table.get)

    def _submit(self, items) -> None:
        if not items:
            return
        if self._deferred_mode:
            self._deferred_items.append(items)
        elif self._queue is not None:
            self._queue.put(items)

    def _count_eviction(self, layer: int, *, wasted: int = 0, evicted: int = 1, cancelled: int = 0) -> None:
        """``evicted``: a resident expert dropped (``wasted``: a prefetch load never used);
        ``cancelled``: a queued prefetch dropped before it was read."""
        acc = self._evicted.get(layer)
        if acc is None:
            acc = self._evicted[layer] = [0, 0, 0]
        acc[0] += evicted
        acc[1] += wasted
        acc[2] += cancelled

    def _flush_evictions(self, evicted: dict) -> None:
        per_layer = {}
        for layer, (n, wasted, cancelled) in evicted.items():
            counts = {}
            if n:
                counts["evictions"] = n
            if wasted:
                counts["wasted_loads"] = wasted
            if cancelled:
                counts["prefetch_cancelled"] = cancelled
            if wasted or cancelled:
                counts["prefetch_wasted"] = wasted + cancelled
            if counts:
                per_layer[layer] = counts
        if per_layer:
            self.stats.add_each(per_layer)

    # ------------------------------------------------------------ internals: victims (lock held)

    def _unused_slot(self) -> _Slot | None:
        """A free slot, or a new one while the budget has room; None when every slot holds an expert."""
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.num_slots:
            slot = _Slot(len(self._slots))
            self._slots.append(slot)
            self.stats.set_cache_bytes(len(self._slots) * self.slot_bytes)
            return slot
        return None

    def _find_victim(self, skip, *, demand: bool) -> _Slot | None:
        """A FREE slot to load into: a free one, a new one within budget, or one evicted per
        policy. ``demand``: may also evict a protected prefetch or cancel a queued one.
        None: nothing can be freed now (wait, or give up for a prefetch)."""
        slot = self._unused_slot()
        if slot is not None:
            return slot
        victim = self.strategy.victim(skip or ())
        if victim is None and demand:
            victim = self._protected_victim(skip)
        if victim is not None:
            self._count_eviction(victim.key[0], wasted=int(victim.prefetched))
        elif demand and self._queued_idle:   # cancel the most recently queued prefetch (the furthest-ahead one)
            victim = next(reversed(self._queued_idle))
            self._count_eviction(victim.key[0], evicted=0, cancelled=1)
        else:
            return None
        self._free_slot(victim)
        self._free.pop()
        return victim

    def _protected_victim(self, skip) -> _Slot | None:
        best = None
        for slots in self._protected.values():
            for slot in slots:
                if slot.state != _READY or slot.pins or (skip and slot.key in skip):
                    continue
                k = self.strategy.key(slot)
                if best is None or k < best[0]:
                    best = (k, slot)
        return None if best is None else best[1]

    def _must_wait(self, tid: int) -> bool:
        """No victim now: True when waiting can help (a load in flight, or pins held by
        other threads), False when the calling thread's own pins fill the cache."""
        if self._loading:
            return True
        return self._pins - self._pins_by_thread.get(tid, 0) > 0

    def _pinned_error(self, *, waited: bool) -> RuntimeError:
        if waited:
            return RuntimeError(
                f"expertflow_compile: waited {self.pin_timeout:g} s for a free expert cache slot: all "
                f"{self.num_slots} slots stayed pinned by other threads' layer calls (the budget holds "
                f"{self.num_slots} experts at once; call the model from fewer threads at a time or raise "
                "expert_budget)")
        return RuntimeError(
            f"expertflow_compile: all {self.num_slots} expert cache slots are pinned (acquired and not released) "
            f"by this thread, so no expert can be loaded; hold at most {self.num_slots} experts at once or raise "
            "expert_budget")

    # ------------------------------------------------------------ internals: leases

    def _reserve(self, lease: LayerLease, req, resident_first: bool, lazy: bool, all_at_once: bool):
        """Pin what is there, give slots to what is missing (lock held). Returns the slots the
        caller loads now (``[(expert, slot)]``), or None when ``all_at_once`` could not take
        everything (then nothing is held)."""
        layer, tid = lease.layer, lease.tid
        held, ready, pending, missing = lease._held, [], [], []
        table = self._table
        strategy = self.strategy
        for e in req:
            slot = table.get((layer, e))
            if slot is None:
                missing.append(e)
                continue
            slot.pins += 1
            held[e] = slot
            if slot.pq_group is not None:
                strategy.discard(slot)
            if slot.state == _READY:
                ready.append(e)
            else:
                if slot.pins == 1 and slot.state == _QUEUED:
                    self._queued_idle.pop(slot, None)
                pending.append(e)
        n_pins = len(held)
        self._pins += n_pins
        pins = self._pins_by_thread
        pins[tid] = pins.get(tid, 0) + n_pins
        batch, items, assigned = [], [], []
        deferred = []
        if missing and lazy and not all_at_once:
            deferred = missing
        elif missing:
            queue = self._queue_misses and self.prefetching
            ids = self._load_ids
            victim_of = strategy.victim
            for i, e in enumerate(missing):
                if self._free or len(self._slots) < self.num_slots:
                    slot = self._unused_slot()
                else:   # _free_or_victim's usual case, inline: the policy's candidate
                    slot = victim_of(())
                    if slot is None:
                        slot = self._find_victim(None, demand=True)
                    else:
                        self._evict_candidate(slot)
                if slot is None:
                    if not all_at_once:
                        deferred = missing[i:]
                        break
                    self._rollback(lease, assigned)
                    if not self._must_wait(tid):
                        raise self._pinned_error(waited=False)
                    return None
                key = (layer, e)
                slot.key = key
                slot.state = _QUEUED          # LOADING once the reservation stands (below)
                slot.load_id = next(ids)
                slot.pins = 1
                table[key] = slot
                held[e] = slot
                assigned.append(slot)
                self._inflight += 1
                self._pins += 1
                pins[tid] += 1
                if queue:
                    slot.prefetched = slot.demand = True
                    items.append((slot, key, slot.load_id))
                    pending.append(e)
                else:
                    batch.append((e, slot))
        if not resident_first and (pending or deferred or batch):
            # the given order: from the first expert not ready on, each is taken when reached
            rank = {e: i for i, e in enumerate(req)}
            first = min(rank[e] for e in pending + deferred + [b[0] for b in batch])
            deferred = req[first:]
            for e in deferred:                # unpinned: a reserved slot nobody loaded is freed
                slot = held.pop(e, None)
                if slot is not None:
                    self._unpin_slot(slot, tid)
            ready = [e for e in ready if rank[e] < first]
            pending, batch, items = [], [], []
        if batch:                             # the caller reads these now (_load_batch)
            me = threading.current_thread()
            for _e, slot in batch:
                slot.state = _LOADING
                slot.loader = me
            self._loading += len(batch)
        counts = lease._counts
        lease._ready = [(e, held[e]) for e in ready]
        for e, slot in lease._ready:          # loaded: the use happens now
            counts.hits += 1
            if slot.prefetched:                # brought in by a speculative load not used yet
                counts.arrived += 1
                counts.prefetch_used += 1
                slot.prefetched = False
            else:
                counts.resident += 1
            self._used(slot)
        lease._pending = pending
        lease._deferred = deferred
        self._submit(items)
        return batch

    def _free_or_victim(self, skip=None, demand: bool = True, harm_limit: float | None = None) -> _Slot | None:
        """A FREE slot for a missing expert: free, new, or evicted per policy (never an expert
        in ``skip``); ``demand``: a protected prefetch, else a queued one, as a last resort.
        ``harm_limit``: evict only a victim whose predicted next use is further away."""
        slot = self._unused_slot()
        if slot is not None:
            return slot
        victim = self.strategy.victim(skip or ())
        if victim is not None and harm_limit is not None and self.strategy.next_use(victim) <= harm_limit:
            self.strategy.add(victim)             # needed no later than the prefetched one: keep it
            return None
        if victim is None:
            return self._find_victim(skip, demand=True) if demand else None
        self._evict_candidate(victim)
        return victim

    def _evict_candidate(self, victim: _Slot) -> None:
        """Drop the expert of ``victim``, a candidate the policy has just handed out (READY,
        unpinned, not protected); the slot is FREE and off every list."""
        key = victim.key
        layer = key[0]
        del self._table[key]
        self._ready[layer].discard(key[1])
        self.pool.clear(layer, key[1])
        self._count_eviction(layer, wasted=int(victim.prefetched))
        victim.key = None
        victim.state = _FREE
        victim.prefetched = victim.demand = False

    def _rollback(self, lease: LayerLease, assigned) -> None:
        for slot in assigned:           # never submitted: freed when unpinned
            slot.prefetched = False
        for slot in lease._held.values():
            self._unpin_slot(slot, lease.tid)
        lease._held.clear()

    def _start_load(self, slot: _Slot) -> None:
        """The calling thread loads the QUEUED slot itself (lock held)."""
        if slot.prefetched:
            self._queued_idle.pop(slot, None)
        slot.state = _LOADING
        slot.load_id = next(self._load_ids)
        slot.loader = threading.current_thread()
        self._loading += 1

    def _load_batch(self, lease: LayerLease, batch) -> None:
        """Read the slots ``_reserve`` gave to missing experts, all of them, in this thread
        (no lock held); count the misses. On an error, nothing of the lease stays held."""
        layer = lease.layer
        t0 = time.perf_counter()
        done = 0
        try:
            if self._read_many is not None and len(batch) > 1:   # one call for the whole layer call
                self._read_many(layer, [e for e, _ in batch], self.pool.stacked(layer), [s.index for _, s in batch],
                                self.pool.stacked_rows(layer))
                done = len(batch)
            else:
                for e, slot in batch:
                    self._load(slot, layer, e, background=False)
                    done += 1
        except BaseException as exc:
            with self._lock:
                for i, (e, slot) in enumerate(batch):
                    self._loading -= 1
                    if i < done:
                        self._set_ready(slot)
                        self._used(slot)
                    else:
                        lease._held.pop(e, None)
                        self._drop_pin(slot, lease.tid)
                        self._free_slot(slot)
            self._count_misses(lease, done, t0)
            lease.release()
            if isinstance(exc, OSError):
                e = batch[done][0]
                raise RuntimeError(f"expertflow_compile: loading expert {e} of layer {layer} into the expert "
                                   f"cache failed: {exc}") from exc
            raise
        with self._lock:
            ready = self._ready[layer]
            row = self.pool.row[layer]
            np_table = self.pool._np
            on_use = self._on_use
            tick = self._tick
            for e, slot in batch:
                slot.state = _READY
                slot.loader = None
                ready.add(e)
                np_table[row, e] = slot.index
                tick += 1
                slot.last_use = tick
                if on_use is not None:
                    on_use(slot.key)
            self._tick = tick
            n = len(batch)
            self._loading -= n
            self._inflight -= n
            if self._waiting:
                self._cond.notify_all()
        self._count_misses(lease, done, t0)
        lease._ready.extend(batch)

    def _count_misses(self, lease: LayerLease, n: int, t0: float) -> None:
        c = lease._counts
        c.misses += n
        c.demand_loads += n
        c.bytes_moved += n * self._expert_bytes[lease.layer]
        c.stall += time.perf_counter() - t0

    def _next_pending(self, lease: LayerLease):
        """Hand out the next in-flight held expert: one the worker finished, else a queued one
        this thread loads itself (from the back: the worker takes the front), else the first
        one loading, waited for. Returns ``(expert, slot)``, counted."""
        pending, held, counts = lease._pending, lease._held, lease._counts
        t_wait = None
        with self._lock:
            while True:
                pick = None
                for i, e in enumerate(pending):
                    if held[e].state == _READY:
                        pick = i
                        break
                if pick is None:
                    for i in range(len(pending) - 1, -1, -1):
                        if held[pending[i]].state == _QUEUED:
                            pick = i
                            break
                if pick is not None:
                    e = pending.pop(pick)
                    slot = held[e]
                    if slot.state == _READY:
                        self._hit(slot, counts, t_wait)
                        return self._handed(e, slot, t_wait, counts)
                    self._start_load(slot)
                    break
                slot = held[pending[0]]       # all loading elsewhere: wait for one
                if not self._loader_alive(slot):
                    continue
                if t_wait is None:
                    t_wait = time.perf_counter()
                self._wait(0.05)
        if t_wait is not None:
            counts.stall += time.perf_counter() - t_wait
        self._load_held(lease, e, slot)
        return e, slot

    def _take_deferred(self, lease: LayerLease, e: int) -> _Slot:
        """Hold and ready expert ``e`` (not held at reservation): pin it if it is assigned,
        else take a slot for it (waiting when none can be freed now); load it here unless
        its load is under way elsewhere (then wait for it). Counted."""
        key = (lease.layer, e)
        counts, tid = lease._counts, lease.tid
        t_wait = deadline = None
        pinned = False
        with self._lock:
            while True:
                slot = self._table.get(key)
                if slot is None:
                    slot = self._find_victim(None, demand=True)
                    if slot is not None:
                        self._assign(slot, key, _QUEUED)
                if slot is not None:
                    if not pinned:
                        self._pin_slot(slot, tid)
                        lease._held[e] = slot
                        pinned = True
                    state = slot.state
                    if state == _READY:
                        self._hit(slot, counts, t_wait)
                        self._handed(e, slot, t_wait, counts)
                        return slot
                    if state == _QUEUED:
                        self._start_load(slot)
                        break
                    if not self._loader_alive(slot):
                        continue
                elif not self._must_wait(tid):
                    raise self._pinned_error(waited=False)
                now = time.perf_counter()
                if t_wait is None:
                    t_wait = now
                if slot is None and not self._loading:   # only other threads' pins: wait for them, bounded
                    deadline = deadline or now + self.pin_timeout
                    if now >= deadline:
                        raise self._pinned_error(waited=True)
                self._wait(0.05)
        if t_wait is not None:
            counts.stall += time.perf_counter() - t_wait
        self._load_held(lease, e, slot)
        return slot

    def _loader_alive(self, slot: _Slot) -> bool:
        """False (and the slot back to QUEUED) when its loader thread died mid-load."""
        loader = slot.loader
        if loader is not None and not loader.is_alive():
            slot.state = _QUEUED
            slot.loader = None
            slot.prefetched = False
            self._loading -= 1
            return False
        return True

    def _hit(self, slot: _Slot, counts: _Counts, t_wait) -> None:
        """A held expert found READY when reached (lock held): its own demand load the worker
        did (a miss), else a speculative load or another thread's load (ready when it had
        landed before the call reached it, else an in-flight wait)."""
        if slot.demand:
            slot.demand = slot.prefetched = False
            counts.misses += 1
            self._used(slot)
            return
        counts.hits += 1
        if slot.prefetched:
            counts.prefetch_used += 1
            slot.prefetched = False
        if t_wait is not None:
            counts.inflight_waits += 1
        else:
            counts.arrived += 1
        self._used(slot)

    def _handed(self, e: int, slot: _Slot, t_wait, counts: _Counts):
        if t_wait is not None:
            counts.stall += time.perf_counter() - t_wait
        if slot.ready_event is not None:
            self._wait_ready(slot)
        return e, slot

    def _load_held(self, lease: LayerLease, e: int, slot: _Slot) -> None:
        """Load the held slot this thread is loading (no lock held); count the miss. A
        taken-over prefetch whose read fails with an I/O error is read once more."""
        layer = lease.layer
        counts = lease._counts
        late = slot.prefetched and not slot.demand   # a prefetch this thread took over: right but late
        slot.demand = False
        t0 = time.perf_counter()
        while True:
            try:
                self._load(slot, layer, e, background=False)
                break
            except OSError as exc:
                if late:
                    late = False
                    self.stats.add(layer, prefetch_failed=1, prefetch_wasted=1)
                    slot.prefetched = False
                    self._log_failure((layer, e), exc)
                    continue
                self._abandon(lease, e, slot)
                raise RuntimeError(
                    f"expertflow_compile: loading expert {e} of layer {layer} into the expert cache failed: {exc}"
                ) from exc
            except BaseException:
                self._abandon(lease, e, slot)
                raise
        with self._lock:
            self._loading -= 1
            slot.prefetched = False
            self._set_ready(slot)
            self._used(slot)
        counts.misses += 1
        counts.demand_loads += 1
        counts.prefetch_late += int(late)
        counts.bytes_moved += self._expert_bytes[layer]
        counts.stall += time.perf_counter() - t0

    def _wait_ready(self, slot: _Slot) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_event)

    def _abandon(self, lease: LayerLease, e: int, slot: _Slot) -> None:
        """A caller's load of ``slot`` raised: free it and drop the lease's pin."""
        with self._lock:
            self._loading -= 1
            lease._held.pop(e, None)
            self._drop_pin(slot, lease.tid)
            self._free_slot(slot)

    def _unpin(self, lease: LayerLease, e: int) -> None:
        with self._lock:
            self._unpin_slot(lease._held.pop(e), lease.tid, self._record_release())

    def _release_lease(self, lease: LayerLease) -> None:
        with self._lock:
            held = lease._held
            if held:
                ev = self._record_release()
                strategy = self.strategy
                for slot in held.values():
                    slot.pins -= 1
                    if ev is not None:
                        slot.release_event = ev
                    if slot.pins == 0:
                        state = slot.state
                        if state == _READY:
                            if not slot.protected:
                                strategy.add(slot)
                        elif state == _QUEUED:
                            if slot.prefetched:
                                self._queued_idle[slot] = None
                            else:                   # reserved by a call that never loaded it
                                self._free_slot(slot)
                n = len(held)
                self._pins -= n
                pins = self._pins_by_thread
                left = pins.get(lease.tid, 0) - n
                if left > 0:
                    pins[lease.tid] = left
                else:
                    pins.pop(lease.tid, None)
                held.clear()
                if self._waiting:
                    self._cond.notify_all()
            lease._ready = []
            lease._pending = []
            lease._deferred = []
            evicted, self._evicted = self._evicted, {}
        lease._counts.flush(self.stats, lease.layer)
        if evicted:
            self._flush_evictions(evicted)

    # ------------------------------------------------------------ internals: loads (no lock held)

    def _load(self, slot: _Slot, layer: int, expert: int, *, background: bool) -> None:
        """Read the expert into the slot (the slot is in flight)."""
        if not self._staged:
            self.store.read_into(layer, expert, self.pool.views(slot.index, layer))
            return
        n = self._slot_need[layer]
        if background:
            if not self._staging:
                self._staging = [_Staging(self.slot_bytes, self._cuda, self.specs) for _ in range(2)]
            st = self._staging[self._staging_turn]
            self._staging_turn ^= 1
            self._copy_via(st, slot, layer, expert, n, self._side_stream)
        else:
            with self._demand_lock:
                if self._demand_staging is None:
                    self._demand_staging = _Staging(self.slot_bytes, self._cuda, self.specs)
                stream = torch.cuda.current_stream(self.device) if self._cuda else None
                self._copy_via(self._demand_staging, slot, layer, expert, n, stream)

    def _copy_via(self, st: _Staging, slot: _Slot, layer: int, expert: int, n: int, stream) -> None:
        if st.event is not None:
            st.event.synchronize()          # the staging buffer's previous copy must be done
        self.store.read_into(layer, expert, st.pool.views(0, layer))
        dst = self.pool.slot_buffer(slot.index)
        if not self._cuda:                  # other devices: a plain blocking copy
            dst[:n].copy_(st.buf[:n])
            return
        with torch.cuda.stream(stream):
            for ev in (slot.release_event, slot.ready_event):
                if ev is not None:
                    stream.wait_event(ev)   # the slot's last users and last fill come first
            dst[:n].copy_(st.buf[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        st.event = ev
        slot.ready_event = ev

    def _worker_batch(self, batch) -> None:
        """Load one prefetch call's items (the worker, or ``run_prefetches``): all taken at
        once, and read in one call when the store can (``read_many``); a failure there
        retries the items one by one so that only the failing ones fail. A queued miss
        (``slot.demand``) counts as a demand load, a prefetch as a speculative one."""
        if self._read_many is None or len(batch) < 2:
            done: dict[int, list[int]] = {}          # layer -> [demand, all]: counted once per batch
            for item in batch:
                demand = self._worker_load(item)
                if demand is not None:
                    acc = done.setdefault(item[1][0], [0, 0])
                    acc[0] += demand
                    acc[1] += 1
            for layer, (demand, n) in done.items():
                self._count_worker_loads(layer, demand, n)
            return
        me = threading.current_thread()
        with self._lock:
            if self._stop.is_set() and not self._deferred_mode:
                for slot, key, load_id in batch:
                    self._worker_take(slot, key, load_id, me)
                return
            taken = [(slot, key, slot.demand) for slot, key, load_id in batch
                     if self._worker_take(slot, key, load_id, me)]
        if not taken:
            return
        layer = taken[0][0].key[0]
        try:
            if any(key[0] != layer for _, key, _d in taken):
                raise ValueError("one layer per batch")
            self._read_many(layer, [key[1] for _, key, _d in taken], self.pool.stacked(layer),
                            [slot.index for slot, _, _d in taken], self.pool.stacked_rows(layer))
        except BaseException:
            for slot, key, demand in taken:         # one by one: only the failing ones fail
                self._worker_read(slot, key, demand)
            return
        with self._lock:
            for slot, _key, _d in taken:
                self._loading -= 1
                self._set_ready(slot)
        self._count_worker_loads(layer, sum(d for _, _, d in taken), len(taken))

    def _count_worker_loads(self, layer: int, demand: int, n: int) -> None:
        counts = {"bytes_moved": n * self._expert_bytes[layer]}
        if demand:
            counts["demand_loads"] = demand
        if n - demand:
            counts["prefetch_loads"] = n - demand
        self.stats.add(layer, **counts)

    def _worker_take(self, slot: _Slot, key, load_id: int, me) -> bool:
        """Start the worker's load of a queued item (lock held); False: nothing to load."""
        if slot.load_id != load_id or slot.state != _QUEUED:
            return False                    # taken over by a caller, or cancelled
        if self._stop.is_set() and not self._deferred_mode:
            if slot.pins == 0:
                self._count_eviction(key[0], evicted=0, cancelled=1)
                self._free_slot(slot)
            return False                    # a pinned one is loaded by the call holding it
        self._queued_idle.pop(slot, None)
        slot.state = _LOADING
        slot.loader = me
        self._loading += 1
        return True

    def _worker_load(self, item) -> int | None:
        """Take and read one queued item; None: nothing loaded, else 1 for a demand load
        (a queued miss), 0 for a prefetch (the caller counts it)."""
        slot, key, load_id = item
        with self._lock:
            if not self._worker_take(slot, key, load_id, threading.current_thread()):
                return None
            demand = slot.demand
        return int(demand) if self._worker_read(slot, key, demand, count=False) else None

    def _worker_read(self, slot: _Slot, key, demand: bool, count: bool = True) -> bool:
        """Read a slot the worker took; True when it loaded (counted unless ``count=False``)."""
        try:
            self._load(slot, key[0], key[1], background=True)
        except BaseException as exc:
            self._worker_failed(slot, key, exc)
            return False
        with self._lock:
            self._loading -= 1
            self._set_ready(slot)
        if count:
            self._count_worker_loads(key[0], int(demand), 1)
        return True

    def _worker_failed(self, slot: _Slot, key, exc: BaseException) -> None:
        with self._lock:
            demand = slot.demand
            self._loading -= 1
            if slot.pins:                   # a layer call holds it: it loads it itself
                slot.state = _QUEUED
                slot.loader = None
                slot.prefetched = False
                slot.load_id = next(self._load_ids)
                if self._waiting:
                    self._cond.notify_all()
            else:
                self._free_slot(slot)
        if not demand:
            self.stats.add(key[0], prefetch_failed=1, prefetch_wasted=1)
        self._log_failure(key, exc)

    def _log_failure(self, key, exc: BaseException) -> None:
        with self._lock:
            first = not self._error_logged
            self._error_logged = True
        msg = ("expertflow_compile: prefetching expert %d of layer %d failed (%s: %s); it will be loaded on "
               "demand when needed")
        if first:
            logger.error(msg + " (further load errors of this cache are logged at DEBUG level)",
                         key[1], key[0], type(exc).__name__, exc, exc_info=exc)
        else:
            logger.debug(msg, key[1], key[0], type(exc).__name__, exc)
