"""Recorded routing traces: which experts every token used, per MoE layer.

:func:`record_routing` runs teacher-forced forward passes of a model compiled with
the ``expertflow`` backend (no budget) with ``engine.recorder`` set, and collects
per MoE layer the top-k expert ids and routing weights of every token, plus the
lookahead candidates (layer L's router applied to the residual stream before L's
attention: the top ``k + 2`` ids and their logits, not the full logits).

A :class:`RoutingTrace` is saved as safetensors (tensors) with JSON metadata; it
carries the model's :func:`fingerprint` and (``meta["router_digest"]``) the digest of its
router weights, so that a trace is never used with another model (the oracle predictor
checks the digest against the compiled model's routers). Tokens are stored in the order the model saw them: batch after batch, each
batch row (a sequence) after the other.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import torch

from ..layer import layer_index, unwrap_compiled

__all__ = ["RoutingTrace", "record_routing", "fingerprint", "require_fingerprint", "router_weights", "router_digest"]

FORMAT = "expertflow-routing-trace/1"
LOOKAHEAD_EXTRA = 2          # lookahead candidates kept per token: top (k + 2)

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
                         "output_router_logits", "output_attentions", "output_hidden_states",
                         "return_dict", "_attn_implementation", "_experts_implementation",
                         "experts_implementation", "attn_implementation"}
_ROUTER_RE = re.compile(r"(^|\.)(gate|router)(\.layer|\.linear|\.classifier)?\.weight$")


def _module(model) -> torch.nn.Module:
    return unwrap_compiled(model)


def router_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The MoE router weights of ``model`` ([num_experts, hidden] matrices named ``...gate.weight``
    or ``...router.weight``), in layer order."""
    found = []
    for name, p in _module(model).named_parameters():
        if p.dim() == 2 and _ROUTER_RE.search(name):
            layer = layer_index(name)
            found.append((-1 if layer is None else layer, name, p))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(name, p) for _, name, p in found]


def router_digest(tensors) -> str:
    """sha256 over router weight matrices (as float32 bytes, in the given order)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def require_fingerprint(model, expected: str, what: str, remedy: str) -> None:
    """Raise ``ValueError`` unless ``model``'s fingerprint is ``expected`` (a file made for
    another model is refused): "<what> a model with fingerprint ...: <remedy>"."""
    fp = fingerprint(model)
    if fp != expected:
        raise ValueError(f"{what} a model with fingerprint {expected[:16]}..., but the given model has "
                         f"fingerprint {fp[:16]}...: {remedy}")


def fingerprint(model) -> str:
    """sha256 of the model's config (JSON, without load-time keys such as dtype) and its
    router weights (as float32): a trace or predictor recorded on one model is only valid
    for a model with the same fingerprint."""
    mod = _module(model)
    cfg = mod.config.to_dict() if hasattr(mod, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(router_digest([p for _, p in router_weights(mod)]).encode())
    return h.hexdigest()


@dataclass
class RoutingTrace:
    """Routing of ``num_tokens`` tokens through the MoE layers ``layers``.

    ``ids[layer]`` int64 [N, K] and ``weights[layer]`` float32 [N, K]: each token's
    experts and routing weights. ``lookahead_ids[layer]`` / ``lookahead_scores[layer]``
    [N, K + 2]: the lookahead candidates (best first) and their router logits (absent
    when the model has no lookahead chain). ``token_ids`` [N]; ``seq_offsets`` [S + 1]:
    sequence s is tokens ``seq_offsets[s]:seq_offsets[s + 1]`` (one batch row);
    ``batch_offsets`` [B + 1]: the same for forward passes.
    """

    layers: list[int]
    num_experts: dict[int, int]
    top_k: dict[int, int]
    ids: dict[int, torch.Tensor]
    weights: dict[int, torch.Tensor]
    token_ids: torch.Tensor
    seq_offsets: torch.Tensor
    batch_offsets: torch.Tensor
    lookahead_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    lookahead_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.seq_offsets.numel()) - 1

    def sequences(self) -> list[tuple[int, int]]:
        o = self.seq_offsets.tolist()
        return [(o[i], o[i + 1]) for i in range(len(o) - 1)]

    def select_sequences(self, indices) -> "RoutingTrace":
        """A trace of the chosen sequences only (in the given order), one batch per sequence."""
        spans = self.sequences()
        idx = torch.cat([torch.arange(*spans[i]) for i in indices]) if len(indices) else torch.zeros(0, dtype=torch.long)
        lengths = [spans[i][1] - spans[i][0] for i in indices]
        offs = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        return RoutingTrace(
            layers=list(self.layers), num_experts=dict(self.num_experts), top_k=dict(self.top_k),
            ids={l: t[idx] for l, t in self.ids.items()}, weights={l: t[idx] for l, t in self.weights.items()},
            token_ids=self.token_ids[idx], seq_offsets=offs, batch_offsets=offs.clone(),
            lookahead_ids={l: t[idx] for l, t in self.lookahead_ids.items()},
            lookahead_scores={l: t[idx] for l, t in self.lookahead_scores.items()},
            fingerprint=self.fingerprint, meta=dict(self.meta),
        )

    def check_model(self, model) -> None:
        """Raise ``ValueError`` unless ``model`` has the fingerprint this trace was recorded with."""
        require_fingerprint(model, self.fingerprint, "this routing trace was recorded on",
                            "record a new trace for this model")

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {"token_ids": self.token_ids.to(torch.int64).contiguous(),
                   "seq_offsets": self.seq_offsets.to(torch.int64).contiguous(),
                   "batch_offsets": self.batch_offsets.to(torch.int64).contiguous()}
        for l in self.layers:
            small = torch.int16 if self.num_experts[l] < 2 ** 15 else torch.int64
            tensors[f"ids.{l}"] = self.ids[l].to(small).contiguous()
            tensors[f"weights.{l}"] = self.weights[l].to(torch.float32).contiguous()
            if l in self.lookahead_ids:
                tensors[f"lookahead_ids.{l}"] = self.lookahead_ids[l].to(small).contiguous()
                tensors[f"lookahead_scores.{l}"] = self.lookahead_scores[l].to(torch.float32).contiguous()
        info = {"format": FORMAT, "layers": self.layers,
                "num_experts": {str(k): v for k, v in self.num_experts.items()},
                "top_k": {str(k): v for k, v in self.top_k.items()}, "meta": self.meta}
        save_file(tensors, path, metadata={"expertflow": json.dumps(info), "fingerprint": self.fingerprint})

    @classmethod
    def load(cls, path: str, model=None) -> "RoutingTrace":
        """Read a trace; with ``model``, refuse (``ValueError``) a trace recorded on another model."""
        from .files import open_safetensors

        with open_safetensors(path, "routing trace") as f:
            md = f.metadata() or {}
            if "expertflow" not in md:
                raise ValueError(f"{path!r} is not an expertflow routing trace (no expertflow metadata)")
            try:
                info = json.loads(md["expertflow"])
            except ValueError:
                info = None
            if not isinstance(info, dict) or info.get("format") != FORMAT:
                fmt = info.get("format") if isinstance(info, dict) else None
                raise ValueError(f"{path!r} is not an expertflow routing trace (format {fmt!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        try:
            layers = [int(l) for l in info["layers"]]
            trace = cls(
                layers=layers,
                num_experts={int(k): int(v) for k, v in info["num_experts"].items()},
                top_k={int(k): int(v) for k, v in info["top_k"].items()},
                ids={l: t[f"ids.{l}"].to(torch.int64) for l in layers},
                weights={l: t[f"weights.{l}"] for l in layers},
                token_ids=t["token_ids"], seq_offsets=t["seq_offsets"], batch_offsets=t["batch_offsets"],
                lookahead_ids={l: t[f"lookahead_ids.{l}"].to(torch.int64) for l in layers
                               if f"lookahead_ids.{l}" in t},
                lookahead_scores={l: t[f"lookahead_scores.{l}"] for l in layers if f"lookahead_scores.{l}" in t},
                fingerprint=md.get("fingerprint", ""), meta=dict(info.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"the routing trace {path!r} is incomplete or malformed ({type(exc).__name__}: {exc})") \
                from None
        if model is not None:
            trace.check_model(model)
        return trace


class _Collector:
    """The engine recorder: appends each call's tensors per (kind, layer)."""

    def __init__(self):
        self.route: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.lookahead: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.top_k: dict[int, int] = {}

    def __call__(self, kind: str, layer: int, *tensors):
        if kind == "route":
            ids, w = tensors
            self.route.setdefault(layer, []).append((ids.detach().to("cpu", torch.int64).clone(),
                                                     w.detach().to("cpu", torch.float32).clone()))
            self.top_k[layer] = int(ids.shape[-1])
        elif kind == "lookahead":
            (logits,) = tensors
            logits = logits.detach().to("cpu", torch.float32)
            self.lookahead.setdefault(layer, []).append(logits)


def record_routing(model, batches, *, progress: bool = True) -> RoutingTrace:
    """Run ``model`` teacher-forced over ``batches`` (token-id tensors [B, S]) and record
    the routing of every token (see the module docstring).

    ``model`` may already be compiled with ``backend="expertflow"`` (its engine is reused,
    e.g. with a budget: slower, same routing); otherwise a compiled copy
    (``torch.compile(model, backend="expertflow")``, every expert resident) is used and the
    model itself is left as it was.
    """
    from tqdm import tqdm

    from .registry import engines_for_module

    module = _module(model)
    batches = [torch.as_tensor(b) for b in batches]
    for b in batches:
        if b.dim() != 2:
            raise ValueError(f"record_routing: each batch must be a [B, S] tensor of token ids, got shape {tuple(b.shape)}")
    runner = model if engines_for_module(module) else torch.compile(module, backend="expertflow")
    collector = _Collector()
    shimmed: list = []
    token_ids, seq_lengths, batch_lengths = [], [], []
    device = next(module.parameters()).device

    def arm():
        for eng in engines_for_module(module):
            if eng.recorder is not collector:
                eng.recorder = collector
                shimmed.append(eng)

    try:
        with torch.no_grad():
            if not engines_for_module(module) and batches:
                runner(input_ids=batches[0].to(device), use_cache=False)   # compile (same shape as the batches)
            arm()
            if not shimmed:
                raise ValueError("record_routing: the expertflow backend found no MoE layer in this model")
            for b in tqdm(batches, desc="recording routing", unit="batch", disable=not progress):
                before = {l: len(v) for l, v in collector.route.items()}
                runner(input_ids=b.to(device), use_cache=False)
                arm()      # a recompile (new shape) may have made a new engine
                n = b.numel()
                for l, v in collector.route.items():
                    got = sum(x[0].shape[0] for x in v[before.get(l, 0):])
                    if got != n:
                        raise RuntimeError(f"record_routing: layer {l} recorded {got} tokens for a batch of {n}")
                token_ids.append(b.reshape(-1).cpu())
                seq_lengths.extend([b.shape[1]] * b.shape[0])
                batch_lengths.append(n)
    finally:
        for eng in shimmed:
            eng.recorder = None

    layers = sorted(collector.route)
    engine = shimmed[-1]
    num_experts = {l: int(engine.layers[l].num_experts) if l in engine.layers else
                   int(max(int(x[0].max()) for x in collector.route[l]) + 1) for l in layers}
    ids = {l: torch.cat([x[0] for x in collector.route[l]]) for l in layers}
    weights = {l: torch.cat([x[1] for x in collector.route[l]]) for l in layers}
    la_ids, la_scores = {}, {}
    for l in layers:
        chunks = collector.lookahead.get(l, [])
        if chunks and sum(c.shape[0] for c in chunks) == ids[l].shape[0]:
            logits = torch.cat(chunks)
            c = min(collector.top_k[l] + LOOKAHEAD_EXTRA, logits.shape[-1])
            top = logits.topk(c, dim=-1)
            la_ids[l], la_scores[l] = top.indices, top.values
    seq_offsets = torch.tensor([0] + seq_lengths, dtype=torch.int64).cumsum(0)
    batch_offsets = torch.tensor([0] + batch_lengths, dtype=torch.int64).cumsum(0)
    return RoutingTrace(
        layers=layers, num_experts=num_experts, top_k=dict(collector.top_k), ids=ids, weights=weights,
        token_ids=torch.cat(token_ids) if token_ids else torch.zeros(0, dtype=torch.int64),
        seq_offsets=seq_offsets, batch_offsets=batch_offsets, lookahead_ids=la_ids, lookahead_scores=la_scores,
        fingerprint=fingerprint(module),
        meta={"model_type": getattr(getattr(module, "config", None), "model_type", None),
              "router_digest": router_digest([p for _, p in router_weights(module)])},
    )
