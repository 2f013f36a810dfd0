#!/usr/bin/env python3
"""Expert prediction and cache policies on a shipped model (issues 4, 14, 15).

1. Record the routing of TRAINING documents (python3.11-doc minus the held-out split of
   scripts/prepare_corpus.py) and train the path predictor on it.
2. Record the routing of the HELD-OUT text (expertflow_compile/assets/heldout.txt).
3. On the held-out trace: per-layer precision / recall of the lookahead and path
   predictors, and a cache replay (the real ExpertCache policy code, slots shared by all
   layers) of LRU, LFU, the predictive policy alone, predictive+lookahead, predictive+path,
   predictive+oracle, the next-call ceiling (the predictive policy told each layer's true next
   call: what a perfect next-token routing predictor could give it) and Belady's MIN at
   12.5% / 25% / 50% of all experts, decode (batch 1) and batch 8, side by
   side: loads / MIN, ready rate, resident rate, loads per token (definitions:
   expertflow_compile/runtime/stats.py). The live engine's rule: at a layer's prediction the
   cache enters the layer, hints every candidate, and loads those at list positions whose
   online-measured precision is >= --min-precision (0.95); the router's choice drops the
   rest and demotes wrong prefetches; prefetches never evict an expert predicted to be
   needed no later (do no harm). --min-precision none: the previous rule (candidates whose
   offline rank precision is >= --min-confidence, prefetched before the layer is entered).

4. Issue 14's acceptance grid (oracle, lookahead, path x 12.5/25/50% x batch 1 and 8, with
   LRU and MIN in the same rows), for every model of the run, printed together at the end.

``--explain``: instead of steps 3-4, where the loads go for one trace at batch 1 and 25%
(``--explain-budget``, ``--explain-batch``): every use and load of LRU, of the predictive
policy without prefetching, of predictive+lookahead and of MIN classified (resident /
prefetched / loaded in the call; why it was not cached: evicted by a prefetch or by a demand
load, and whether MIN had it resident; wasted prefetches; experts a prefetch evicted and
loaded again), per token (``tools.replay.explain_loads``); written to
benchmarks/results/prediction_explain[_MODEL].json.

``--ceilings``: instead of steps 3-4, what knowledge of the future is worth to replacement
(no prefetch, batch 1 and 8, 12.5/25/50%): LRU, the predictive policy alone, told the rest of
the current token's routing (``rest-of-pass``), told each layer's true next call
(``next-call``: a perfect next-token routing predictor) and MIN; written to
benchmarks/results/prediction_ceilings[_MODEL].json.

Writes benchmarks/results/prediction[_MODEL].json and .png per model. Intermediate files
(traces, predictor) go to --work (reused when present). --no-path skips training the path
predictor. ``--model all`` (the default) runs both shipped models in one run.

    python benchmarks/prediction.py [--model all|tiny_mixtral|tiny_qwen2_moe] [--work DIR] [--train-tokens 102400]
                                    [--max-tokens 8192] [--no-path] [--min-precision 0.95|none]
                                    [--min-confidence 0.0]
                                    [--explain [--explain-budget 0.25] [--explain-batch 1]] [--ceilings]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    import torch

    from expertflow_compile.assets import SHIPPED_MODELS
    from expertflow_compile.tools.evaluate import format_acceptance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=["all"] + list(SHIPPED_MODELS),
                    help="a shipped model, or all of them (default)")
    ap.add_argument("--work", default=None, help="default /tmp/efp (tiny_mixtral) or /tmp/efp_MODEL")
    ap.add_argument("--no-path", action="store_true", help="skip the path predictor (its training takes minutes)")
    ap.add_argument("--min-confidence", type=float, default=0.0)
    ap.add_argument("--min-precision", type=lambda v: None if v == "none" else float(v), default=0.95,
                    help="the live gate: measured precision a candidate's list position needs to be loaded "
                         "before the router (none: the previous rule)")
    ap.add_argument("--train-tokens", type=int, default=102400)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens replayed per mode")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--explain", action="store_true", help="classify where the loads go (one budget and batch)")
    ap.add_argument("--explain-budget", type=float, default=0.25)
    ap.add_argument("--explain-batch", type=int, default=1)
    ap.add_argument("--ceilings", action="store_true", help="what knowledge of the future is worth to replacement")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = list(SHIPPED_MODELS) if args.model == "all" else [args.model]
    if args.work is not None and len(models) > 1:
        ap.error("--work names one model's folder: give --model too")
    grids = [(name, run_model(name, args)) for name in models]
    if args.explain or args.ceilings:
        return 0
    print()
    for name, result in grids:
        print(format_acceptance(result["acceptance"], name))
        print()
    return 0


def run_model(name: str, args) -> dict:
    """Steps 1-4 for one shipped model; writes its JSON and PNG and returns the result."""
    import torch

    from expertflow_compile.assets import DEFAULT_MODEL, HELDOUT_TEXT, shipped_model_path
    from expertflow_compile.cli.main import _load_checkpoint
    from expertflow_compile.tools.evaluate import (DOC_SEPARATOR, acceptance, evaluate, format_tables, text_batches,
                                                   training_documents)
    from expertflow_compile.runtime.prediction import PathPredictor, train_path_predictor
    from expertflow_compile.runtime.trace import RoutingTrace, record_routing

    work = args.work or ("/tmp/efp" if name == DEFAULT_MODEL else f"/tmp/efp_{name}")
    suffix = "" if name == DEFAULT_MODEL else f"_{name}"
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model, tok = _load_checkpoint(shipped_model_path(name))
    t0 = time.perf_counter()

    train_trace_path = os.path.join(work, "train_trace.safetensors")
    if not args.no_path and not os.path.exists(train_trace_path):
        docs = training_documents()
        docs.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())   # mix doc kinds, deterministic
        batches = text_batches(tok, DOC_SEPARATOR.join(docs), max_tokens=args.train_tokens)
        record_routing(model, batches).save(train_trace_path)
    pred_path = os.path.join(work, "path.safetensors")
    if not args.no_path and not os.path.exists(pred_path):
        trace = RoutingTrace.load(train_trace_path, model=model)
        train_path_predictor(trace, model, epochs=args.epochs).save(pred_path)
    heldout_path = os.path.join(work, "heldout_trace.safetensors")
    if not os.path.exists(heldout_path):
        text = open(HELDOUT_TEXT, encoding="utf-8").read()
        record_routing(model, text_batches(tok, text)).save(heldout_path)

    heldout = RoutingTrace.load(heldout_path, model=model)
    if args.explain:
        return explain(name, heldout, args, suffix)
    if args.ceilings:
        return ceilings(name, heldout, args, suffix)
    pred = None if args.no_path else PathPredictor.load(pred_path, model=model)
    result = evaluate(heldout, pred, model, max_tokens=args.max_tokens, min_confidence=args.min_confidence,
                      min_precision=args.min_precision)
    result["acceptance"] = acceptance(result)
    result["predictor_training"] = None if pred is None else pred.metrics
    result["setup"] = {
        "model": f"expertflow_compile/assets/{name}",
        "train_trace_tokens": None if args.no_path else RoutingTrace.load(train_trace_path).num_tokens,
        "heldout_trace_tokens": heldout.num_tokens,
        "replayed_tokens_per_mode": args.max_tokens,
        "prefetch_model": "prefetches complete before the layer's experts are acquired; one for the layer about "
                          "to run that finds no victim needed later than the slots the call frees is loaded into "
                          "the first slot the call frees while the router agrees (unlimited link: the ready rate "
                          "is an upper bound; expertflow bench --link-bandwidth measures timing)",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"== {name}")
    print(format_tables(result))
    with open(os.path.join(args.out, f"prediction{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, os.path.join(args.out, f"prediction{suffix}.png"))
    print(f"wrote {args.out}/prediction{suffix}.json and prediction{suffix}.png")
    return result


def explain(name: str, trace, args, suffix: str) -> dict:
    """Where the loads go (see the module docstring): per-token counts for each run."""
    from expertflow_compile.runtime.belady import min_loads
    from expertflow_compile.tools.replay import (call_predictions, candidate_sets, explain_loads, layer_calls,
                                                 rank_precision, replay, slots_for_share)

    cands = candidate_sets(trace, "lookahead", 1)
    calls = layer_calls(trace, args.explain_batch, args.max_tokens)
    preds = call_predictions(trace, calls, cands, precision=rank_precision(trace, cands))
    slots = slots_for_share(trace, args.explain_budget)
    min_sets: list = []
    m_loads, m_res = min_loads([(c.layer, c.active) for c in calls], slots, resident_sets=min_sets)
    runs = {"LRU": ("lru", "none", None, {}), "predictive (no prefetch)": ("predictive", "none", None, {}),
            "predictive+lookahead": ("predictive", "lookahead", preds,
                                     {"min_precision": args.min_precision or 0.95, "enter_first": True}),
            "pred+lookahead, old rule": ("predictive", "lookahead", preds, {"min_confidence": 0.8, "demote": False})}
    out = {"model": name, "batch": args.explain_batch, "budget": args.explain_budget, "slots": slots, "runs": {}}
    tokens = None
    for label, (policy, pred, p, kw) in runs.items():
        events: list = []
        r = replay(trace, calls, slots, policy, pred, predictions=p, events=events, **kw)
        x = explain_loads(calls, events, min_sets, p, kw.get("min_confidence", 0.0))
        tokens = r.tokens
        out["runs"][label] = {**x, "loads": r.loads, "ready": r.ready}
    out["runs"]["MIN"] = {"loads": m_loads, "resident": m_res, "uses": sum(len(c.active) for c in calls)}
    out["tokens"] = tokens
    keys = ["loads", "resident", "prefetched", "loaded_in_call", "predicted_in_call", "evicted_by_demand",
            "evicted_by_demand_min_kept", "evicted_by_prefetch", "evicted_by_prefetch_min_kept", "cold",
            "wasted_prefetches", "prefetch_evictions", "prefetch_evictions_reloaded", "prefetch_evictions_own_layer",
            "prefetch_evictions_previous_layer"]
    print(f"== {name}: where the loads go, batch {args.explain_batch}, {100 * args.explain_budget:g}% ({slots} slots), "
          f"{tokens} tokens, per token (uses {out['runs']['MIN']['uses'] / tokens:.2f}; MIN loads "
          f"{m_loads / tokens:.2f}, resident {m_res / tokens:.2f})")
    width = max(len(k) for k in keys)
    labels = [l for l in out["runs"] if l != "MIN"]
    print("  " + " " * width + "".join(f"{l[:26]:>28}" for l in labels))
    for k in keys:
        print(f"  {k:<{width}}" + "".join(f"{out['runs'][l].get(k, 0) / tokens:>28.3f}" for l in labels))
    path = os.path.join(args.out, f"prediction_explain{suffix}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return out


def ceilings(name: str, trace, args, suffix: str) -> dict:
    """Loads per token of replacement with more and more knowledge of the future (see the
    module docstring), side by side with LRU and MIN; no prefetch anywhere."""
    from expertflow_compile.tools.replay import layer_calls, replay, slots_for_share

    runs = [("LRU", "lru", "none"), ("predictive alone", "predictive", "none"),
            ("rest-of-pass", "predictive", "rest-of-pass"), ("next-call", "predictive", "next-call")]
    out = {"model": name, "tokens": None, "rows": []}
    print(f"== {name}: what knowledge of the future is worth to replacement (loads per token; x LRU; no prefetch)")
    print(f"  {'batch':>5} {'budget':>7}" + "".join(f"{label:>22}" for label, _p, _q in runs) + f"{'MIN':>16}")
    for batch in (1, 8):
        calls = layer_calls(trace, batch, args.max_tokens)
        for share in (0.125, 0.25, 0.5):
            slots = slots_for_share(trace, share)
            res = {label: replay(trace, calls, slots, policy, pred) for label, policy, pred in runs}
            lru = res["LRU"]
            tokens = lru.tokens
            out["tokens"] = tokens
            row = {"batch": batch, "budget": share, "slots": slots, "min_loads_per_token": lru.min_loads / tokens,
                   **{label: r.loads_per_token for label, r in res.items()}}
            out["rows"].append(row)
            print(f"  {batch:>5} {100 * share:>6g}%" + "".join(
                f"{r.loads_per_token:>14.2f} (x{r.loads / lru.loads:.2f})" for r in res.values())
                + f"{lru.min_loads / tokens:>9.2f} (x{lru.min_loads / lru.loads:.2f})")
    path = os.path.join(args.out, f"prediction_ceilings{suffix}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return out


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {("lru", "none"): "LRU", ("lfu", "none"): "LFU", ("predictive", "none"): "pred alone",
              ("predictive", "lookahead"): "pred+lookahead", ("predictive", "path"): "pred+path",
              ("predictive", "oracle"): "pred+oracle", ("predictive", "next-call"): "next-call (ceiling)",
              ("min", "none"): "MIN"}
    batches = sorted({r["batch"] for r in result["replay"]})
    fig, axes = plt.subplots(2, len(batches) + 1, figsize=(5 * (len(batches) + 1), 8))
    for j, b in enumerate(batches):
        rows = [r for r in result["replay"] if r["batch"] == b]
        for key, label in labels.items():
            pts = sorted((r["budget"], r["ready_rate"], r["loads_per_token"]) for r in rows
                         if (r["policy"], r["predictor"]) == key)
            if not pts:
                continue
            xs = [100 * p[0] for p in pts]
            axes[0, j].plot(xs, [p[1] for p in pts], marker="o", label=label)
            axes[1, j].plot(xs, [p[2] for p in pts], marker="o", label=label)
        name = "decode (batch 1)" if b == 1 else f"batch {b}"
        axes[0, j].set_title(f"ready rate, {name}")
        axes[1, j].set_title(f"loads per token, {name}")
        for i in range(2):
            axes[i, j].set_xlabel("expert budget (% of all experts)")
            axes[i, j].grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    q = result["prediction"]
    ax = axes[0, -1]
    for name, per in q.items():
        layers = sorted(per, key=int)
        ax.plot([int(l) for l in layers], [per[l]["recall"] for l in layers], marker="o", label=f"{name} recall")
        ax.plot([int(l) for l in layers], [per[l]["precision"] for l in layers], marker="x", ls="--",
                label=f"{name} precision")
    ax.set_title("prediction quality per MoE layer (held-out)")
    ax.set_xlabel("MoE layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[1, -1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
