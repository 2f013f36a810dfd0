"""Kernel activation kinds, and classifying a model's gating function into one.

The Triton expert kernels apply the gating function of the expert MLP in the
epilogue of the up projection, so they must know *which* function the model uses.
The graph pass hands us the gating function as an opaque callable (an extracted
FX subgraph ``gate_fn: [S, N_up] -> [S, I]``), so :func:`classify_gate_fn`
recognises it by **probing it numerically**: it evaluates the callable on random
inputs (including large magnitudes, which expose clamps) and compares the result
with each candidate formula. Nothing matching within tolerance -> ``None`` and the
caller keeps the torch path, which runs the callable itself.

Kinds (``h`` is the up projection's output, ``I = N_up // 2`` for the gated kinds):

=================  ===========================================================
``silu_glu``       ``silu(h[..., :I]) * h[..., I:]``            (Mixtral, Qwen, DeepSeek)
``gelu_glu``       ``gelu(h[..., :I]) * h[..., I:]``, exact erf GELU
``gelu_tanh_glu``  ``gelu_tanh(h[..., :I]) * h[..., I:]``
``swiglu_oai``     GPT-OSS, gate/up *interleaved*: ``g, u = h[..., ::2], h[..., 1::2]``;
                   ``g = g.clamp(max=limit)``; ``u = u.clamp(-limit, limit)``;
                   ``(u + 1) * g * sigmoid(alpha * g)`` (parameters ``alpha``, ``limit``)
``silu``           ``silu(h)`` (no gate, ``I = N_up``)
``gelu``           ``gelu(h)`` (exact erf)
``gelu_tanh``      ``gelu_tanh(h)``
``relu``           ``relu(h)``
=================  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ActivationKind",
    "GLU_KINDS",
    "PLAIN_KINDS",
    "KIND_NAMES",
    "GPT_OSS_ALPHA",
    "GPT_OSS_LIMIT",
    "apply_activation",
    "classify_gate_fn",
]

GLU_KINDS = ("silu_glu", "gelu_glu", "gelu_tanh_glu", "swiglu_oai")
PLAIN_KINDS = ("silu", "gelu", "gelu_tanh", "relu")
KIND_NAMES = GLU_KINDS + PLAIN_KINDS

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0

# Kernel codes (``ACT`` constexpr of the up-projection kernel); keep in sync with triton_moe.py.
_KIND_CODE = {name: i for i, name in enumerate(KIND_NAMES)}


@dataclass(frozen=True)
class ActivationKind:
    """One activation the kernels implement; ``alpha``/``limit`` only for ``swiglu_oai``."""

    name: str
    alpha: float | None = None
    limit: float | None = None

    def __post_init__(self):
        if self.name not in KIND_NAMES:
            raise ValueError(f"unknown activation kind {self.name!r}; valid kinds: {', '.join(KIND_NAMES)}")
        if self.name == "swiglu_oai":
            if self.alpha is None or self.limit is None:
                raise ValueError("swiglu_oai needs alpha and limit")
            object.__setattr__(self, "alpha", float(self.alpha))
            object.__setattr__(self, "limit", float(self.limit))
        elif self.alpha is not None or self.limit is not None:
            raise ValueError(f"{self.name} takes no alpha/limit")

    @classmethod
    def of(cls, kind: ActivationKind | str, alpha: float | None = None,
           limit: float | None = None) -> ActivationKind:
        """Normalise ``kind`` (a name or a kind); explicit ``alpha``/``limit`` override.

        A bare ``"swiglu_oai"`` defaults to GPT-OSS's ``alpha=1.702, limit=7.0``.
        """
        if isinstance(kind, ActivationKind):
            if alpha is None and limit is None:
                return kind
            name, a0, l0 = kind.name, kind.alpha, kind.limit
        else:
            name, a0, l0 = str(kind), None, None
        if name == "swiglu_oai":
            a = alpha if alpha is not None else (a0 if a0 is not None else GPT_OSS_ALPHA)
            l = limit if limit is not None else (l0 if l0 is not None else GPT_OSS_LIMIT)
            return cls(name, a, l)
        return cls(name)

    @property
    def is_glu(self) -> bool:
        """True when the activation consumes two halves (gate, up) of the up output."""
        return self.name in GLU_KINDS

    @property
    def interleaved(self) -> bool:
        """Gate/up columns interleaved (``::2``/``1::2``) rather than two halves."""
        return self.name == "swiglu_oai"

    @property
    def code(self) -> int:
        return _KIND_CODE[self.name]

    def out_features(self, n_up: int) -> int:
        """Width of the activation's output for an up projection of width ``n_up``."""
        return n_up // 2 if self.is_glu else n_up

    def gate_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The torch implementation as a ``gate_fn`` for :class:`~expertflow_compile.layer.ExpertMath`."""
        return lambda h: apply_activation(h, self)

    def __str__(self) -> str:
        if self.name == "swiglu_oai":
            return f"swiglu_oai(alpha={self.alpha:g}, limit={self.limit:g})"
        return self.name


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_PLAIN = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu}
_GATED = {"silu_glu": F.silu, "gelu_glu": F.gelu, "gelu_tanh_glu": _gelu_tanh}


def apply_activation(h: torch.Tensor, kind: ActivationKind | str) -> torch.Tensor:
    """The torch formula of ``kind`` on the up projection's output ``h`` [..., N_up].

    Computed in ``h``'s dtype, op by op, like the Hugging Face modules do.
    """
    kind = ActivationKind.of(kind)
    if kind.name in _PLAIN:
        return _PLAIN[kind.name](h)
    if h.shape[-1] % 2:
        raise ValueError(f"{kind.name} needs an even up-projection width, got {h.shape[-1]}")
    if kind.name == "swiglu_oai":
        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(max=kind.limit)
        up = up.clamp(min=-kind.limit, max=kind.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * kind.alpha))
    gate, up = h.chunk(2, dim=-1)
    return _GATED[kind.name](gate) * up


# ----- classification by probing ---------------------------------------------------------

# (rtol, atol) per probe dtype: a candidate matches when |fn - formula| <= atol + rtol*|formula|
# everywhere. fp32 is tight enough to tell exact GELU from its tanh approximation
# (they differ by up to ~5e-4); the 16-bit dtypes only confirm.
_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-9, 1e-9),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
_SWIGLU_DEFAULTS = ((GPT_OSS_ALPHA, GPT_OSS_LIMIT),)


def _probe_inputs(n_up: int, dtype: torch.dtype, seed: int, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # moderate values, values past typical clamp limits, and (fp16 permitting) large ones
    scales = [0.5, 2.0, 6.0, 15.0] if dtype == torch.float16 else [0.5, 2.0, 6.0, 15.0, 60.0]
    probes = [torch.randn(24, n_up, generator=g) * s for s in scales]
    probes.append(torch.linspace(-12.0, 12.0, 16 * n_up).reshape(16, n_up))
    return [p.to(device=device, dtype=dtype) for p in probes]


def _run(fn, x: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            y = fn(x.clone())
    except Exception:  # noqa: BLE001 - any failure means "not a kind we know"
        return None
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        return None
    return y


def _mismatch(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest ``|y - ref| / (atol + rtol*|ref|)`` (<= 1 is a match); inf on shape/nan mismatch."""
    if y.shape != ref.shape:
        return math.inf
    rtol, atol = _TOL.get(dtype, _TOL[torch.bfloat16])
    y, ref = y.double(), ref.double()
    same = (y == ref) | (torch.isnan(y) & torch.isnan(ref))
    if bool(same.all()):
        return 0.0
    finite = torch.isfinite(y) & torch.isfinite(ref)
    if bool((~finite & ~same).any()):
        return math.inf
    err = ((y - ref).abs() / (atol + rtol * ref.abs()))[~same]
    return float(err.max())


def _snap(v: float) -> float:
    """Round an estimated parameter to a short decimal when it is that within estimation noise."""
    for digits in range(0, 5):
        r = round(v, digits)
        if abs(v - r) <= 2e-5 * max(1.0, abs(v)):
            return float(r)
    return float(v)


def _estimate_swiglu(fn, n_up: int, device="cpu") -> tuple[float, float] | None:
    """Estimate (alpha, limit) of an interleaved clamped SwiGLU from three probes (fp32).

    With ``up = 0`` the output is ``s = g' * sigmoid(alpha * g')`` (``g'`` the clamped
    gate); with ``up = U`` beyond the limit it is ``(limit + 1) * s``: their ratio
    gives ``limit``. Then with a gate ``g`` below the limit, ``alpha = logit(s/g)/g``.
    """
    half = n_up // 2
    gate = torch.linspace(0.25, 1.0, half)

    def out(gate_val, up_val):
        h = torch.zeros(1, n_up)
        h[0, 0::2] = gate_val
        h[0, 1::2] = up_val
        y = _run(fn, h.to(device))
        if y is None or y.shape != (1, half):
            return None
        return y[0].double().cpu()

    s0, s1 = out(gate, 0.0), out(gate, 1.0e3)
    if s0 is None or s1 is None or bool((s0 == 0).any()):
        return None
    limit = float((s1 / s0 - 1.0).median())
    if not math.isfinite(limit) or limit <= 0:
        return None
    g = min(0.5, limit / 2)
    s = out(torch.full((half,), g), 0.0)
    if s is None:
        return None
    p = s / g
    if bool(((p <= 0) | (p >= 1)).any()):
        return None
    alpha = float((torch.log(p / (1 - p)) / g).median())
    if not math.isfinite(alpha):
        return None
    return _snap(alpha), _snap(limit)


def _candidates(fn, n_up: int, out_width: int, device="cpu") -> list[ActivationKind]:
    cands: list[ActivationKind] = []
    if out_width == n_up:
        cands += [ActivationKind(n) for n in PLAIN_KINDS]
    if n_up % 2 == 0 and out_width == n_up // 2:
        cands += [ActivationKind(n) for n in ("silu_glu", "gelu_glu", "gelu_tanh_glu")]
        params = list(_SWIGLU_DEFAULTS)
        est = _estimate_swiglu(fn, n_up, device)
        if est is not None and est not in params:
            params.append(est)
        cands += [ActivationKind("swiglu_oai", a, l) for a, l in params]
    return cands


def _scores(fn, cands, n_up: int, dtype: torch.dtype, seed: int, device="cpu"
            ) -> dict[ActivationKind, float] | None:
    """Worst normalised mismatch of each candidate over all probes in ``dtype`` (None: fn failed)."""
    scores = dict.fromkeys(cands, 0.0)
    for x in _probe_inputs(n_up, dtype, seed, device):
        y = _run(fn, x)
        if y is None:
            return None
        for c in cands:
            if scores[c] <= 1.0:
                # compare in the dtype the function returned (it may upcast internally)
                ref = apply_activation(x if y.dtype == x.dtype else x.to(y.dtype), c)
                scores[c] = max(scores[c], _mismatch(y, ref, y.dtype if y.dtype in _TOL else dtype))
    return scores


def classify_gate_fn(fn: Callable[[torch.Tensor], torch.Tensor], n_up: int,
                     dtype: torch.dtype = torch.float32, *, seed: int = 0,
                     device: torch.device | str = "cpu") -> ActivationKind | None:
    """Which kernel activation ``fn`` computes on an up-projection output of width ``n_up``.

    ``fn`` is probed on CPU tensors in float32 (discriminative: tells exact from tanh
    GELU, fits GPT-OSS's ``alpha``/``limit``) and in ``dtype`` (the model's dtype:
    confirms the function behaves the same there). A kind must match in every probe
    dtype the function accepts; among several matches the closest in float32 wins.
    Returns ``None`` when ``fn`` fails, has an unexpected output shape, or matches
    nothing within tolerance: the caller then uses the torch path. ``device``: where
    to probe (a function holding tensors on a GPU must be probed there).
    """
    if n_up < 1:
        return None
    x0 = _probe_inputs(n_up, torch.float32, seed, device)[0]
    y0 = _run(fn, x0)
    if y0 is None or y0.dim() != 2 or y0.shape[0] != x0.shape[0]:
        return None
    cands = _candidates(fn, n_up, y0.shape[1], device)
    if not cands:
        return None
    per_dtype = []
    for dt in dict.fromkeys([torch.float32, dtype]):
        s = _scores(fn, cands, n_up, dt, seed, device)
        if s is not None:
            per_dtype.append(s)
    if not per_dtype:
        return None
    matching = [c for c in cands if all(s[c] <= 1.0 for s in per_dtype)]
    if not matching:
        return None
    return min(matching, key=lambda c: per_dtype[0][c])
