"""``expertflow simulate``: project decode speed and memory of real model sizes.

A PROJECTION, not a measurement. It replays recorded routing through the same
``ExpertCache`` policy code the runtime uses (``tools/replay.py``, through the cache's
public interface; a tqdm bar shows the replays) and prices each
MoE layer call with a simple cost model for a hardware profile:

* decode at small batch is memory-bound: a layer's compute time is the bytes it reads
  (attention/dense weights + its active experts) over the device memory bandwidth,
  plus a fixed per-layer overhead (kernel launches);
* expert loads cross the host-device link at ``link_GBps``; a prefetch for layer L is
  issued when L's attention starts (the lookahead position) and overlaps it; what does
  not arrive in time, and every demand load, stalls the layer;
* device memory = dense weights + the expert budget (KV cache not counted).

Routing: a shipped model's recorded routing (real, trained), mapped onto the target
shape - the fine-grained tiny_qwen2_moe (60 experts, top-4) for fine-grained targets
(:func:`trace_model_for`: 32 or more experts, e.g. Qwen3-30B-A3B, DeepSeek-V3), the tiny
Mixtral (8, top-2) otherwise: target layer j replays trace layer ``j mod L_trace``; with
``m = E_target // E_trace``, trace expert e becomes the block [e*m, (e+1)*m) (the last
``E_target - m * E_trace`` experts stay unused) and each of its picks expands to
k_target/k_trace distinct experts of that block chosen by a hash of (token id, layer,
rank): per-layer popularity and token-identity correlation of a trained router are
kept, the target's own routing is not known. Lookahead candidates map the same way.

Figures (definitions: :mod:`~expertflow_compile.runtime.stats`): resident rate, ready
rate, loads per token and loads / MIN (Belady's MIN on the same mapped calls and slots)
for every run, a ``next-call (ceiling)`` row (the predictive policy told each layer's true
next call as the call ends, no prefetch: what a perfect next-token routing predictor could
give the replacement; ``tools/replay.py``) and a ``MIN (bound)`` row pricing MIN's loads as
demand loads. Where the link is the bottleneck, tokens/s follow loads: the ceiling row says
how far better replacement can go without knowing routing beyond the next token, and
:func:`overlap_bound` how many loads a prefetch of any depth could hide behind compute.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

__all__ = ["HardwareProfile", "ModelShape", "PROFILES", "SHAPES", "shape_from_config", "map_trace", "simulate",
           "trace_model_for", "assumptions", "overlap_bound", "prefetch_width"]

FINE_GRAINED = 32          # targets with at least this many experts replay the fine-grained shipped model


def trace_model_for(shape: "ModelShape") -> str:
    """The shipped model whose routing a projection for ``shape`` replays."""
    return "tiny_qwen2_moe" if shape.num_experts >= FINE_GRAINED else "tiny_mixtral"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_GBps: float         # host (RAM or disk) -> device, effective
    mem_GBps: float          # device memory bandwidth
    device_GiB: float
    layer_overhead_us: float = 20.0
    note: str = ""


PROFILES = {p.name: p for p in [
    HardwareProfile("rtx4090-pcie4", 25.0, 1008.0, 24.0, note="PCIe 4.0 x16 ~25 GB/s effective, GDDR6X 1008 GB/s"),
    HardwareProfile("a100-pcie4", 25.0, 1935.0, 80.0, note="A100 80GB PCIe, HBM2e 1935 GB/s"),
    HardwareProfile("h200-pcie5", 50.0, 4800.0, 141.0, note="H200, PCIe 5.0 x16 ~50 GB/s effective, HBM3e 4.8 TB/s"),
    HardwareProfile("laptop-nvme", 3.5, 256.0, 8.0, layer_overhead_us=40.0,
                    note="laptop GPU 8 GB (256 GB/s); experts read from an NVMe SSD at ~3.5 GB/s"),
]}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    moe_intermediate: int
    num_layers: int          # MoE layers
    dense_layers: int        # leading dense layers (DeepSeek-V3: 3)
    dense_intermediate: int
    num_experts: int
    top_k: int
    attn_params_per_layer: int
    shared_intermediate: int = 0
    vocab: int = 32000
    bytes_per_param: int = 2  # bf16

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.moe_intermediate * self.bytes_per_param

    @property
    def all_expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @property
    def dense_bytes(self) -> int:
        per = self.attn_params_per_layer + 3 * self.hidden * self.shared_intermediate
        layers = (self.num_layers + self.dense_layers) * per
        dense_mlp = self.dense_layers * 3 * self.hidden * self.dense_intermediate
        return (layers + dense_mlp + 2 * self.vocab * self.hidden) * self.bytes_per_param

    def layer_dense_bytes(self) -> int:
        return (self.attn_params_per_layer + 3 * self.hidden * self.shared_intermediate) * self.bytes_per_param


def _gqa(h, heads, kv, hd):
    return h * heads * hd + 2 * h * kv * hd + heads * hd * h


SHAPES = {s.name: s for s in [
    ModelShape("mixtral-8x7b", 4096, 14336, 32, 0, 0, 8, 2, _gqa(4096, 32, 8, 128)),
    ModelShape("qwen3-30b-a3b", 2048, 768, 48, 0, 0, 128, 8, _gqa(2048, 32, 4, 128), vocab=151936),
    # MLA: q_a (H x 1536), q_b (1536 x 128*192), kv_a (H x 576), kv_b (512 x 128*256), o (128*128 x H)
    ModelShape("deepseek-v3", 7168, 2048, 58, 3, 18432, 256, 8,
               7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
               shared_intermediate=2048, vocab=129280),
]}


def shape_from_config(path: str) -> ModelShape:
    """A ModelShape from an HF ``config.json`` (GQA attention; MoE fields by their usual names)."""
    with open(path) as f:
        c = json.load(f)
    h = c["hidden_size"]
    E = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    if not E:
        raise ValueError(f"{path}: not a Mixture-of-Experts config (no num_local_experts / num_experts / "
                         "n_routed_experts)")
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    hd = c.get("head_dim") or h // heads
    dense = c.get("first_k_dense_replace", 0) or 0
    return ModelShape(
        name=c.get("_name_or_path") or c.get("model_type", "model"), hidden=h,
        moe_intermediate=c.get("moe_intermediate_size") or c["intermediate_size"],
        num_layers=c["num_hidden_layers"] - dense, dense_layers=dense,
        dense_intermediate=c.get("intermediate_size", 0), num_experts=E, top_k=c["num_experts_per_tok"],
        attn_params_per_layer=_gqa(h, heads, kv, hd),
        shared_intermediate=(c.get("shared_expert_intermediate_size") or
                             (c.get("n_shared_experts") or 0) * (c.get("moe_intermediate_size") or 0)),
        vocab=c.get("vocab_size", 32000))


def _pick(token: int, layer: int, rank: int, j: int, m: int) -> int:
    h = hashlib.blake2b(f"{token}:{layer}:{rank}:{j}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % m


def _expand(ids: torch.Tensor, tokens: torch.Tensor, layer: int, m: int, per: int) -> torch.Tensor:
    """[N, k] trace experts -> [N, k*per] target experts (distinct within a block)."""
    n, k = ids.shape
    out = torch.empty(n, k * per, dtype=torch.int64)
    for i in range(n):
        t = int(tokens[i])
        col = 0
        for r in range(k):
            base = int(ids[i, r]) * m
            chosen: list[int] = []
            j = 0
            while len(chosen) < min(per, m):
                c = _pick(t, layer, r, j, m)
                if c not in chosen:
                    chosen.append(c)
                j += 1
            for c in chosen:
                out[i, col] = base + c
                col += 1
    return out[:, :col]


def map_trace(trace, shape: ModelShape):
    """The trace mapped onto ``shape`` (see the module docstring)."""
    from ..runtime.trace import RoutingTrace

    src_layers = list(trace.layers)
    e_src = trace.num_experts[src_layers[0]]
    k_src = trace.top_k[src_layers[0]]
    m, per = shape.num_experts // max(e_src, 1), shape.top_k // k_src
    if shape.top_k % k_src or shape.num_experts < e_src or per > m:
        raise ValueError(f"cannot map a trace of {e_src} experts / top-{k_src} onto {shape.num_experts} experts / "
                         f"top-{shape.top_k} (needs top-k a multiple of {k_src} and at least {e_src} experts, "
                         f"{shape.top_k // k_src} per trace expert)")
    ids, la = {}, {}
    for j in range(shape.num_layers):
        src = src_layers[j % len(src_layers)]
        ids[j] = _expand(trace.ids[src], trace.token_ids, j, m, per) if (m, per) != (1, 1) else trace.ids[src]
        if trace.lookahead_ids:
            cand = trace.lookahead_ids[src][:, :k_src + 1]
            la[j] = _expand(cand, trace.token_ids, j, m, per) if (m, per) != (1, 1) else cand
    return RoutingTrace(
        layers=list(range(shape.num_layers)), num_experts=dict.fromkeys(range(shape.num_layers), shape.num_experts),
        top_k=dict.fromkeys(range(shape.num_layers), shape.top_k), ids=ids,
        weights={j: torch.zeros(v.shape) for j, v in ids.items()}, token_ids=trace.token_ids,
        seq_offsets=trace.seq_offsets, batch_offsets=trace.batch_offsets, lookahead_ids=la,
        lookahead_scores={j: torch.zeros(v.shape) for j, v in la.items()}, fingerprint=trace.fingerprint,
        meta={"mapped_to": shape.name})


def simulate(trace, shape: ModelShape, profile: HardwareProfile, budgets: list[float],
             predictors=("none", "predictive", "lookahead", "next-call"), batch: int = 1, max_tokens: int | None = 256,
             progress: bool = True, min_confidence: float = 0.0, min_precision: float | None = 0.95) -> list[dict]:
    """Projected tokens/s and memory per (budget, predictor) for ``shape`` on ``profile``
    (a tqdm bar over the cache replays unless ``progress=False``)."""
    from tqdm import tqdm

    from .replay import belady_min, call_predictions, candidate_sets, layer_calls, rank_precision, replay

    mapped = map_trace(trace, shape)
    calls = layer_calls(mapped, batch=batch, max_tokens=max_tokens)
    tokens = len({t for c in calls for t in c.tokens})
    eb = shape.expert_bytes
    bw_mem, bw_link = profile.mem_GBps * 1e9, profile.link_GBps * 1e9
    attn_s = shape.layer_dense_bytes() / bw_mem + profile.layer_overhead_us * 1e-6

    def experts_s(call) -> float:
        return len(call.active) * eb / bw_mem

    resident_s = sum(attn_s + experts_s(c) for c in calls)
    dense_extra_s = len({c.step for c in calls}) * shape.dense_layers * (
        (shape.layer_dense_bytes() + 3 * shape.hidden * shape.dense_intermediate * shape.bytes_per_param) / bw_mem)
    rows = [{"budget": "100%", "predictor": "all resident", "tokens_per_s": tokens / (resident_s + dense_extra_s),
             "device_GiB": (shape.dense_bytes + shape.all_expert_bytes) / 2**30, "ready_rate": 1.0,
             "resident_rate": 1.0, "loads_per_token": 0.0, "loads_over_min": None, "stall_share": 0.0,
             "fits": (shape.dense_bytes + shape.all_expert_bytes) / 2**30 <= profile.device_GiB}]
    total_experts = shape.num_layers * shape.num_experts
    bar = tqdm(total=len(budgets) * (len(predictors) + 1), desc=f"simulating {shape.name}", unit="replay",
               disable=not progress)
    preds_of: dict = {}
    for share in budgets:
        slots = max(shape.top_k, int(math.floor(share * total_experts)))
        for pred in list(predictors) + ["min"]:
            bar.set_postfix_str(f"{100 * share:g}% {pred}")
            per_call: list = []
            if pred == "min":              # the bound: MIN's loads, every one a demand load
                res = belady_min(calls, slots)
                per_call = _min_per_call(calls, slots)
            elif pred == "none":
                res = replay(mapped, calls, slots, "lru", "none", per_call=per_call)
            elif pred == "predictive":    # the predictive policy's own estimates, no prefetch
                res = replay(mapped, calls, slots, "predictive", "none", per_call=per_call)
            elif pred == "next-call":     # the ceiling of next-token prediction (no prefetch)
                res = replay(mapped, calls, slots, "predictive", "next-call", per_call=per_call)
            else:
                if pred not in preds_of:   # the same predictions at every budget
                    cands = candidate_sets(mapped, pred, extra=per_extra(shape))
                    preds_of[pred] = call_predictions(mapped, calls, cands, "layer",
                                                      precision=rank_precision(mapped, cands))
                res = replay(mapped, calls, slots, "predictive", pred, predictions=preds_of[pred], per_call=per_call,
                             min_confidence=min_confidence, max_prefetch=prefetch_width(shape, profile),
                             min_precision=min_precision, enter_first=min_precision is not None)
            t = stall = 0.0
            for c, (pf, dm) in zip(calls, per_call):
                pf_s, dm_s = pf * eb / bw_link, dm * eb / bw_link
                wait = max(0.0, pf_s - attn_s) + dm_s      # prefetch overlaps the attention; demand stalls
                t += attn_s + wait + experts_s(c)
                stall += wait
            t += dense_extra_s
            mem = (shape.dense_bytes + slots * eb) / 2**30
            name = {"none": "lru", "min": "MIN (bound)", "predictive": "predictive",
                    "next-call": "next-call (ceiling)"}.get(pred, f"predictive+{pred}")
            rows.append({"budget": f"{100 * share:g}%", "predictor": name,
                         "tokens_per_s": tokens / t, "device_GiB": mem, "ready_rate": res.ready_rate,
                         "resident_rate": res.resident_rate, "loads_per_token": res.loads_per_token,
                         "min_loads_per_token": res.min_loads / tokens if tokens else 0.0,
                         "loads_over_min": res.loads_over_min, "stall_share": stall / t,
                         "fits": mem <= profile.device_GiB})
            bar.update(1)
    bar.close()
    return rows


def prefetch_width(shape: ModelShape, profile: HardwareProfile) -> int:
    """How many experts a layer call's prefetch may move: what the link transfers while the
    layer's attention runs (the overlap window of the cost model). A prefetch beyond it cannot
    land in time and only adds transfers to a link-bound run (0: predictions are hints only)."""
    attn_s = shape.layer_dense_bytes() / (profile.mem_GBps * 1e9) + profile.layer_overhead_us * 1e-6
    return int(attn_s * profile.link_GBps * 1e9 // shape.expert_bytes)


def overlap_bound(shape: ModelShape, profile: HardwareProfile, tokens: int = 1) -> float:
    """Experts the link can move while the device computes ``tokens`` tokens (the cost model's
    compute: every MoE layer's attention, overhead and top-k experts, and the leading dense
    layers, at memory bandwidth): the most loads per token that prefetching, at ANY depth,
    could take off the critical path. Where it is far below the loads per token, the link is
    the bottleneck and only fewer loads speed up decode."""
    bw_mem = profile.mem_GBps * 1e9
    attn_s = shape.layer_dense_bytes() / bw_mem + profile.layer_overhead_us * 1e-6
    dense_s = shape.dense_layers * (shape.layer_dense_bytes()
                                    + 3 * shape.hidden * shape.dense_intermediate * shape.bytes_per_param) / bw_mem
    per_token_s = shape.num_layers * (attn_s + shape.top_k * shape.expert_bytes / bw_mem) + dense_s
    return tokens * per_token_s * profile.link_GBps * 1e9 / shape.expert_bytes


def _min_per_call(calls, slots: int) -> list[tuple[int, int]]:
    """MIN's loads per layer call, as ``(0 prefetch, demand)`` pairs for the cost model."""
    from ..runtime.belady import min_loads

    per: list[int] = []
    min_loads([(c.layer, c.active) for c in calls], slots, per_call=per)
    return [(0, n) for n in per]


def per_extra(shape: ModelShape) -> int:
    """Lookahead candidates beyond top-k after mapping (the trace's k+1 expands by k_target/k_trace)."""
    return shape.top_k // 2


def assumptions(shape: ModelShape, profile: HardwareProfile, routing: str | None = None) -> list[str]:
    """What a projection assumes; ``routing``: the line saying which recorded routing it replays."""
    return [
        "PROJECTION from a cost model, not a measurement",
        f"hardware {profile.name}: link {profile.link_GBps} GB/s, device memory {profile.mem_GBps} GB/s, "
        f"{profile.device_GiB} GiB, {profile.layer_overhead_us} us per layer ({profile.note})",
        f"model {shape.name}: {shape.num_layers} MoE layers (+{shape.dense_layers} dense), {shape.num_experts} experts, "
        f"top-{shape.top_k}, expert {shape.expert_bytes / 2**20:.1f} MiB bf16, all experts "
        f"{shape.all_expert_bytes / 2**30:.1f} GiB, dense {shape.dense_bytes / 2**30:.1f} GiB",
        "decode is memory-bound: layer time = bytes read / memory bandwidth + overhead; KV cache not counted",
        "prefetch for layer L is issued at L's attention and overlaps it; late prefetch and demand loads stall",
        "prefetches follow the live engine's rule: every candidate hinted, loaded only at list positions whose "
        "measured precision is >= 0.95, never evicting an expert predicted to be needed no later (do no harm), "
        "wrong ones demoted at the router; MIN (bound) prices Belady's MIN loads",
        "a prediction for the layer about to run that waits for a slot the call frees (and the router confirms) is "
        "priced as a prefetch overlapping the attention",
        f"overlap bound: while the device computes one token the link moves {overlap_bound(shape, profile):.2f} "
        "experts, so a prefetch of any depth (a window of several layers or of the whole token) can hide at most "
        "that many loads per token; a window wider than the layer's own attention is not priced",
        "next-call (ceiling): the predictive policy told each layer's true next call as the call ends (perfect "
        "next-token routing), no prefetch; not a predictor, the most better replacement gets from one token ahead",
        f"prefetch width: at most {prefetch_width(shape, profile)} experts per layer call (what the link moves during "
        f"the attention: {shape.expert_bytes / (profile.link_GBps * 1e9) * 1e3:.2f} ms per expert vs "
        f"{(shape.layer_dense_bytes() / (profile.mem_GBps * 1e9) + profile.layer_overhead_us * 1e-6) * 1e3:.3f} ms "
        "of attention); 0: predictions only steer replacement, the router's experts are demand-loaded",
        routing or (f"routing: the shipped {trace_model_for(shape)}'s recorded routing mapped onto this shape (see "
                    "`expertflow_compile/tools/simulate.py`)"),
    ]
