"""Arrival-order vs routing-aware batches, one run, same prompts.

On the shipped model and held-out prompts (lines of expertflow_compile/assets/heldout.txt,
never trained on), for each budget: distinct experts per layer per decode step (the
quantity batching decides), bytes moved per generated token, hit rate, decode tokens/s,
and the scheduling overhead (measuring prefill routing + forming batches) against one
decode step. Ratios routing/arrival are printed; JSON to benchmarks/results/scheduling.json.

    python benchmarks/scheduling.py [--prompts 32 --batch-size 8 --new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "expertflow_compile", "assets", "tiny_mixtral")
HELDOUT = os.path.join(ROOT, "expertflow_compile", "assets", "heldout.txt")


def heldout_prompts(tok, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    docs = open(HELDOUT, encoding="utf-8").read().split("\n<|endoftext|>\n")
    lines = [line for d in docs for line in d.splitlines() if len(line.split()) >= 6]
    random.Random(seed).shuffle(lines)
    return [tok(line, return_tensors="pt").input_ids[0][:length] for line in lines[:n]]


def measure(model, prompts, batch_size, schedule, new_tokens) -> dict:
    import expertflow_compile as ef
    from expertflow_compile.runtime.engine import engines_for_module
    from expertflow_compile.schedule import generate_batched

    from expertflow_compile.schedule import _engine_of

    engine = _engine_of(model, prompts[0])
    distinct: list[int] = []

    def record(kind, layer, ids, *rest):
        if kind == "route" and ids.shape[0] <= batch_size:   # decode steps: one token per sequence
            distinct.append(int(torch.unique(ids).numel()))

    ef.reset_stats(model)
    engine.recorder = None
    t0 = time.perf_counter()
    from expertflow_compile.schedule import form_batches, routing_signatures

    if schedule == "routing":
        sigs = routing_signatures(model, prompts)
        t_sig = time.perf_counter() - t0
        t1 = time.perf_counter()
        batches = form_batches(sigs, batch_size)
        t_form = time.perf_counter() - t1
    else:
        t_sig = t_form = 0.0
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    ef.reset_stats(model)
    engine.recorder = record
    try:
        res = generate_batched(model, prompts, batch_size=batch_size, schedule=schedule,
                               max_new_tokens=new_tokens, batches=batches)
    finally:
        engine.recorder = None
    s = ef.stats(model)
    n_tokens = len(prompts) * new_tokens
    return {
        "schedule": schedule, "batches": res.batches, "outputs": [o.tolist() for o in res.outputs],
        "distinct_experts_per_layer_per_decode_step": sum(distinct) / max(len(distinct), 1),
        "bytes_moved_per_token": s["bytes_moved"] / n_tokens, "hit_rate": s["hit_rate"],
        "tokens_per_s": n_tokens / res.generate_seconds, "decode_step_ms": 1000 * res.generate_seconds / (
            new_tokens * len(res.batches)),
        "signature_ms": 1000 * t_sig, "form_batches_ms": 1000 * t_form,
    }


def in_layer_ordering(prompts, new_tokens: int, link: str) -> list[dict]:
    """Stall time with resident experts computed first vs expert-id order, one batch,
    budget 50%, over an EMULATED link (loads sleep bytes / bandwidth)."""
    import expertflow_compile as ef
    from expertflow_compile.bench import ThrottledStore, parse_bandwidth
    from expertflow_compile.runtime.engine import engines_for_module
    from expertflow_compile.schedule import generate_batched

    rows = []
    for resident_first in (False, True):
        torch._dynamo.reset()
        model = ef.from_pretrained(SHIPPED, dtype=torch.float32)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--link-bandwidth", default="500MB/s", help="emulated link for the in-layer ordering part")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "scheduling.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    import expertflow_compile as ef

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    prompts = heldout_prompts(tok, args.prompts, args.prompt_len)
    results = []
    for budget in [b.strip() for b in args.budgets.split(",")]:
        torch._dynamo.reset()
        model = ef.from_pretrained(SHIPPED, dtype=torch.float32)
        model.compile(backend="expertflow", options={"expert_budget": budget})
        for schedule in ("arrival", "routing"):   # warm-up: compile every shape outside the timed runs
            measure(model, prompts, args.batch_size, schedule, args.new_tokens)
        for schedule in ("arrival", "routing"):
            r = measure(model, prompts, args.batch_size, schedule, args.new_tokens)
            r["budget"] = budget
            results.append(r)
    print(f"shipped model, {args.prompts} held-out prompts of {args.prompt_len} tokens, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, 1 thread, CPU")
    head = (f"{'budget':>7} {'schedule':<9}{'distinct/layer/step':>20}{'KiB moved/tok':>15}{'hit rate':>10}"
            f"{'tokens/s':>10}{'sched ms':>10}{'step ms':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['budget']:>7} {r['schedule']:<9}{r['distinct_experts_per_layer_per_decode_step']:>20.2f}"
              f"{r['bytes_moved_per_token'] / 1024:>15.0f}{r['hit_rate']:>10.3f}{r['tokens_per_s']:>10.2f}"
              f"{r['signature_ms'] + r['form_batches_ms']:>10.1f}{r['decode_step_ms']:>9.1f}")
    for budget in sorted({r["budget"] for r in results}):
        a = next(r for r in results if r["budget"] == budget and r["schedule"] == "arrival")
        b = next(r for r in results if r["budget"] == budget and r["schedule"] == "routing")
        print(f"budget {budget}: routing/arrival distinct experts "
              f"{b['distinct_experts_per_layer_per_decode_step'] / a['distinct_experts_per_layer_per_decode_step']:.3f}, "
              f"bytes/token {b['bytes_moved_per_token'] / max(a['bytes_moved_per_token'], 1):.3f}, "
              f"tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.3f}; same tokens: {a['outputs'] == b['outputs']}; "
              f"form_batches {b['form_batches_ms']:.1f} ms + prefill routing {b['signature_ms']:.0f} ms "
              f"vs one decode step {b['decode_step_ms']:.1f} ms")
    ordering = in_layer_ordering(prompts[: args.batch_size], args.new_tokens, args.link_bandwidth)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"batching": results, "in_layer_ordering": ordering}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
