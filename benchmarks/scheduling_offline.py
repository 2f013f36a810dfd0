"""Is there a grouping signal? Offline: record each held-out prompt's routing generated
alone, then replay batch forming on the recorded routing (no model in the loop).

Each prompt's greedy tokens do not depend on its batch (tested), so its per-step routing
does not either: the distinct experts a group of sequences touches at a decode step is
the union of their recorded experts. For pools of P consecutive batches (P x batch
sequences), per decode step and MoE layer, the mean distinct experts per group under:

* ``arrival``: batches in prompt order;
* ``prefill``: batches fixed before decode from prefill routing signatures
  (``schedule.form_batches``, the schedule ``generate_batched(schedule="routing")`` runs);
* ``decode (oracle, static)``: batches fixed from each prompt's whole decode routing;
  the best any fixed grouping could do with form_batches;
* ``regroup last`` / ``regroup token``: regrouped before every step by the signature
  ``regroup.generate_regrouped`` uses (its own ``_Signatures`` code);
* ``regroup exact (oracle)``: regrouped by each step's true routing with form_batches;
* ``best split (oracle, exhaustive)``, pools of 2 batches only: the best of every split of
  the pool into two groups for each step's true routing (the bound for ExpertFlow's pool).

Also: how well a prompt's prefill routing predicts its decode routing (histogram
intersection with its own decode routing vs another prompt's) and how well each signature
predicts a step's experts. JSON to benchmarks/results/scheduling_offline_<model>.json.

    python benchmarks/scheduling_offline.py --model tiny_qwen2_moe [--prompts 128 --new-tokens 33]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from expertflow_compile.assets import DEFAULT_MODEL, shipped_model_names, shipped_model_path  # noqa: E402


def record_alone(model, prompts, new_tokens: int) -> list[dict]:
    """Per prompt, generated alone: prefill ids [P], prefill routing [L, P, K], decode input
    tokens [T] and decode routing [T, L, K] (T = new_tokens - 1 decode forwards)."""
    from tqdm import tqdm

    from expertflow_compile.tools.schedule import _engine_of

    engine = _engine_of(model, prompts[0])
    layers = sorted(engine.layers)
    traces = []
    for p in tqdm(prompts, desc="recording routing, one prompt at a time"):
        log: list[tuple[int, torch.Tensor]] = []

        def record(kind, layer, ids, *rest, log=log):
            if kind == "route":
                log.append((layer, ids.clone()))

        engine.recorder = record
        try:
            out = model.generate(p[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        finally:
            engine.recorder = None
        per_forward = [log[i:i + len(layers)] for i in range(0, len(log), len(layers))]
        if len(per_forward) != new_tokens or any([l for l, _ in f] != layers for f in per_forward):
            raise RuntimeError(f"expected {new_tokens} forwards over MoE layers {layers}, recorded {len(log)} calls")
        traces.append({
            "prefill_ids": p, "prefill": torch.stack([ids for _, ids in per_forward[0]]),
            "tokens": out[0, p.numel():p.numel() + new_tokens - 1],
            "decode": torch.stack([torch.stack([ids[0] for _, ids in f]) for f in per_forward[1:]]),
        })
    return traces


def _hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., K] expert ids -> [..., E] 0/1."""
    return torch.zeros(*ids.shape[:-1], num_experts).scatter_(-1, ids.long(), 1.0)


def _share(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum(-1, keepdim=True).clamp(min=1e-9)


def _best_split(hot: torch.Tensor, rows: list[int]) -> list[list[int]]:
    """The split of 2 x B sequences into two groups of B with the fewest distinct experts
    summed over layers, by trying every split. ``hot`` [2B, L, E] 0/1."""
    import itertools

    n = hot.shape[0]
    half = n // 2
    best, best_cost = None, None
    for left in itertools.combinations(range(1, n), half - 1):    # sequence 0 in the first group
        a = [0, *left]
        b = [j for j in range(n) if j not in a]
        cost = int(hot[a].amax(0).sum() + hot[b].amax(0).sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = (a, b), cost
    return [[rows[j] for j in g] for g in best]


def simulate(traces, batch_size: int, pool_batches: int, num_experts: int, top_k: int, layers: list[int]) -> dict:
    """Mean distinct experts per group per layer per decode step under each grouping."""
    from expertflow_compile.tools.regroup import _Signatures
    from expertflow_compile.tools.schedule import form_batches

    dec = torch.stack([_hot(t["decode"], num_experts) for t in traces])        # [N, T, L, E]
    n, steps = dec.shape[:2]
    pre_sig = torch.stack([_share(_hot(t["prefill"], num_experts).sum(1)) for t in traces])   # [N, L, E]
    dec_sig = _share(dec.sum(1))
    totals: dict[str, list[float]] = {}

    def count(name: str, s: int, groups: list[list[int]]):
        d = [dec[g, s].amax(0).sum(-1).mean().item() for g in groups]
        totals.setdefault(name, []).extend(d)

    pool_size = pool_batches * batch_size
    for start in range(0, n - pool_size + 1, pool_size):
        rows = list(range(start, start + pool_size))
        arrival = [rows[i:i + batch_size] for i in range(0, pool_size, batch_size)]
        fixed = {"prefill": form_batches(pre_sig[rows], batch_size),
                 "decode (oracle, static)": form_batches(dec_sig[rows], batch_size)}
        fixed = {k: [[rows[j] for j in g] for g in v] for k, v in fixed.items()}
        memo = {g: _Signatures(pool_size, layers, num_experts, top_k) for g in ("last", "token")}
        for m in memo.values():
            for j, r in enumerate(rows):
                t = traces[r]
                m.observe([j], t["prefill_ids"][None], {l: t["prefill"][li] for li, l in enumerate(layers)})
        for s in range(steps):
            count("arrival", s, arrival)
            for k, v in fixed.items():
                count(k, s, v)
            toks = [int(traces[r]["tokens"][s]) for r in rows]
            for g, m in memo.items():
                groups = form_batches(m.next_step(list(range(pool_size)), toks, g), batch_size)
                count(f"regroup {g}", s, [[rows[j] for j in gr] for gr in groups])
                for j, r in enumerate(rows):
                    m.observe([j], torch.tensor([[toks[j]]]),
                              {l: traces[r]["decode"][s, li][None] for li, l in enumerate(layers)})
            exact = form_batches(_share(dec[rows, s]), batch_size)
            count("regroup exact (oracle)", s, [[rows[j] for j in g] for g in exact])
            if pool_batches == 2:
                count("best split (oracle, exhaustive)", s, _best_split(dec[rows, s], rows))
    out = {k: sum(v) / len(v) for k, v in totals.items()}
    base = out["arrival"]
    return {k: {"distinct": v, "vs_arrival": v / base - 1} for k, v in out.items()}


def predictivity(traces, num_experts: int, top_k: int, layers: list[int]) -> dict:
    """How well signatures predict decode routing."""
    from expertflow_compile.tools.regroup import _Signatures

    n = len(traces)
    pre = torch.stack([_share(_hot(t["prefill"], num_experts).sum(1)) for t in traces])
    dec = torch.stack([_share(_hot(t["decode"], num_experts).sum(0)) for t in traces])
    own = torch.minimum(pre, dec).sum(-1).mean().item()
    other = torch.minimum(pre, dec.roll(1, 0)).sum(-1).mean().item()
    hits = {"last": 0.0, "token": 0.0}
    total = 0
    for t in traces:       # per prompt alone: the share of a step's experts its signature names
        for g in hits:
            m = _Signatures(1, layers, num_experts, top_k)
            m.observe([0], t["prefill_ids"][None], {l: t["prefill"][li] for li, l in enumerate(layers)})
            for s in range(t["decode"].shape[0]):
                sig = m.next_step([0], [int(t["tokens"][s])], g)[0] > 0
                hits[g] += sig.gather(-1, t["decode"][s].long()).float().sum().item()
                m.observe([0], torch.tensor([[int(t["tokens"][s])]]),
                          {l: t["decode"][s, li][None] for li, l in enumerate(layers)})
        total += t["decode"].numel()
    return {"prefill_to_decode_intersection_own": own, "prefill_to_decode_intersection_other_prompt": other,
            "step_experts_named_by_last_step": hits["last"] / total,
            "step_experts_named_by_token_signature_alone": hits["token"] / total,
            "note": "token signature alone = learnt from that one prompt only (in a pool it learns from all members)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=shipped_model_names())
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--pools", default="1,2,4,8,16", help="pool sizes in batches")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/scheduling_offline_<model>.json")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    import expertflow_compile as ef
    from expertflow_compile.tools.schedule import _engine_of
    from scheduling import heldout_prompts

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = shipped_model_path(args.model)
    prompts = heldout_prompts(AutoTokenizer.from_pretrained(path), args.prompts, args.prompt_len)
    model = ef.from_pretrained(path, dtype=torch.float32)
    model.compile(backend="expertflow", options={})     # every expert resident: routing only
    traces = record_alone(model, prompts, args.new_tokens)
    engine = _engine_of(model)
    layers = sorted(engine.layers)
    num_experts = max(p.num_experts for p in engine.layers.values())
    top_k = max(p.top_k for p in engine.layers.values())
    pools = [int(p) for p in args.pools.split(",") if p.strip()]
    result = {"setup": {k: v for k, v in vars(args).items() if k != "json"} | {
        "num_experts": num_experts, "top_k": top_k, "moe_layers": len(layers),
        "uniform_independent_expectation": num_experts * (1 - (1 - top_k / num_experts) ** args.batch_size)},
        "predictivity": predictivity(traces, num_experts, top_k, layers), "pools": {}}
    for p in pools:
        if p * args.batch_size <= args.prompts:
            result["pools"][p] = simulate(traces, args.batch_size, p, num_experts, top_k, layers)
    result["setup"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{args.model}: {args.prompts} held-out prompts, batch {args.batch_size}, {args.new_tokens - 1} decode steps; "
          f"distinct experts per layer per decode step (of {num_experts}); independent uniform routing would give "
          f"{result['setup']['uniform_independent_expectation']:.2f}")
    names = list(dict.fromkeys(n for row in result["pools"].values() for n in row))
    widths = [max(24, len(n) + 2) for n in names]
    print(f"{'pool (batches)':>15}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for p, row in result["pools"].items():
        cells = [f"{row[n]['distinct']:.2f} ({row[n]['vs_arrival']:+6.1%})" if n in row else "-" for n in names]
        print(f"{p:>15}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for k, v in result["predictivity"].items():
        print(f"  {k}: {v if isinstance(v, str) else round(v, 3)}")
    out = args.json or os.path.join(HERE, "results", f"scheduling_offline_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
