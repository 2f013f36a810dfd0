"""Arrival order vs routing-aware batches vs decode regrouping, one run, same prompts.

On a shipped model (``--model``, a short name of expertflow_compile.assets; default
tiny_mixtral) and held-out prompts (lines of expertflow_compile/assets/heldout.txt, never
trained on), for each budget and schedule:

* distinct experts per MoE layer per decode step (the quantity grouping decides);
* loads (every transfer into the expert cache: demand and prefetch) and KiB moved per
  generated token, over the whole generation (prefill included), and the resident rate;
* decode tokens/s and the scheduling overhead against one decode step.

Schedules: ``arrival`` (prompts batched in order, ``generate``), ``routing`` (batches formed
from prefill routing signatures, ``schedule.generate_batched``), ``regroup xP`` (ExpertFlow's
decode regrouping over pools of P consecutive batches, ``regroup.generate_regrouped`` with
the online token signature) and ``pooled arrival xP`` (the same pooled decode loop with
the arrival groups kept: separates the effect of grouping from that of interleaving
batches). Every schedule must give the same tokens (checked here and in the tests).
Ratios against arrival are printed; JSON to benchmarks/results/scheduling_<model>.json.

    python benchmarks/scheduling.py --model tiny_qwen2_moe [--prompts 64 --batch-size 8 --new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)

from expertflow_compile.assets import DEFAULT_MODEL, HELDOUT_TEXT, shipped_model_names, shipped_model_path  # noqa: E402


def heldout_prompts(tok, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` held-out lines of at least 6 words, shuffled with ``seed``, cut to ``length`` tokens."""
    docs = open(HELDOUT_TEXT, encoding="utf-8").read().split("\n<|endoftext|>\n")
    lines = [line for d in docs for line in d.splitlines() if len(line.split()) >= 6]
    random.Random(seed).shuffle(lines)
    if len(lines) < n:
        raise ValueError(f"--prompts {n}: heldout.txt has only {len(lines)} lines of >= 6 words")
    return [tok(line, return_tensors="pt").input_ids[0][:length] for line in lines[:n]]


def run_schedule(model, prompts, batch_size: int, schedule: str, pool: int, new_tokens: int) -> dict:
    """One schedule over all prompts; counts from the engine's recorder and stats."""
    import expertflow_compile as ef
    from expertflow_compile.tools.regroup import generate_regrouped
    from expertflow_compile.tools.schedule import _engine_of, form_batches, generate_batched, routing_signatures

    engine = _engine_of(model, prompts[0])
    distinct: list[int] = []

    def record(kind, layer, ids, *rest):
        if kind == "route" and ids.shape[0] <= batch_size:   # decode steps: one token per sequence
            distinct.append(int(torch.unique(ids).numel()))

    t_sig = t_form = 0.0
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    engine.recorder = None
    if schedule == "routing":
        t0 = time.perf_counter()
        sigs = routing_signatures(model, prompts)
        t_sig = time.perf_counter() - t0
        t1 = time.perf_counter()
        batches = form_batches(sigs, batch_size)
        t_form = time.perf_counter() - t1
    ef.reset_stats(model)
    engine.recorder = record
    try:
        if schedule in ("arrival", "routing"):
            res = generate_batched(model, prompts, batch_size=batch_size, schedule=schedule,
                                   max_new_tokens=new_tokens, batches=batches)
            seconds, steps, kv_s = res.generate_seconds, new_tokens * len(res.batches), 0.0
            t_sched = t_sig + t_form
        else:
            res = generate_regrouped(model, prompts, batch_size=batch_size, pool_batches=pool,
                                     group_by="token" if schedule == "regroup" else "arrival",
                                     max_new_tokens=new_tokens)
            seconds, kv_s, t_sched = res.generate_seconds, res.kv_seconds, res.schedule_seconds
            steps = res.decode_steps + -(-len(prompts) // batch_size)   # + one prefill per batch
    finally:
        engine.recorder = None
    s = ef.stats(model)
    n_tokens = len(prompts) * new_tokens
    return {
        "schedule": schedule if schedule in ("arrival", "routing") else f"{schedule} x{pool}",
        "pool_batches": pool, "outputs": [o.tolist() for o in res.outputs],
        "distinct_experts_per_layer_per_decode_step": sum(distinct) / max(len(distinct), 1),
        "decode_routing_records": len(distinct),
        "loads_per_token": s["loads"] / n_tokens, "bytes_moved_per_token": s["bytes_moved"] / n_tokens,
        "resident_rate": s["resident_rate"], "tokens_per_s": n_tokens / seconds, "seconds": seconds,
        "step_ms": 1000 * seconds / steps, "schedule_ms": 1000 * t_sched, "signature_ms": 1000 * t_sig,
        "form_batches_ms": 1000 * t_form, "kv_regroup_ms": 1000 * kv_s,
    }


def in_layer_ordering(path: str, prompts, new_tokens: int, link: str) -> list[dict]:
    """Stall time with resident experts computed first vs expert-id order, one batch,
    budget 50%, over an EMULATED link (loads sleep bytes / bandwidth)."""
    import expertflow_compile as ef
    from expertflow_compile.tools.bench import ThrottledStore, parse_bandwidth
    from expertflow_compile.runtime.engine import engines_for_module
    from expertflow_compile.tools.schedule import generate_batched

    rows = []
    for resident_first in (False, True):
        torch._dynamo.reset()
        model = ef.from_pretrained(path, dtype=torch.float32)
        model.compile(backend="expertflow", options={"expert_budget": "50%", "resident_first": resident_first})
        generate_batched(model, prompts, batch_size=len(prompts), schedule="arrival", max_new_tokens=new_tokens)
        for eng in engines_for_module(model):
            eng.build_cache(ThrottledStore(eng.store, parse_bandwidth(link)))
        ef.reset_stats(model)
        res = generate_batched(model, prompts, batch_size=len(prompts), schedule="arrival",
                               max_new_tokens=new_tokens)
        s = ef.stats(model)
        rows.append({"resident_first": resident_first, "stall_seconds": s["stall_seconds"],
                     "seconds": res.generate_seconds, "outputs": [o.tolist() for o in res.outputs]})
    print(f"in-layer ordering, batch {len(prompts)}, budget 50%, EMULATED link {link}:")
    for r in rows:
        print(f"  resident first={r['resident_first']!s:<6} stall {r['stall_seconds']:.3f} s of {r['seconds']:.3f} s")
    print(f"  same tokens: {rows[0]['outputs'] == rows[1]['outputs']}; stall ratio (resident first / id order) "
          f"{rows[1]['stall_seconds'] / max(rows[0]['stall_seconds'], 1e-9):.3f}")
    return rows


def print_table(results: list[dict], num_experts: int) -> None:
    head = (f"{'budget':>7} {'schedule':<19}{f'distinct/layer/step (of {num_experts})':>30}{'loads/tok':>10}"
            f"{'KiB/tok':>9}{'resident':>9}{'tokens/s':>9}{'sched ms':>9}{'kv ms':>8}{'step ms':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['budget']:>7} {r['schedule']:<19}{r['distinct_experts_per_layer_per_decode_step']:>30.2f}"
              f"{r['loads_per_token']:>10.2f}{r['bytes_moved_per_token'] / 1024:>9.0f}{r['resident_rate']:>9.3f}"
              f"{r['tokens_per_s']:>9.2f}{r['schedule_ms']:>9.1f}{r['kv_regroup_ms']:>8.1f}{r['step_ms']:>8.1f}")
    for budget in dict.fromkeys(r["budget"] for r in results):
        rows = [r for r in results if r["budget"] == budget]
        a = rows[0]
        for b in rows[1:]:
            print(f"budget {budget}: {b['schedule']} / arrival: distinct experts "
                  f"{b['distinct_experts_per_layer_per_decode_step'] / a['distinct_experts_per_layer_per_decode_step']:.3f}"
                  f", loads/token {b['loads_per_token'] / max(a['loads_per_token'], 1e-9):.3f}"
                  f", tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.3f}; same tokens: {a['outputs'] == b['outputs']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=shipped_model_names())
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--pools", default="2,8", help="decode regrouping pools, in batches (ExpertFlow's is 2)")
    ap.add_argument("--link-bandwidth", default="500MB/s", help="emulated link for the in-layer ordering part")
    ap.add_argument("--skip-ordering", action="store_true", help="skip the in-layer ordering part")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/scheduling_<model>.json")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    import expertflow_compile as ef

    torch.set_num_threads(1)
    path = shipped_model_path(args.model)
    pools = [int(p) for p in args.pools.split(",") if p.strip()]
    if args.batch_size < 2 or any(p < 1 for p in pools):
        raise SystemExit("--batch-size must be >= 2 and every --pools entry >= 1")
    if args.prompts % args.batch_size or args.prompt_len < 2:
        # decode steps are told from prefills by size: a full batch's prefill has >= 2 tokens per row
        raise SystemExit("--prompts must be a multiple of --batch-size and --prompt-len >= 2")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = heldout_prompts(tok, args.prompts, args.prompt_len)
    schedules = [("arrival", 1), ("routing", 1)] + [("regroup", p) for p in pools] + [("pooled arrival", max(pools))]
    results, num_experts = [], None
    warm = prompts[: min(len(prompts), max(pools) * args.batch_size)]
    for budget in [b.strip() for b in args.budgets.split(",")]:
        for schedule, pool in schedules:
            # each schedule on a fresh model and Dynamo state: the same cold expert cache for
            # every row, and one call style per process (Dynamo's recompile limit is 8 per frame)
            torch._dynamo.reset()
            model = ef.from_pretrained(path, dtype=torch.float32)
            model.compile(backend="expertflow", options={"expert_budget": budget})
            run_schedule(model, warm, args.batch_size, schedule, pool, 3)   # warm-up: compile outside the run
            from expertflow_compile.tools.schedule import _engine_of

            num_experts = max(p.num_experts for p in _engine_of(model).layers.values())
            r = run_schedule(model, prompts, args.batch_size, schedule, pool, args.new_tokens)
            r["budget"] = budget
            results.append(r)
            print(f"  {budget} {r['schedule']}: {r['seconds']:.1f} s", flush=True)
    print(f"{args.model}, {args.prompts} held-out prompts of <= {args.prompt_len} tokens, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, 1 thread, CPU")
    print_table(results, num_experts)
    same = all(r["outputs"] == results[0]["outputs"] for r in results)
    print(f"same tokens under every schedule and budget: {same}")
    ordering = [] if args.skip_ordering else in_layer_ordering(path, prompts[: args.batch_size], args.new_tokens,
                                                                  args.link_bandwidth)
    out = args.json or os.path.join(ROOT, "benchmarks", "results", f"scheduling_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "json"}
    setup["command"] = "python benchmarks/scheduling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(out, "w") as f:
        json.dump({"setup": setup, "same_tokens": same, "batching": results, "in_layer_ordering": ordering}, f, indent=1)
    print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
