"""The replacement policies' candidate structures against a plain reference: whatever the
order of adds, removals, re-keys and victim picks, the policy hands out the candidate with
the smallest key and its count of candidates is right."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow_compile.runtime.policies import make_policy


class _FakeSlot:
    __slots__ = ("key", "last_use", "pq_seq", "pq_group")

    def __init__(self, key):
        self.key, self.last_use, self.pq_seq, self.pq_group = key, 0, 0, None


# ops: ("add", i, t) sets slot i's last_use to t (a clock that usually grows, sometimes goes
# back: a prefetched slot whose protection lapsed) and makes it a candidate; ("drop", i);
# ("touch", i, t) re-keys a candidate; ("victim",) picks one.
_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 11), st.integers(-3, 3)),
    st.tuples(st.just("drop"), st.integers(0, 11)),
    st.tuples(st.just("touch"), st.integers(0, 11), st.integers(-3, 3)),
    st.tuples(st.just("victim"),)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(["lru", "lfu"]), ops=_ops)
def test_victim_is_a_smallest_key_candidate(policy, ops):
    pol = make_policy(policy)
    pol.bind([0, 1])
    slots = [_FakeSlot((i % 2, i)) for i in range(12)]
    cands: set[int] = set()
    clock = 10
    for op in ops:
        if op[0] in ("add", "touch"):
            i, step = op[1], op[2]
            clock += 1
            s = slots[i]
            if op[0] == "touch":
                if i not in cands:
                    continue
                s.last_use = clock + 100 * step        # far back or far ahead
                pol.refresh(s)
            elif i not in cands:
                s.last_use = clock if step >= 0 else clock - 50 + step   # out of order sometimes
                pol.on_use(s.key)
                pol.add(s)
                cands.add(i)
        elif op[0] == "drop":
            if op[1] in cands:
                pol.discard(slots[op[1]])
                cands.discard(op[1])
        else:
            v = pol.victim()
            if not cands:
                assert v is None
                continue
            best = min(pol.key(slots[i]) for i in cands)
            assert v is not None and v.pq_group is None
            assert pol.key(v) == best
            cands.discard(slots.index(v))
        assert pol.candidates == len(cands)
        assert all((slots[i].pq_group is not None) == (i in cands) for i in range(12))
