"""Backend options, parsed into one validated dataclass.

``torch.compile(model, backend="expertflow", options={...})`` hands the options dict
to the backend; :meth:`ExpertFlowConfig.from_options` turns it into this config. An
unknown key or a bad value raises :class:`~expertflow_compile.errors.OptionError` (a
``ValueError`` that Dynamo passes through unwrapped at a compiled model's first call) that
names what is accepted: options are never silently dropped. A ``predictor_path`` is
checked here to be an existing file, and is refused unless the predictor reads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError

__all__ = ["ExpertFlowConfig", "OptionError", "POLICIES", "PREDICTORS", "INNER_BACKENDS", "KERNELS"]

from .runtime.policies import POLICIES  # noqa: E402 - the one list of policy names
KERNELS = ("auto", "torch", "triton")
PREDICTORS = ("none", "lookahead", "path", "oracle")
INNER_BACKENDS = ("eager", "aot_eager", "inductor")


_PATH_KIND = {"path": "path-predictor (expertflow train-predictor)", "oracle": "routing-trace (expertflow trace)"}


@dataclass(frozen=True)
class ExpertFlowConfig:
    """Every option of the ``expertflow`` backend.

    Attributes:
        expert_budget: device-cache size for expert weights: bytes ("2GiB"), a share of
            all expert bytes ("25%"), an int n (n x the number of MoE layers slots, one pool
            shared by all layers) or None (all resident). Whatever the form, the pool must
            hold one MoE layer's top-k experts (see ``runtime/budget.py``).
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
        prefetch: load predicted experts ahead of their layer: on a background worker (CUDA
            side stream; a CPU thread for a host tier read from files) or, for a CPU cache
            over experts in RAM, on the calling thread at the prefetch op. False: no prefetch.
        resident_first: within a layer, compute the experts already resident first while
            the missing ones load (False: expert-id order, for measurements).
        kernels: the grouped GEMM implementation: ``auto`` (Triton on CUDA when the
            layer's gating is a kind the kernels implement, else torch), ``torch``, ``triton``.
        prefetch_min_precision: with ``policy="predictive"``, prefetch a predicted expert only
            when its position in the predictor's list has been chosen by the router at least
            this often for its layer (measured online); the rest wait for the router. A
            float in [0, 1] (0: prefetch every candidate) or None (no gate, no measurement).
        lookahead_ranking: the lookahead ranks experts with its router chain's ranking form
            where the compiler finds one (the RMSNorm's positive per-token scale dropped: 3 ops
            instead of ~11, the same top-k up to near-ties); False: the whole router chain.
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
    prefetch_min_precision: float | None = 0.95
    lookahead_ranking: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_options(cls, options: dict | None) -> "ExpertFlowConfig":
        """Parse and validate ``options``; raise :class:`OptionError` (a ``ValueError``)
        naming the valid keys/values."""
        if options is None:
            options = {}
        if isinstance(options, ExpertFlowConfig):
            return options
        if not isinstance(options, dict):
            raise OptionError(f"expertflow options must be a dict, got {type(options).__name__}")
        valid = cls.valid_keys()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise OptionError(f"unknown expertflow option(s) {unknown}; valid options are {valid}")
        if isinstance(options.get("predictor_path"), os.PathLike):
            options = {**options, "predictor_path": os.fspath(options["predictor_path"])}
        cfg = cls(**options)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        from .runtime.budget import parse_budget   # the one budget grammar

        parse_budget(self.expert_budget)           # raises OptionError naming the accepted forms
        for name, allowed in (("policy", POLICIES), ("predictor", PREDICTORS),
                              ("inner_backend", INNER_BACKENDS), ("kernels", KERNELS)):
            value = getattr(self, name)
            if value not in allowed:
                raise OptionError(f"{name}={value!r} is not valid; valid values are {list(allowed)}")
        for name, low in (("lookahead_depth", 1), ("prefetch_extra", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OptionError(f"{name}={value!r} is not valid; it must be an int >= {low}")
        for name in ("verify", "prefetch", "resident_first", "lookahead_ranking"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}={getattr(self, name)!r} is not valid; it must be True or False")
        mp = self.prefetch_min_precision
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, (int, float)) or not 0.0 <= mp <= 1.0):
            raise OptionError(f"prefetch_min_precision={mp!r} is not valid; it must be a number in [0, 1] or None")
        if self.predictor_path is not None and not isinstance(self.predictor_path, str):
            raise OptionError(f"predictor_path={self.predictor_path!r} must be a path string or None")
        if self.predictor in ("path", "oracle") and self.predictor_path is None:
            raise OptionError(f"predictor={self.predictor!r} needs predictor_path (a trained predictor "
                              "file for 'path', a recorded routing trace for 'oracle')")
        if self.predictor_path is not None:
            if self.predictor not in ("path", "oracle"):
                raise OptionError(f"predictor_path={self.predictor_path!r} is read only by predictor='path' (a "
                                  "trained predictor file) or 'oracle' (a routing trace), but predictor="
                                  f"{self.predictor!r}: set one of those, or drop predictor_path")
            if os.path.isdir(self.predictor_path):
                raise OptionError(f"predictor_path={self.predictor_path!r} is a directory; give the "
                                  f"{_PATH_KIND[self.predictor]} file itself")
            if not os.path.isfile(self.predictor_path):
                raise OptionError(f"predictor_path={self.predictor_path!r} does not exist; give an existing "
                                  f"{_PATH_KIND[self.predictor]} file")

    @property
    def offloads(self) -> bool:
        """True when a budget limits the resident experts."""
        from .runtime.budget import parse_budget

        return not parse_budget(self.expert_budget).everything

    def key(self) -> tuple:
        """A hashable identity of the options (runtimes are shared only between equal keys)."""
        return tuple((f, repr(getattr(self, f))) for f in self.valid_keys())
