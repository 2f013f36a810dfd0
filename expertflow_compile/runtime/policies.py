"""Replacement policies of the expert cache: which unpinned, loaded expert to evict.

``POLICIES`` is the one list of valid policy names (the backend's config and the cache
both read it). :func:`make_policy` builds the strategy object a name stands for.

A policy keeps the cache's *candidates* - slots that are loaded (READY), not pinned and
not protected (see :mod:`~expertflow_compile.runtime.cache`) - in a structure ordered by
its eviction key, so that picking a victim never scans the slots:

* ``"lru"``: least recently used first. Key ``(last_use,)``: an ordered dict of the
  candidates added in ``last_use`` order (the usual case: a slot becomes a candidate when its
  use ends, so O(1) whatever the slot count), and a heap for the few added out of order (a
  prefetched expert whose protection lapsed).
* ``"lfu"``: least frequently used first (every use over the cache's life counts; counts
  survive eviction), ties least recently used. Key ``(uses, last_use)``: one heap.
* ``"predictive"``: the expert whose next use is furthest away first (Belady's rule on
  predictions). A hinted expert's next use is its hint's due time; an unhinted expert's is
  estimated from when its layer runs next plus whole passes while it is not chosen (its
  share of its layer's runs in which it was used as the chance of being chosen in a run);
  never used (or ``estimate_unhinted=False``): never again, evicted first, least recently
  used first. With no hints at all on a cyclic layer order this is close to LRU per layer.
  Key ``(-distance, hinted, last_use)``: a heap of hinted experts, a heap of never-again
  experts, one heap per layer of estimated experts (within a layer their order does not
  change as execution moves on) and a heap over the layers' heads. A *complete* prediction
  of a layer's next run (every candidate hinted) moves that layer's unhinted experts a
  whole pass later. The policy also measures, per layer and list position, how often the
  router chose a predictor's candidate (:meth:`PredictivePolicy.precision`): the cache's
  gate for what is worth a load (``ExpertCache.prefetch(min_precision=)``).

A slot whose ``last_use`` is 0 is *demoted* (a prefetch the router disagreed with,
``ExpertCache.enter_layer(routed=)``): every policy evicts it first (LRU / LFU: the oldest;
predictive: the never-again heap).

Every heap uses lazy invalidation: each slot carries the sequence number of its one live
entry (``pq_seq``); an entry whose number is not the slot's live one is stale and dropped
when it reaches the top; a heap is rebuilt when stale entries outnumber live ones. Adding,
removing or re-keying a candidate and picking a victim are O(log n) amortised, independent
of the slot count.

Invariants: a slot is a candidate iff ``slot.pq_group is not None``; a candidate has
exactly one live entry; ``victim()`` returns a candidate with the smallest :meth:`key`
(ties may go either way) and removes it from the candidates.

The policy also keeps the bookkeeping its key needs: use counts (``lfu``), predictions and
the layer clock (``predictive``). The cache calls, under its lock: :meth:`Policy.add` /
:meth:`Policy.discard` when a slot becomes / stops being a candidate, :meth:`Policy.refresh`
when a candidate's ``last_use`` changed, :meth:`Policy.on_use` for every use,
:meth:`Policy.on_enter_layer` when execution moves to another MoE layer, and
:meth:`Policy.hint` for predictions. Policies are not thread-safe on their own.
"""

from __future__ import annotations

import heapq
import itertools
import math
from itertools import accumulate
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

__all__ = ["POLICIES", "Policy", "LRUPolicy", "LFUPolicy", "PredictivePolicy", "make_policy"]

POLICIES = ("lru", "lfu", "predictive")

_SEQ = itertools.count(1)
_REUSE_CAP = 64            # reuse distances (in runs of a layer) kept apart; longer ones share a bucket
_NO_HINTS: dict = {}       # (read only) the hints of a layer that has none


class _Heap:
    """A min-heap of ``(*key, seq, slot)`` entries with lazy invalidation."""

    __slots__ = ("h", "live")

    def __init__(self):
        self.h: list = []
        self.live = 0

    def push(self, key: tuple, slot) -> None:
        seq = next(_SEQ)
        slot.pq_seq = seq
        heapq.heappush(self.h, (*key, seq, slot))
        self.live += 1
        if len(self.h) > 2 * self.live + 64:
            self.h = [e for e in self.h if e[-1].pq_seq == e[-2]]
            heapq.heapify(self.h)

    def drop(self, slot) -> None:
        """Invalidate the slot's live entry (it must have one in this heap)."""
        slot.pq_seq = 0
        self.live -= 1

    def top(self):
        """The live entry with the smallest key, or None."""
        h = self.h
        while h:
            e = h[0]
            if e[-1].pq_seq == e[-2]:
                return e
            heapq.heappop(h)
        return None


class Policy:
    """Base of the replacement strategies (see the module docstring)."""

    name = ""

    def bind(self, layers: Sequence[int]) -> None:
        """The cache's MoE layers, in execution order."""

    # -- candidates
    def add(self, slot) -> None:
        raise NotImplementedError

    def discard(self, slot) -> None:
        raise NotImplementedError

    def refresh(self, slot) -> None:
        """A candidate's key inputs changed (e.g. it was referenced)."""
        if slot.pq_group is not None:
            self.discard(slot)
            self.add(slot)

    def _best(self):
        raise NotImplementedError

    def victim(self, skip=()):
        """Remove and return the candidate to evict (its key not in ``skip``), or None."""
        if not skip:
            slot = self._best()
            if slot is not None:
                self.discard(slot)
            return slot
        stash = []
        found = None
        while True:
            slot = self._best()
            if slot is None:
                break
            self.discard(slot)
            if slot.key in skip:
                stash.append(slot)
                continue
            found = slot
            break
        for slot in stash:
            self.add(slot)
        return found

    def key(self, slot) -> tuple:
        """The eviction key (smallest goes first) of any assigned slot, candidate or not."""
        raise NotImplementedError

    def next_use(self, slot) -> float:
        """Predicted layer moves until the slot's expert is used next (inf: unknown or never).
        A prefetch for a use ``d`` moves away may evict only an expert whose ``next_use`` is
        larger (do no harm); a policy that predicts nothing answers inf."""
        return math.inf

    @property
    def candidates(self) -> int:
        raise NotImplementedError

    # -- events
    def on_use(self, key: tuple[int, int]) -> None:
        """``key`` is used (acquired) now; its slot is pinned, so not a candidate."""

    def on_enter_layer(self, layer: int, clock: int, lookup: Callable) -> None:
        """Execution moved to ``layer``; ``clock`` counts such moves."""

    def hint(self, layer: int, experts: Iterable[int], distance: int, lookup: Callable) -> None:
        """A prediction: ``experts`` of ``layer`` are used ``distance`` layer moves from now."""

    def hinted(self, key: tuple[int, int]) -> bool:
        return False


class _InOrder:
    """The LRU candidates added in increasing ``last_use`` order (a marker for ``pq_group``)."""

    __slots__ = ("slots", "high")

    def __init__(self):
        self.slots: OrderedDict = OrderedDict()
        self.high = -math.inf       # the largest last_use added so far


class LRUPolicy(Policy):
    name = "lru"

    def __init__(self):
        self._order = _InOrder()
        self._late = _Heap()        # candidates added with an older last_use than one already added

    def add(self, slot) -> None:
        order = self._order
        if slot.last_use > order.high:
            order.high = slot.last_use
            order.slots[slot] = None
            slot.pq_group = order
        else:
            slot.pq_group = self._late
            self._late.push((slot.last_use,), slot)

    def discard(self, slot) -> None:
        group = slot.pq_group
        if group is None:
            return
        if group is self._order:
            del group.slots[slot]
        else:
            group.drop(slot)
        slot.pq_group = None

    def _best(self):
        slots = self._order.slots
        first = next(iter(slots)) if slots else None
        e = self._late.top()
        if e is None:
            return first
        if first is None or e[-1].last_use < first.last_use:
            return e[-1]
        return first

    def key(self, slot) -> tuple:
        return (slot.last_use,)

    @property
    def candidates(self) -> int:
        return len(self._order.slots) + self._late.live


class LFUPolicy(Policy):
    name = "lfu"

    def __init__(self):
        self._heap = _Heap()
        self.uses: dict[tuple[int, int], int] = {}

    def discard(self, slot) -> None:
        if slot.pq_group is not None:
            slot.pq_group.drop(slot)
            slot.pq_group = None

    def _best(self):
        e = self._heap.top()
        return None if e is None else e[-1]

    @property
    def candidates(self) -> int:
        return self._heap.live

    def add(self, slot) -> None:
        slot.pq_group = self._heap
        self._heap.push((self.uses.get(slot.key, 0), slot.last_use), slot)

    def key(self, slot) -> tuple:
        return (self.uses.get(slot.key, 0), slot.last_use)

    def on_use(self, key) -> None:
        self.uses[key] = self.uses.get(key, 0) + 1


class PredictivePolicy(Policy):
    """Belady's rule on predictions (see the module docstring).

    ``estimate_unhinted``: give unhinted experts an estimated next use (False: an
    unhinted expert is never used again, so it goes first - what a replay that hints
    every future use wants).
    """

    name = "predictive"

    def __init__(self, estimate_unhinted: bool = True, estimator: str = "reuse"):
        if estimator not in ("reuse", "frequency"):
            raise ValueError(f"estimator must be 'reuse' or 'frequency', got {estimator!r}")
        self.estimate_unhinted = bool(estimate_unhinted)
        self.estimator = estimator
        self._last_run: dict[tuple[int, int], int] = {}     # run of its layer in which the expert was last used
        # layer -> [histogram of its reuse distances (in runs), their weights, suffix sums of
        # both (mass and weight of the distances >= s, per s; integers) or None until asked]:
        # a reuse is counted in O(1), the suffix sums rebuilt at the next question
        self._reuse: dict[int, list] = {}
        self.clock = 0
        self._pos: dict[int, int] = {}
        self._n = 1
        self._here: int | None = None           # position of the layer running now
        self._layer: int | None = None
        self.hints: dict[int, dict[int, int]] = {}   # layer -> expert -> due (clock of the predicted use)
        self._runs: dict[int, int] = {}
        self._used: dict[tuple[int, int], int] = {}  # runs of its layer in which the expert was used
        self._counted: dict[tuple[int, int], int] = {}
        self._next_run: dict[int, int] = {}
        self._hinted = _Heap()      # (-due, last_use)
        self._never = _Heap()       # (last_use,): never used, or no estimate wanted
        self._per_layer: dict[int, _Heap] = {}   # (used runs, last_use)
        self._heads: list = []      # (-estimated next use of the layer's head, last_use, seq, layer)
        self._head_seq: dict[int, int] = {}
        self._complete: dict[int, int] = {}       # layer -> due of a run predicted completely (see hint)
        self._listed: dict[int, list[int]] = {}     # layer -> its outstanding candidate list (best first)
        self._position: dict[int, list[list[int]]] = {}   # layer -> per list position [hits, seen]

    def bind(self, layers) -> None:
        order = list(layers)
        self._pos = {l: i for i, l in enumerate(order)}
        self._n = max(1, len(order))
        self._per_layer = {l: _Heap() for l in order}
        self._head_seq = dict.fromkeys(order, 0)
        self._recompute_next_runs()

    # -- the estimate
    def _steps(self, layer: int) -> int:
        here = 0 if self._here is None else self._here
        return (self._pos[layer] - here) % self._n or self._n

    def _recompute_next_runs(self) -> None:
        for layer in self._pos:
            self._next_run[layer] = self.clock + self._steps(layer)
            self._refresh_head(layer)

    def _run_of(self, layer: int) -> int:
        """When an unhinted expert of ``layer`` can be used next: the layer's next run, or the
        one after it when that run is predicted completely (its candidates are all hinted)."""
        run = self._next_run[layer]
        return run + self._n if self._complete.get(layer) == run else run

    def _runs_after_next(self, key) -> float:
        """Estimated whole passes of its layer, after the layer's next run, until the unhinted
        expert is used. ``"reuse"``: from its layer's reuse-distance histogram, given the
        runs since its last use (``E[R | R > a] - a - 1``); ``"frequency"`` (or no reuse
        seen yet): ``1 / chance - 1`` with ``chance`` its share of its layer's runs."""
        layer = key[0]
        if self.estimator == "reuse":
            hist = self._reuse.get(layer)
            last = self._last_run.get(key)
            if hist is not None and last is not None:
                sums = hist[2]
                if sums is None:
                    sums = hist[2] = (list(accumulate(reversed(hist[0])))[::-1],
                                      list(accumulate(reversed(hist[1])))[::-1])
                a = min(self._runs.get(layer, 0) - last, _REUSE_CAP)
                return self._tail(sums, a) - a - 1.0
        chance = self._used.get(key, 0) / max(1, self._runs.get(layer, 0))
        return math.inf if chance <= 0 else 1.0 / chance - 1.0

    @staticmethod
    def _tail(sums, a: int) -> float:
        """``E[R | R > a]`` from a layer's suffix sums (distances past the cap count as 2 x cap)."""
        mass, weighted = sums[0][a + 1], sums[1][a + 1]
        return weighted / mass if mass else 4.0 * _REUSE_CAP

    def _add_reuse(self, layer: int, distance: int) -> None:
        hist = self._reuse.get(layer)
        if hist is None:
            hist = self._reuse[layer] = [[0] * (_REUSE_CAP + 3), [0] * (_REUSE_CAP + 3), None]
        r = min(distance, _REUSE_CAP + 1)
        hist[0][r] += 1
        hist[1][r] += r if r <= _REUSE_CAP else 2 * _REUSE_CAP
        hist[2] = None

    def _distance(self, key) -> float:
        """Estimated layer moves until an unhinted expert is used (inf: never)."""
        if not self.estimate_unhinted:
            return math.inf
        more = self._runs_after_next(key)
        if more == math.inf:
            return math.inf
        return (self._run_of(key[0]) - self.clock) + self._n * max(0.0, more)

    def key(self, slot) -> tuple:
        layer, expert = slot.key
        due = self.hints.get(layer, _NO_HINTS).get(expert)
        if due is not None:     # on equal distances an unhinted expert goes first
            return (-(due - self.clock), 1, slot.last_use)
        if slot.last_use == 0:  # demoted (a prefetch the router disagreed with): first
            return (-math.inf, 0, 0)
        return (-self._distance(slot.key), 0, slot.last_use)

    def hinted(self, key) -> bool:
        return key[1] in self.hints.get(key[0], ())

    def next_use(self, slot) -> float:
        return -self.key(slot)[0]

    # -- candidates
    def add(self, slot) -> None:
        layer, expert = slot.key
        due = self.hints.get(layer, _NO_HINTS).get(expert)
        if due is not None:
            slot.pq_group = self._hinted
            self._hinted.push((-due, slot.last_use), slot)
        elif not self.estimate_unhinted or self._used.get(slot.key, 0) == 0 or slot.last_use == 0:
            slot.pq_group = self._never
            self._never.push((slot.last_use,), slot)
        else:
            heap = self._per_layer[layer]
            slot.pq_group = heap
            # within a layer the furthest estimate is the least used ("frequency") or the one
            # unused for the most runs ("reuse": E[R | R > a] - a grows with a)
            first = self._used[slot.key] if self.estimator == "frequency" else self._last_run.get(slot.key, 0)
            heap.push((first, slot.last_use), slot)
            top = heap.top()
            if top[-1] is slot:
                self._refresh_head(layer)

    def discard(self, slot) -> None:
        group = slot.pq_group
        if group is None:
            return
        head = group is not self._hinted and group is not self._never and group.top()[-1] is slot
        group.drop(slot)
        slot.pq_group = None
        if head:                       # the layer's head left: its next expert heads it now
            self._refresh_head(slot.key[0])

    def _refresh_head(self, layer: int) -> None:
        """Push the layer's current head (its furthest estimated expert) on the heap of heads."""
        top = self._per_layer[layer].top() if layer in self._per_layer else None
        seq = next(_SEQ)
        self._head_seq[layer] = seq
        if top is None:
            return
        last_use = top[1]
        more = self._runs_after_next(top[-1].key)
        est = math.inf if more == math.inf else self._run_of(layer) + self._n * max(0.0, more)
        heapq.heappush(self._heads, (-est, last_use, seq, layer))
        if len(self._heads) > 4 * len(self._head_seq) + 64:
            self._heads = [e for e in self._heads if self._head_seq.get(e[3]) == e[2]]
            heapq.heapify(self._heads)

    def _best(self):
        e = self._never.top()
        if e is not None:
            return e[-1]
        h = self._hinted.top()
        u = None
        heads = self._heads
        while heads:
            top = heads[0]
            if self._head_seq.get(top[3]) == top[2]:
                u = self._per_layer[top[3]].top()
                break
            heapq.heappop(heads)
        if h is None:
            return None if u is None else u[-1]
        if u is None:
            return h[-1]
        hs, us = h[-1], u[-1]
        return hs if self.key(hs) < self.key(us) else us

    @property
    def candidates(self) -> int:
        return self._hinted.live + self._never.live + sum(h.live for h in self._per_layer.values())

    # -- events
    def on_use(self, key) -> None:
        layer = key[0]
        hints = self.hints.get(layer)
        if hints:
            hints.pop(key[1], None)
        run = self._runs.get(layer, 0)
        if self._counted.get(key) != run:
            self._counted[key] = run
            self._used[key] = self._used.get(key, 0) + 1
            last = self._last_run.get(key)
            if last is not None and run > last:
                self._add_reuse(layer, run - last)
            self._last_run[key] = run

    def on_enter_layer(self, layer: int, clock: int, lookup) -> None:
        prev_layer, prev = self._layer, self._here
        self._layer = layer
        dropped = self.hints.pop(prev_layer, None) if prev_layer is not None else None
        self.clock = clock
        pos = self._pos.get(layer)
        if pos is not None:
            self._here = pos
            self._runs[layer] = self._runs.get(layer, 0) + 1
            if prev is not None and pos == (prev + 1) % self._n:
                # one step along the cyclic order: only the entered layer's next run moves
                self._next_run[layer] = clock + self._n
                self._refresh_head(layer)
            else:
                self._recompute_next_runs()
        for expert in dropped or ():   # the layer ran: its predictions not consumed by a use were wrong
            slot = lookup((prev_layer, expert))
            if slot is not None and slot.pq_group is not None:
                self.discard(slot)
                self.add(slot)

    # -- the measured precision of a predictor's candidate lists (what is worth a load)
    def note_candidates(self, layer: int, experts) -> None:
        """``experts``: a predictor's candidate list for ``layer``'s next call, best first;
        :meth:`observe` scores it against the router's choice."""
        self._listed[layer] = list(experts)

    def observe(self, layer: int, routed, loaded=()) -> None:
        """The router chose ``routed`` for ``layer``'s call: score each position of the
        outstanding candidate list (a hit: its expert was chosen) and, for the candidates in
        ``loaded`` (loaded before the router: a transfer was made for them), whether that
        load was right."""
        listed = self._listed.pop(layer, None)
        if not listed:
            return
        pos = self._position.setdefault(layer, [])
        while len(pos) < len(listed):
            pos.append([0, 0, 0, 0])
        for i, e in enumerate(listed):
            hit = e in routed
            row = pos[i]
            row[0] += hit
            row[1] += 1
            if e in loaded:
                row[2] += hit
                row[3] += 1

    def _row(self, layer: int, position: int):
        """``[hits, seen, right loads, loads]`` of ``layer``'s list ``position`` (zeros if unseen)."""
        pos = self._position.get(layer)
        return pos[position] if pos is not None and position < len(pos) else (0, 0, 0, 0)

    def precision(self, layer: int, position: int) -> float:
        """Measured share of ``layer``'s candidate lists whose expert at ``position`` the
        router chose; ``(hits + 1) / (seen + 1)``: 1 before anything is seen (optimistic, so
        prefetching starts and is measured)."""
        row = self._row(layer, position)
        return (row[0] + 1) / (row[1] + 1)

    def load_precision(self, layer: int, position: int) -> float:
        """Measured share of the loads made before the router for ``layer``'s candidates at
        ``position`` that the router then chose, ``(right + 1) / (loads + 1)``. A candidate
        that waited for the router (no slot it may take before the call) and was dropped costs
        no load and does not count."""
        row = self._row(layer, position)
        return (row[2] + 1) / (row[3] + 1)

    def precise(self, layer: int, experts, threshold: float) -> list[int]:
        """The ``experts`` (a candidate list, best first) worth a load before the router: at
        positions whose measured precision, or the measured precision of the loads they made,
        is at least ``threshold``. (A position whose loads fell below it stays closed unless
        the router's choices alone raise its precision back.)"""
        return [e for i, e in enumerate(experts)
                if self.precision(layer, i) >= threshold or self.load_precision(layer, i) >= threshold]

    def hint(self, layer: int, experts, distance: int, lookup, complete: bool = False) -> None:
        """``complete``: ``experts`` are every candidate of that run of ``layer`` (a predictor's
        whole candidate list): the layer's other experts are expected to skip it, so their
        estimated next use moves a whole pass later (they become the preferred victims)."""
        due = self.clock + distance
        if complete and layer in self._pos and self._next_run.get(layer) == due:
            self._complete[layer] = due
            self._refresh_head(layer)
        hints = self.hints.setdefault(layer, {})
        for e in experts:
            old = hints.get(e)
            if old is not None and old <= due:
                continue
            hints[e] = due
            slot = lookup((layer, e))
            if slot is not None and slot.pq_group is not None:
                self.discard(slot)
                self.add(slot)


def make_policy(policy: "str | Policy") -> Policy:
    """The strategy object for a policy name (a :class:`Policy` is returned as is)."""
    if isinstance(policy, Policy):
        return policy
    if policy == "lru":
        return LRUPolicy()
    if policy == "lfu":
        return LFUPolicy()
    if policy == "predictive":
        return PredictivePolicy()
    raise ValueError(f"unknown expert cache policy {policy!r}; valid policies: {', '.join(POLICIES)}")
