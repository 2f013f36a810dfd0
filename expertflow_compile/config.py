"""Backend options, parsed into one validated dataclass.

``torch.compile(model, backend="expertflow", options={...})`` hands the options dict
to the backend; :meth:`ExpertFlowConfig.from_options` turns it into this config. An
unknown key or a bad value raises a ``ValueError`` that names what is accepted:
options are never silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExpertFlowConfig", "POLICIES", "PREDICTORS", "INNER_BACKENDS", "KERNELS"]

from .runtime.policies import POLICIES  # noqa: E402 - the one list of policy names
KERNELS = ("auto", "torch", "triton")
PREDICTORS = ("none", "lookahead", "path", "oracle")
INNER_BACKENDS = ("eager", "aot_eager", "inductor")

_BUDGET_RE = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*(%|b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.I)


def _check_budget(value: Any) -> Any:
    """Accept what :func:`runtime.budget.parse_budget` accepts; reject early with the forms."""
    forms = ('a byte size such as "2GiB" or "512MB", a share of all expert bytes such as "25%", '
             "an int (experts per MoE layer, >= 1), or None (every expert resident)")
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expert_budget={value!r} is not valid; use {forms}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"expert_budget={value!r} is not valid; use {forms}")
        return value
    if isinstance(value, str):
        m = _BUDGET_RE.match(value)
        if m is None:
            raise ValueError(f"expert_budget={value!r} does not parse; use {forms}")
        number, unit = float(m.group(1)), (m.group(3) or "b").lower()
        if unit == "%" and not 0 < number <= 100:
            raise ValueError(f"expert_budget={value!r}: a share must be in (0%, 100%]")
        if number <= 0:
            raise ValueError(f"expert_budget={value!r} must be positive; use {forms}")
        return value.strip()
    raise ValueError(f"expert_budget={value!r} has type {type(value).__name__}; use {forms}")


@dataclass(frozen=True)
class ExpertFlowConfig:
    """Every option of the ``expertflow`` backend.

    Attributes:
        expert_budget: device-cache size for expert weights: bytes ("2GiB"), a share of
            all expert bytes ("25%"), an int (experts per MoE layer) or None (all resident).
        policy: cache replacement, one of ``lru``, ``lfu``, ``predictive``.
        predictor: expert prediction feeding prefetch, one of ``none``, ``lookahead``,
            ``path``, ``oracle``.
        lookahead_depth: how many following MoE layers the lookahead predictor covers.
        prefetch_extra: candidates beyond top-k that prediction may prefetch per layer.
        predictor_path: a trained path-predictor file (``predictor="path"``) or a
            recorded routing trace (``predictor="oracle"``).
        verify: check each rewritten block against the original graph on the first
            inputs at compile time; a block that disagrees is left untouched.
        inner_backend: what runs the rewritten graph: ``eager``, ``aot_eager``, ``inductor``.
        prefetch: run loads on a background worker (CUDA side stream / CPU thread).
        resident_first: within a layer, compute the experts already resident first while
            the missing ones load (False: expert-id order, for measurements).
        kernels: the grouped GEMM implementation: ``auto`` (Triton on CUDA when the
            layer's gating is a kind the kernels implement, else torch), ``torch``, ``triton``.
    """

    expert_budget: Any = None
    policy: str = "lru"
    predictor: str = "none"
    lookahead_depth: int = 1
    prefetch_extra: int = 0
    predictor_path: str | None = None
    verify: bool = True
    inner_backend: str = "eager"
    prefetch: bool = True
    resident_first: bool = True
    kernels: str = "auto"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_options(cls, options: dict | None) -> "ExpertFlowConfig":
        """Parse and validate ``options``; raise ``ValueError`` naming valid keys/values."""
        if options is None:
            options = {}
        if isinstance(options, ExpertFlowConfig):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"expertflow options must be a dict, got {type(options).__name__}")
        valid = cls.valid_keys()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise ValueError(f"unknown expertflow option(s) {unknown}; valid options are {valid}")
        cfg = cls(**options)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        _check_budget(self.expert_budget)
        for name, allowed in (("policy", POLICIES), ("predictor", PREDICTORS),
                              ("inner_backend", INNER_BACKENDS), ("kernels", KERNELS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not valid; valid values are {list(allowed)}")
        for name, low in (("lookahead_depth", 1), ("prefetch_extra", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not valid; it must be an int >= {low}")
        for name in ("verify", "prefetch", "resident_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; it must be True or False")
        if self.predictor_path is not None and not isinstance(self.predictor_path, str):
            raise ValueError(f"predictor_path={self.predictor_path!r} must be a path string or None")
        if self.predictor in ("path", "oracle") and self.predictor_path is None:
            raise ValueError(f"predictor={self.predictor!r} needs predictor_path (a trained predictor "
                             "file for 'path', a recorded routing trace for 'oracle')")

    @property
    def offloads(self) -> bool:
        """True when a budget limits the resident experts."""
        return self.expert_budget is not None and self.expert_budget != "100%"

    def key(self) -> tuple:
        """A hashable identity of the options (runtimes are shared only between equal keys)."""
        return tuple((f, repr(getattr(self, f))) for f in self.valid_keys())
