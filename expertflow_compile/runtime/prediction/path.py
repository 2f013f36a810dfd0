"""ExpertFlow's routing-path predictor: trained on recorded routing, predicts all layers.

:class:`PathPredictor`: a small MLP on the current token's embedding (the ``hidden`` the
first MoE layer's predict op receives) plus a causal context (the mean of the previous
``context`` embeddings of the sequence), with one multi-label head per MoE layer trained
with BCE on a recorded :class:`~expertflow_compile.runtime.trace.RoutingTrace`
(:func:`train_path_predictor`). At the first MoE layer it predicts every MoE layer's
experts at once (top ``k + extra`` per token) and keeps them; each MoE layer's predict op
then hands out the kept predictions for the layers ``l .. l + depth - 1`` (the op's output
has room for that many layers; issuing per layer also retries prefetches the cache had no
free slot for). The network only runs once per forward pass.

Predictor files are safetensors with the target model's fingerprint and router digest;
loading one for another model raises ``ValueError``, and a file whose metadata and tensor
sizes disagree (or do not fit the compiled model) is refused before anything is allocated.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ...layer import unwrap_compiled
from ..files import open_safetensors
from ..trace import RoutingTrace, require_fingerprint, router_digest, router_weights
from .common import ModelView, Ranked, ranked_votes

__all__ = ["PathPredictor", "train_path_predictor", "path_features", "prediction_metrics", "view_router_digest"]

FORMAT = "expertflow-path-predictor/1"
_MAX_DIM = 1 << 24


def view_router_digest(view: ModelView) -> str | None:
    """:func:`~expertflow_compile.runtime.trace.router_digest` of the compiled model's router
    weights (each layer's lookahead chain's one [num_experts, hidden] parameter), or None
    when a layer has no such chain."""
    mats = []
    for layer in view.order:
        router = view.routers.get(layer)
        if router is None:
            return None
        cand = [p for p in router[1] if isinstance(p, torch.Tensor) and p.dim() == 2
                and p.shape[0] == view.num_experts[layer]]
        if len(cand) != 1:
            return None
        mats.append(cand[0])
    return router_digest(mats) if mats else None


def _check_layers(view: ModelView, layers, num_experts: int, what: str, where: str) -> None:
    have = {l: view.num_experts[l] for l in view.order}
    if have and (sorted(have) != sorted(layers) or set(have.values()) != {num_experts}):
        raise ValueError(f"{what} MoE layers {list(layers)} with {num_experts} experts each {where}, but the "
                         f"compiled model has layers {have}")


def _checked_dims(info: dict, path) -> dict:
    """The sizes a predictor file declares, each checked to be a sane int."""
    def num(name, low=0):
        v = info.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= _MAX_DIM:
            raise ValueError(f"the path predictor {path!r} declares {name}={v!r}; expected an int in "
                             f"[{low}, {_MAX_DIM}]")
        return v
    layers = info.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(l, int) and not isinstance(l, bool)
                                                           for l in layers):
        raise ValueError(f"the path predictor {path!r} declares layers={layers!r}; expected a list of ints")
    return {"layers": layers, "num_experts": num("num_experts", 1), "top_k": num("top_k", 1),
            "context": num("context"), "hidden_size": num("hidden_size", 1), "extra": num("extra") if "extra" in info
            else 1, "in_dim": num("in_dim", 1), "width": num("width", 1)}


def prediction_metrics(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """Per-token (precision, recall) of candidate lists ``pred`` [N, c] against ``true`` [N, K]."""
    if pred.shape[0] == 0:
        return 0.0, 0.0
    tp = (pred.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).sum().item()
    return tp / pred.numel(), tp / true.numel()


def path_features(emb: torch.Tensor, seq_offsets, context: int) -> torch.Tensor:
    """Features of each token: its embedding and (``context`` > 0) the mean of the previous
    ``context`` embeddings of its sequence (zeros for a sequence's first token).

    ``emb`` [N, H]; ``seq_offsets`` [S + 1] splits the N tokens into sequences."""
    emb = emb.float()
    if context <= 0:
        return emb
    out = torch.zeros_like(emb)
    offs = [int(o) for o in seq_offsets]
    for a, b in zip(offs[:-1], offs[1:]):
        x = emb[a:b]
        c = torch.cat([torch.zeros(1, x.shape[1]), x.cumsum(0)])        # c[i] = sum x[:i]
        i = torch.arange(x.shape[0])
        lo = (i - context).clamp(min=0)
        n = (i - lo).clamp(min=1).unsqueeze(1).float()
        out[a:b] = (c[i] - c[lo]) / n
    return torch.cat([emb, out], dim=1)



# ----------------------------------------------------------------------------- the net


class _PathNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_layers: int, num_experts: int):
        super().__init__()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.body = nn.Sequential(nn.LayerNorm(in_dim, elementwise_affine=False), nn.Linear(in_dim, hidden),
                                  nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.heads = nn.Linear(hidden, num_layers * num_experts)   # one multi-label head per MoE layer

    @staticmethod
    def param_shapes(in_dim: int, width: int, num_layers: int, num_experts: int) -> dict[str, tuple[int, ...]]:
        """The state-dict shapes of a net of these sizes (nothing allocated)."""
        return {"body.1.weight": (width, in_dim), "body.1.bias": (width,), "body.3.weight": (width, width),
                "body.3.bias": (width,), "heads.weight": (num_layers * num_experts, width),
                "heads.bias": (num_layers * num_experts,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.body(x)).view(*x.shape[:-1], self.num_layers, self.num_experts)


class PathPredictor:
    """ExpertFlow's routing-path predictor (see the module docstring).

    ``scores(features)`` -> logits [N, L, E] for the MoE layers ``layers`` (in order).
    """

    def __init__(self, net: _PathNet, *, layers, num_experts: int, top_k: int, context: int, hidden_size: int,
                 fingerprint: str, router_digest: str, metrics: dict | None = None, extra: int = 1):
        self.net = net.eval()
        self.layers = [int(l) for l in layers]
        self.num_experts, self.top_k, self.context = int(num_experts), int(top_k), int(context)
        self.hidden_size = int(hidden_size)
        self.fingerprint, self.router_digest = fingerprint, router_digest
        self.metrics = metrics or {}
        self.extra = int(extra)
        self._history: torch.Tensor | None = None    # [B, <=context, H]: previous embeddings per row
        self._pending: dict[int, torch.Tensor] = {}  # layer -> candidate ids [T, c] of this forward pass

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())

    @torch.no_grad()
    def candidates(self, features: torch.Tensor, extra: int | None = None) -> torch.Tensor:
        """Top ``k + extra`` experts per token and layer: [N, L, c]."""
        c = min(self.top_k + (self.extra if extra is None else extra), self.num_experts)
        return self.scores(features).topk(c, dim=-1).indices

    def _live_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Features of the tokens in ``hidden`` [B, S, H] (or [T, H]), keeping each row's
        last ``context`` embeddings between calls (a call with S > 1 starts new sequences)."""
        h = hidden.detach().float().cpu()
        if h.dim() == 2:
            h = h.unsqueeze(0)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        b, s, _ = h.shape
        if self.context <= 0:
            return h.reshape(b * s, -1)
        hist = self._history
        if s > 1 or hist is None or hist.shape[0] != b:
            hist = h.new_zeros(b, 0, h.shape[-1])
        full = torch.cat([hist, h], dim=1)                  # [B, P + S, H]
        p = hist.shape[1]
        c = torch.cat([full.new_zeros(b, 1, full.shape[-1]), full.cumsum(1)], dim=1)
        i = torch.arange(p, p + s)
        lo = (i - self.context).clamp(min=0)
        n = (i - lo).clamp(min=1).view(1, -1, 1).float()
        ctx = (c[:, i] - c[:, lo]) / n
        self._history = full[:, -self.context:].clone()
        return torch.cat([h, ctx], dim=-1).reshape(b * s, -1)

    def predict(self, view: ModelView, layer: int, hidden: torch.Tensor) -> list[Ranked]:
        if layer == view.first:
            feats = self._live_features(hidden)
            cand = self.candidates(feats, view.extra)            # [T, L, c]
            self._pending = {l: cand[:, i] for i, l in enumerate(self.layers)}
        out: list[Ranked] = []
        for target in view.window(layer):
            top = self._pending.get(target)
            if top is None:
                continue
            experts, votes = ranked_votes(top, view.num_experts[target])
            out.append(Ranked(target, experts, votes))
        return out

    def check_view(self, view: ModelView) -> None:
        """Refuse (``ValueError``) a compiled model whose MoE layers or routers differ from
        the model this predictor was trained for."""
        _check_layers(view, self.layers, self.num_experts, f"this path predictor was trained for",
                      f"(model fingerprint {self.fingerprint[:16]}...)")
        digest = view_router_digest(view)
        if digest is not None and self.router_digest and digest != self.router_digest:
            raise ValueError(f"this path predictor was trained for a model with router digest {self.router_digest[:16]}... "
                             f"(fingerprint {self.fingerprint[:16]}...), but the compiled model's routers have digest "
                             f"{digest[:16]}...: train a predictor for this model")

    def check_model(self, model) -> None:
        require_fingerprint(model, self.fingerprint, "this path predictor was trained for",
                            "train a predictor for this model")

    # ---------------------------------------------------------------- files
    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        net = self.net
        info = {"format": FORMAT, "layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "context": self.context, "hidden_size": self.hidden_size, "extra": self.extra,
                "in_dim": net.body[1].in_features, "width": net.body[1].out_features, "metrics": self.metrics,
                "router_digest": self.router_digest}
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(state, path, metadata={"expertflow": json.dumps(info), "fingerprint": self.fingerprint})

    @classmethod
    def load(cls, path: str, model=None, view: ModelView | None = None) -> "PathPredictor":
        """Read a predictor file; with ``model`` / ``view``, refuse (``ValueError``) one made for
        another model. Sizes are checked (metadata against the file's tensor shapes, and
        against ``view``) before anything is allocated."""
        with open_safetensors(path, "path-predictor file") as f:
            md = f.metadata() or {}
            try:
                info = json.loads(md.get("expertflow", "{}"))
            except ValueError:
                info = None
            if not isinstance(info, dict) or info.get("format") != FORMAT:
                raise ValueError(f"{path!r} is not an expertflow path-predictor file")
            dims = _checked_dims(info, path)
            if view is not None:
                _check_layers(view, dims["layers"], dims["num_experts"], f"the path predictor {path!r} was trained for",
                              f"(model fingerprint {md.get('fingerprint', '')[:16]}...)")
            want = _PathNet.param_shapes(dims["in_dim"], dims["width"], len(dims["layers"]), dims["num_experts"])
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if got != want:
                raise ValueError(f"the path predictor {path!r} is inconsistent: its tensors {got} do not match the "
                                 f"sizes its metadata declares {want}")
            state = {k: f.get_tensor(k) for k in f.keys()}
        with torch.device("meta"):
            net = _PathNet(dims["in_dim"], dims["width"], len(dims["layers"]), dims["num_experts"])
        net.load_state_dict(state, assign=True)
        pred = cls(net, layers=dims["layers"], num_experts=dims["num_experts"], top_k=dims["top_k"],
                   context=dims["context"], hidden_size=dims["hidden_size"], fingerprint=md.get("fingerprint", ""),
                   router_digest=str(info.get("router_digest", "")), metrics=info.get("metrics"),
                   extra=dims["extra"])
        if model is not None:
            pred.check_model(model)
        if view is not None:
            pred.check_view(view)
        return pred


def _embeddings(model, token_ids: torch.Tensor) -> torch.Tensor:
    mod = unwrap_compiled(model)
    emb = mod.get_input_embeddings()
    with torch.no_grad():
        out = []
        for chunk in token_ids.split(65536):
            out.append(emb(chunk.to(emb.weight.device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, emb.weight.shape[1])


def train_path_predictor(trace: RoutingTrace, model, epochs: int = 8, *, context: int = 4, width: int = 256,
                         lr: float = 3e-3, batch_size: int = 512, val_fraction: float = 0.1, extra: int = 1,
                         seed: int = 0, progress: bool = True, max_steps: int | None = None,
                         log=print) -> PathPredictor:
    """Train a :class:`PathPredictor` for ``model`` on ``trace`` (recorded on ``model``).

    The last ``val_fraction`` of the trace's sequences are held out for validation; the
    per-layer precision and recall of the top ``k + extra`` candidates on them are stored
    in ``predictor.metrics`` (and printed through ``log`` when given).
    """
    from tqdm import tqdm

    trace.check_model(model)
    layers = list(trace.layers)
    num_experts = {trace.num_experts[l] for l in layers}
    if len(num_experts) != 1:
        raise ValueError("train_path_predictor: every MoE layer must have the same number of experts")
    num_experts = num_experts.pop()
    top_k = max(trace.top_k[l] for l in layers)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    n_seq = trace.num_sequences
    n_val = int(round(n_seq * val_fraction)) if n_seq > 1 else 0
    n_val = min(max(n_val, 1 if n_seq > 1 and val_fraction > 0 else 0), n_seq - 1) if n_seq > 1 else 0
    train_tr = trace.select_sequences(list(range(n_seq - n_val)))
    val_tr = trace.select_sequences(list(range(n_seq - n_val, n_seq))) if n_val else None

    def data(tr):
        x = path_features(_embeddings(model, tr.token_ids), tr.seq_offsets, context)
        y = torch.zeros(tr.num_tokens, len(layers), num_experts)
        for i, l in enumerate(layers):
            y[:, i].scatter_(1, tr.ids[l], 1.0)
        return x, y

    x, y = data(train_tr)
    hidden_size = _embeddings(model, trace.token_ids[:1]).shape[-1]
    net = _PathNet(x.shape[1], width, len(layers), num_experts)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / batch_size))
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / max(total, 1))))
    loss_fn = nn.BCEWithLogitsLoss()
    step = 0
    net.train()
    bar = tqdm(total=total, desc="training path predictor", unit="step", disable=not progress)
    for _epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for j in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[j * batch_size:(j + 1) * batch_size]
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    net.eval()
    pred = PathPredictor(net, layers=layers, num_experts=num_experts, top_k=top_k, context=context,
                         hidden_size=hidden_size, fingerprint=trace.fingerprint,
                         router_digest=router_digest([p for _, p in router_weights(model)]), extra=extra)
    # without a validation split (a one-sequence trace) the training figures are still known
    pred.metrics = {"validation_tokens": 0, "train_tokens": train_tr.num_tokens,
                    "candidates": min(top_k + extra, num_experts), "steps": step, "per_layer": {}}
    if val_tr is not None:
        xv, _ = data(val_tr)
        cand = pred.candidates(xv, extra)
        per_layer = {}
        for i, l in enumerate(layers):
            p, r = prediction_metrics(cand[:, i], val_tr.ids[l])
            per_layer[str(l)] = {"precision": p, "recall": r}
        pred.metrics = {"validation_tokens": val_tr.num_tokens, "train_tokens": train_tr.num_tokens,
                        "candidates": min(top_k + extra, num_experts), "steps": step, "per_layer": per_layer}
        if log is not None:
            log(f"validation ({val_tr.num_tokens} tokens, top-{min(top_k + extra, num_experts)} candidates per layer):")
            for l, m in per_layer.items():
                log(f"  layer {l}: precision {m['precision']:.3f}  recall {m['recall']:.3f}")
    return pred


