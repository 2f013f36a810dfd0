"""``expert_budget``: how much expert memory the cache may hold.

Accepted forms (:func:`parse_budget`):

* bytes: ``"2GiB"``, ``"512MB"``, ``"1.5 GB"``, ``"1024"`` (plain bytes). KB/MB/GB/TB
  are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; units are case-insensitive.
* a share of all expert bytes: ``"25%"`` (0 < share <= 100).
* an ``int`` n >= 1: n experts per MoE layer *on average*, i.e. ``n x L`` cache slots
  for L MoE layers, in the one pool that all layers share (a layer may hold more than
  n of its experts while another holds fewer).
* ``None`` or ``"100%"``: everything resident.

:meth:`Budget.resolve_slots` turns a budget into a number of cache slots; one
slot holds one expert of any layer, so its size is the largest layer's
``ExpertSpec.slot_nbytes()``.

The minimum, the same rule for every form: the pool must hold what one MoE layer needs
resident at once, one token's top-k experts (the largest top-k of any layer), because
layers run one after the other and a layer's experts stay pinned while it computes.
An int budget therefore needs ``n >= ceil(top_k / L)`` (with 6 layers and top-2,
``expert_budget=1`` gives 6 slots and runs). Below the minimum, ``resolve_slots``
raises :class:`~expertflow_compile.errors.OptionError` stating the minimum in every form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import OptionError
from .store import ExpertSpec

__all__ = ["Budget", "parse_budget", "format_bytes"]

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_BYTES_RE = re.compile(rf"^{_NUM}\s*([a-z]*)$", re.IGNORECASE)
_SHARE_RE = re.compile(rf"^{_NUM}\s*%$")

ACCEPTED_FORMS = (
    "bytes like '2GiB', '512MB', '1.5 GB' or '1024' (KB/MB/GB/TB = powers of 1000, "
    "KiB/MiB/GiB/TiB = powers of 1024), a share of all expert bytes like '25%' (0 < share <= 100), "
    "an int n >= 1 (n x the number of MoE layers expert slots, shared by all layers), "
    "or None / '100%' for everything resident"
)


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """``3221225472`` -> ``"3GiB"``; at most 2 decimals, binary units.

    ``round_up``: round the shown number up, so that parsing the result gives
    at least ``n`` bytes (used for "use at least ..." suggestions).
    """
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            break
    else:
        unit, v = "B", n
    if unit == "B":
        v = math.ceil(v) if round_up else round(v)
        return f"{int(v)}B"
    v = math.ceil(v * 100 - 1e-9) / 100 if round_up else round(v, 2)
    return f"{v:.2f}".rstrip("0").rstrip(".") + unit


def _bad(value, why: str = "") -> OptionError:
    return OptionError(f"invalid expert_budget {value!r}: {why + '; ' if why else ''}expected {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class Budget:
    """A parsed ``expert_budget``.

    ``kind``: ``"bytes"`` (``value`` = bytes), ``"share"`` (``value`` = fraction of
    all expert bytes in (0, 1]) or ``"per_layer"`` (``value`` = experts per MoE layer).
    ``source``: what the user wrote (for messages; not part of equality).
    """

    kind: str
    value: float
    source: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in ("bytes", "share", "per_layer"):
            raise ValueError(f"Budget.kind must be 'bytes', 'share' or 'per_layer', got {self.kind!r}")
        if self.kind == "share" and not 0 < self.value <= 1:
            raise ValueError(f"a share budget must be in (0, 1], got {self.value!r}")
        if self.kind != "share" and not self.value >= 1:
            raise ValueError(f"a {self.kind} budget must be >= 1, got {self.value!r}")

    @property
    def everything(self) -> bool:
        """True for ``None`` / ``"100%"``: every expert may be resident."""
        return self.kind == "share" and self.value >= 1

    def _shown(self) -> str:
        if self.source is not None:
            return repr(self.source)
        if self.kind == "bytes":
            return repr(format_bytes(self.value))
        if self.kind == "share":
            return repr(f"{self.value * 100:g}%")
        return repr(int(self.value))

    def resolve_slots(self, specs: dict[int, ExpertSpec], min_slots: int) -> int:
        """Number of cache slots this budget buys for these MoE layers.

        * bytes: ``floor(bytes / slot_bytes)``
        * share: ``floor(share * total experts over all layers)``; 100% = all
          (with layers of different sizes the share is of experts, each slot
          sized for the largest layer)
        * per_layer: ``value * number of MoE layers``

        Capped at the total number of experts. ``min_slots`` is what one MoE
        layer needs resident at once (capped at the total too); fewer raises
        :class:`OptionError` stating the minimum as bytes, as a share and as an int.
        """
        if not specs:
            return 0
        slot = max(s.slot_nbytes() for s in specs.values())
        total = sum(s.num_experts for s in specs.values())
        if self.kind == "bytes":
            n = int(self.value // slot) if slot else total
        elif self.kind == "share":
            n = total if self.everything else math.floor(self.value * total + 1e-9)
        else:
            n = int(self.value) * len(specs)
        n = min(n, total)
        need = min(max(int(min_slots), 0), total)
        if n < need:
            layers = len(specs)
            hundredths = -(-need * 10000 // total)     # the smallest share in 0.01% steps that is enough
            raise OptionError(
                f"expert_budget {self._shown()} gives {n} expert slot{'' if n == 1 else 's'} "
                f"({format_bytes(n * slot)}) shared by {layers} MoE layer{'' if layers == 1 else 's'}, but one MoE "
                f"layer needs {need} resident experts at once ({format_bytes(need * slot)}: a token's top-{need}); "
                f"use expert_budget >= {format_bytes(need * slot, round_up=True)!r}, >= '{hundredths / 100:g}%', or an int "
                f">= {math.ceil(need / layers)} (n x {layers} slots)"
            )
        return n


def parse_budget(value) -> Budget:
    """Parse an ``expert_budget`` option (see the module docstring for the forms)."""
    if isinstance(value, Budget):
        return value
    if value is None:
        return Budget("share", 1.0, source=None)
    if isinstance(value, bool):
        raise _bad(value)
    if isinstance(value, int):
        if value < 1:
            raise _bad(value, "an int budget (slots per MoE layer, pooled) must be >= 1")
        return Budget("per_layer", float(value), source=value)
    if not isinstance(value, str):
        raise _bad(value)
    s = value.strip()
    m = _SHARE_RE.match(s)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise _bad(value, "a share must be > 0% and <= 100%")
        return Budget("share", pct / 100, source=value)
    m = _BYTES_RE.match(s)
    if m:
        unit = m.group(2).lower() or "b"
        if unit in _UNITS:
            n = math.floor(float(m.group(1)) * _UNITS[unit])
            if n < 1:
                raise _bad(value, "a byte budget must be at least 1 byte")
            return Budget("bytes", float(n), source=value)
    raise _bad(value)
