"""expert_budget parsing and slot resolution."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow_compile.errors import OptionError
from expertflow_compile.runtime.budget import Budget, format_bytes, parse_budget
from expertflow_compile.runtime.store import ExpertSpec

GiB, MiB, KiB = 2**30, 2**20, 2**10


@pytest.mark.parametrize(
    "value, kind, amount",
    [
        ("2GiB", "bytes", 2 * GiB),
        ("512MB", "bytes", 512 * 10**6),
        ("1.5 GB", "bytes", 1.5 * 10**9),
        ("1024", "bytes", 1024),
        ("  3 mib ", "bytes", 3 * MiB),
        ("1KiB", "bytes", KiB),
        ("1kb", "bytes", 1000),
        ("10B", "bytes", 10),
        (".5GiB", "bytes", GiB // 2),
        ("25%", "share", 0.25),
        ("0.5 %", "share", 0.005),
        ("100%", "share", 1.0),
        (None, "share", 1.0),
        (4, "per_layer", 4),
        (1, "per_layer", 1),
    ],
)
def test_valid_forms(value, kind, amount):
    b = parse_budget(value)
    assert b.kind == kind
    assert b.value == pytest.approx(amount)
    assert parse_budget(b) is b


def test_everything():
    assert parse_budget(None).everything
    assert parse_budget("100%").everything
    assert not parse_budget("99%").everything


@pytest.mark.parametrize(
    "value",
    ["", "abc", "2 gigs", "2G", "-1GB", "0", "0B", "0%", "150%", "%", "1.5.2GB", "GB", "0.1", 0, -3, True, 1.5,
     [1], "25 percent"],
)
def test_invalid_forms_name_the_accepted_ones(value):
    with pytest.raises(OptionError) as info:
        parse_budget(value)
    msg = str(info.value)
    assert "expert_budget" in msg
    for form in ("'2GiB'", "'25%'", "an int n >= 1 (n x the number of MoE layers expert slots, shared by all layers)",
                 "KiB", "None"):
        assert form in msg, (form, msg)


def _specs(layers=2, experts=8, shape=(64, 32), dtype=torch.float32):
    return {i: ExpertSpec(experts, {"up": shape, "down": shape[::-1]}, dtype) for i in range(layers)}


def test_resolve_slots_per_kind():
    specs = _specs()                         # each expert: 2 * 64*32*4 = 16 KiB, 16 experts in all
    slot = specs[0].slot_nbytes()
    assert slot == 16 * KiB == specs[0].expert_nbytes()
    assert parse_budget(f"{5 * slot + 100}").resolve_slots(specs, 2) == 5
    assert parse_budget("80KiB").resolve_slots(specs, 2) == 5
    assert parse_budget("25%").resolve_slots(specs, 2) == 4
    assert parse_budget("30%").resolve_slots(specs, 2) == 4       # floor(4.8)
    assert parse_budget(3).resolve_slots(specs, 2) == 6
    assert parse_budget(100).resolve_slots(specs, 2) == 16        # capped
    assert parse_budget("1TiB").resolve_slots(specs, 2) == 16
    assert parse_budget(None).resolve_slots(specs, 2) == 16
    assert parse_budget("100%").resolve_slots(specs, 2) == 16
    assert parse_budget("25%").resolve_slots({}, 2) == 0


def test_slot_is_sized_for_the_largest_layer():
    specs = {0: ExpertSpec(4, {"w": (10,)}, torch.float32), 3: ExpertSpec(4, {"w": (100,)}, torch.float32)}
    slot = max(s.slot_nbytes() for s in specs.values())
    assert slot >= 400
    assert parse_budget(f"{3 * slot}").resolve_slots(specs, 1) == 3


def test_minimum_error_states_the_minimum():
    specs = _specs()
    with pytest.raises(OptionError) as info:
        parse_budget("20KiB").resolve_slots(specs, 2)
    msg = str(info.value)
    assert "expert_budget '20KiB' gives 1 expert slot (16KiB) shared by 2 MoE layers" in msg
    assert "one MoE layer needs 2 resident experts at once (32KiB: a token's top-2)" in msg
    assert "use expert_budget >= '32KiB', >= '12.5%', or an int >= 1 (n x 2 slots)" in msg
    with pytest.raises(ValueError, match=r"'1%' gives 0 expert slots"):
        parse_budget("1%").resolve_slots(specs, 2)
    with pytest.raises(OptionError, match=r"expert_budget 1 gives 2 expert slots .* needs 4 resident .* an int >= 2 "):
        parse_budget(1).resolve_slots(specs, 4)
    # a minimum above what exists is capped at everything
    assert parse_budget(None).resolve_slots(specs, 100) == 16


@pytest.mark.parametrize("layers, top_k", [(1, 2), (2, 2), (6, 2), (3, 8), (48, 8)])
def test_int_budget_rule(layers, top_k):
    """An int n buys n x layers slots shared by all layers; it runs iff n x layers >= top-k
    (README: the int-budget rule), so expert_budget=1 with top-2 runs from 2 layers on."""
    specs = _specs(layers=layers, experts=max(8, top_k))
    for n in range(1, top_k + 2):
        if n * layers >= top_k:
            assert parse_budget(n).resolve_slots(specs, top_k) == min(n * layers, layers * max(8, top_k))
        else:
            with pytest.raises(OptionError, match=rf"or an int >= {-(-top_k // layers)} \(n x {layers} slots\)"):
                parse_budget(n).resolve_slots(specs, top_k)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    experts=st.integers(1, 16),
    layers=st.integers(1, 4),
    need=st.integers(1, 16),
)
def test_suggested_minimum_is_enough_and_the_least(n, experts, layers, need):
    specs = {i: ExpertSpec(experts, {"w": (n,)}, torch.float16) for i in range(layers)}
    need = min(need, experts)
    with pytest.raises(OptionError) as info:       # a slot is >= 64 bytes, so 1 byte never suffices
        parse_budget("1B").resolve_slots(specs, need)
    m = re.search(r"use expert_budget >= '([^']+)', >= '([^']+)%', or an int >= (\d+) \(n x (\d+) slots\)",
                  str(info.value))
    assert m, "message lacks the suggestion"
    size, share, per_layer = m.group(1), float(m.group(2)), int(m.group(3))
    assert int(m.group(4)) == layers
    for enough in (size, f"{share:g}%", per_layer):
        assert parse_budget(enough).resolve_slots(specs, need) >= need
    if per_layer > 1:
        with pytest.raises(OptionError):
            parse_budget(per_layer - 1).resolve_slots(specs, need)
    if share > 0.01:
        with pytest.raises(OptionError):
            parse_budget(f"{share - 0.01:.2f}%").resolve_slots(specs, need)


def test_format_bytes():
    assert format_bytes(3 * GiB) == "3GiB"
    assert format_bytes(1536) == "1.5KiB"
    assert format_bytes(100) == "100B"
    assert format_bytes(GiB + 1, round_up=True) == "1.01GiB"
    assert format_bytes(GiB + 1) == "1GiB"


def test_budget_rejects_bad_fields():
    with pytest.raises(ValueError):
        Budget("share", 1.5)
    with pytest.raises(ValueError):
        Budget("experts", 2)
    with pytest.raises(ValueError):
        Budget("per_layer", 0)
