"""The runtime's own cost at real models' routing shapes: decode ms/token, side by side.

Models: the real transformers families with the routing shapes of Mixtral-8x7B (32 MoE
layers x 8 experts, top-2: ``MixtralConfig``), Qwen3-30B-A3B (48 x 128, top-8:
``Qwen3MoeConfig``) and DeepSeek-V3 (58 MoE layers after 3 dense ones x 256 routed experts,
top-8, 8 groups / top-4 groups, one shared expert: ``DeepseekV3Config``), with a tiny hidden
size (64) so that expert math and copies cost almost nothing and what is left is the
runtime's bookkeeping. Routing is made to spread like a balanced trained router (FACTS.md):
embeddings and router weights ~ N(0, 1), attention output and expert down projections x
0.01, and random tokens fed at decode (teacher forcing).

Settings, per shape, each compiled after ``torch._dynamo.reset()`` on a fresh copy of the
same model, decoding the same tokens:

* ``hf-resident``  ``model.compile(backend="eager")``: the HF model, every expert resident
* ``ef-resident``  ``backend="expertflow"`` without a budget (our ops, every expert resident)
* ``lru`` / ``lfu`` / ``predictive+lookahead`` at 12.5%, 25% and 50% expert budgets
* (``--policies predictive+lookahead-exact``) the lookahead with its whole router chain
  (``lookahead_ranking=False``) instead of the chain's ranking form

Every setting of a run differs in its options: two models compiled with the same options in
one process share Dynamo's graphs, and the second then makes no lookahead prediction (the
README's limitation of a reused graph).

Each setting: a 16-token prompt, 8 decode steps of warm-up (compiles, fills the cache),
then ``--steps`` measured decode steps in segments of 8 (``--interleave``: every setting of
a shape compiled side by side in one process, their segments taken in turn with the order
rotating each round, so that a machine whose speed drifts - other load, CPU steal - slows
every setting alike; without it, one setting after the other); the table gives the median over
segments of wall and CPU ms/token (the CPU time of the process, all threads: less
sensitive to other load on a shared machine), the ratio to both resident rows, loads per
expert use, and whether every measured step's logits equal ``ef-resident``'s (max |diff|).

With ``--path-bench``, the cache's side of one layer call at Qwen3-30B-A3B's shape, step by
step (:func:`path_rows`: LRU; the predictive policy alone; + the lookahead's candidates as
hints; + the engine's own-layer prefetch): what each part of ``predictive+lookahead`` costs.

Then the cache alone (``ExpertCache`` over 1-byte experts, no model, prefetch off, uniform
random routing, batched layer calls): per-use cost at 64 slots (8 layers x 32 experts,
top-8, 25%) and at 3,712 slots (58 x 256, top-8, 25%: DeepSeek-V3's shape), same per-call
shape and loads per use, best of 5.

    OMP_NUM_THREADS=1 python benchmarks/runtime_overhead.py --interleave    # everything (~40 min)
    python benchmarks/runtime_overhead.py --shapes qwen3 --budgets 25%      # one shape, one budget
    python benchmarks/runtime_overhead.py --merge a.json,b.json             # one table from runs per shape
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SHAPES = ("mixtral", "qwen3", "deepseek")
SHAPE_NAMES = {"mixtral": "Mixtral-8x7B 32x8 top-2", "qwen3": "Qwen3-30B-A3B 48x128 top-8",
               "deepseek": "DeepSeek-V3 58x256 top-8"}
POLICIES = (("lru", "none"), ("lfu", "none"), ("predictive", "lookahead"))
# not run by default: predictive+lookahead with the whole router chain (lookahead_ranking=False)
EXTRA_POLICIES = (("predictive", "lookahead-exact"),)
VOCAB = 1024


def build(shape: str):
    """The tiny-hidden model of ``shape`` with balanced-looking routing (module docstring)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if shape == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=32, num_hidden_layers=32, num_local_experts=8,
                            num_experts_per_tok=2)
    elif shape == "qwen3":
        cfg = Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32, head_dim=16,
                             num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                             mlp_only_layers=[], norm_topk_prob=True)
    elif shape == "deepseek":
        common.update(num_key_value_heads=4)
        cfg = DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=61,
                               first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
                               topk_group=4, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                               routed_scaling_factor=2.5, norm_topk_prob=True)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1)
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1)
            elif "o_proj" in name or "down_proj" in name or "experts.w2" in name:
                p.mul_(0.01)
    return model


def decode(model, steps: int, warmup: int = 8, seg: int = 8, on_warm=None):
    """Prompt + warm-up + ``steps`` measured steps; returns (segments [(wall, cpu) s/token], logits)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=g)
    tokens = torch.randint(0, VOCAB, (warmup + steps,), generator=g)
    cache = DynamicCache(config=model.config)
    logits, segs = [], []
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for i in range(warmup):
            model(input_ids=tokens[i].view(1, 1), past_key_values=cache, use_cache=True)
        if on_warm is not None:
            on_warm()
        for s in range(0, steps, seg):
            n = min(seg, steps - s)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(warmup + s, warmup + s + n):
                out = model(input_ids=tokens[i].view(1, 1), past_key_values=cache, use_cache=True)
                logits.append(out.logits[0, -1].clone())
            segs.append(((time.perf_counter() - t0) / n, (time.process_time() - c0) / n))
    return segs, torch.stack(logits)


def run_setting(base, name: str, budget: str | None, policy: str, predictor: str, steps: int):
    import expertflow_compile as ef

    torch._dynamo.reset()
    gc.collect()
    model = _compiled(base, name, budget, policy, predictor)
    reset = (lambda: ef.reset_stats(model)) if name != "hf-resident" else None
    segs, logits = decode(model, steps, on_warm=reset)
    row = {"setting": name, "budget": budget or "100%", "wall_ms": 1e3 * statistics.median(w for w, _ in segs),
           "cpu_ms": 1e3 * statistics.median(c for _, c in segs), "segments": segs}
    if name != "hf-resident":
        s = ef.stats(model)
        row.update(uses=s["uses"], loads=s["loads"], resident_rate=s["resident_rate"], ready_rate=s["ready_rate"],
                   loads_per_use=s["loads"] / s["uses"] if s["uses"] else 0.0)
    del model
    torch._dynamo.reset()
    gc.collect()
    return row, logits


def _compiled(base, name: str, budget: str | None, policy: str, predictor: str):
    model = copy.deepcopy(base)
    if name == "hf-resident":
        model.compile(backend="eager")
    else:
        opts = {} if budget is None else {"expert_budget": budget, "policy": policy, "predictor": predictor}
        if predictor == "lookahead-exact":
            opts.update(predictor="lookahead", lookahead_ranking=False)
        model.compile(backend="expertflow", options=opts)
    return model


def interleaved_rows(base, plan, steps: int, warmup: int = 8, seg: int = 8, log=print) -> list[tuple[dict, torch.Tensor]]:
    """Every setting of ``plan`` compiled side by side in this process, their measured
    segments taken in turn (the order rotating by one each round), so that a machine whose
    speed drifts (other load, CPU steal) slows every setting alike. Returns (row, logits) per
    setting, in ``plan`` order."""
    import expertflow_compile as ef
    from transformers import DynamicCache

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(plan))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=g)
    tokens = torch.randint(0, VOCAB, (warmup + steps,), generator=g)
    runs = []
    with torch.no_grad():
        for name, budget, policy, pred in plan:
            t0 = time.perf_counter()
            model = _compiled(base, name, budget, policy, pred)
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            for i in range(warmup):
                model(input_ids=tokens[i].view(1, 1), past_key_values=cache, use_cache=True)
            if name != "hf-resident":
                ef.reset_stats(model)
            runs.append({"model": model, "cache": cache, "segs": [], "logits": []})
            log(f"  compiled and warmed {name} {budget or ''} ({time.perf_counter() - t0:.0f} s)")
        for r, s in enumerate(range(0, steps, seg)):
            n = min(seg, steps - s)
            for j in range(len(plan)):
                k = (j + r) % len(plan)
                run = runs[k]
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(warmup + s, warmup + s + n):
                    out = run["model"](input_ids=tokens[i].view(1, 1), past_key_values=run["cache"], use_cache=True)
                    run["logits"].append(out.logits[0, -1].clone())
                run["segs"].append(((time.perf_counter() - t0) / n, (time.process_time() - c0) / n))
    out = []
    for (name, budget, _, _), run in zip(plan, runs):
        segs = run["segs"]
        row = {"setting": name, "budget": budget or "100%", "segments": segs, "interleaved": True,
               "wall_ms": 1e3 * statistics.median(w for w, _ in segs),
               "cpu_ms": 1e3 * statistics.median(c for _, c in segs)}
        if name != "hf-resident":
            st = ef.stats(run["model"])
            row.update(uses=st["uses"], loads=st["loads"], resident_rate=st["resident_rate"],
                       ready_rate=st["ready_rate"], loads_per_use=st["loads"] / st["uses"] if st["uses"] else 0.0)
        out.append((row, torch.stack(run["logits"])))
    del runs
    torch._dynamo.reset()
    gc.collect()
    return out


def eager_logits(base, steps: int):
    """The uncompiled model's logits at the measured steps (the reference of ``--no-resident``)."""
    model = copy.deepcopy(base)
    _, logits = decode(model, steps)
    del model
    gc.collect()
    return logits


def add_ratios(rows: list[dict]) -> None:
    """``x_hf_*`` / ``x_ef_*``: each row over its shape's resident rows (when present)."""
    for shape in {r["shape"] for r in rows}:
        mine = [r for r in rows if r["shape"] == shape]
        for ref_name, tag in (("hf-resident", "hf"), ("ef-resident", "ef")):
            ref = next((r for r in mine if r["setting"] == ref_name), None)
            for r in mine:
                if ref is not None:
                    r[f"x_{tag}_wall"], r[f"x_{tag}_cpu"] = r["wall_ms"] / ref["wall_ms"], r["cpu_ms"] / ref["cpu_ms"]


def model_rows(shape: str, budgets, steps: int, log=print, policies=POLICIES, resident: bool = True,
               on_row=None, interleave: bool = False) -> list[dict]:
    base = build(shape)
    rows, ref = [], None
    plan = [("hf-resident", None, "", ""), ("ef-resident", None, "", "")] if resident else []
    if not resident:    # no ef-resident row here: compare with the uncompiled model instead
        ref = eager_logits(base, steps)
    for b in budgets:
        for policy, pred in policies:
            plan.append((policy if pred == "none" else f"{policy}+{pred}", b, policy, pred))
    done = interleaved_rows(base, plan, steps, log=log) if interleave else None
    for idx, (name, budget, policy, pred) in enumerate(plan):
        t0 = time.perf_counter()
        row, logits = done[idx] if done is not None else run_setting(base, name, budget, policy, pred, steps)
        if name == "ef-resident":
            ref = logits
        if ref is not None and name != "hf-resident":
            row["max_abs_diff"] = (logits - ref).abs().max().item()
            row["reference"] = "ef-resident" if resident else "uncompiled"
        row["shape"] = shape
        rows.append(row)
        log(f"  {shape:<9}{row['budget']:>7} {name:<22}{row['wall_ms']:8.1f} ms wall {row['cpu_ms']:8.1f} ms cpu"
            f"  ({time.perf_counter() - t0:.0f} s)")
        if on_row is not None:
            on_row(rows)
    add_ratios(rows)
    return rows


def cache_rows(repeats: int = 5) -> list[dict]:
    """Per-use cost of the cache alone at 64 and 3,712 slots (module docstring)."""
    from expertflow_compile.runtime.cache import ExpertCache
    from expertflow_compile.tools.replay import ByteStore

    out = []
    for layers, experts, top_k in ((8, 32, 8), (58, 256, 8)):
        slots = layers * experts // 4
        g = torch.Generator().manual_seed(0)
        calls = [(l, sorted(torch.randperm(experts, generator=g)[:top_k].tolist()))
                 for _ in range(max(40, 12000 // (layers * top_k))) for l in range(layers)]
        for policy in ("lru", "lfu", "predictive"):
            cache = ExpertCache(ByteStore(dict.fromkeys(range(layers), experts)), slots, policy=policy,
                                prefetch=False)
            best = None
            for r in range(repeats + 1):
                cache.stats.reset()
                t0 = time.process_time()
                for layer, ex in calls:
                    if policy == "predictive":
                        cache.set_predicted((layer + 1) % layers, ex, 1)
                    lease = cache.acquire_layer(layer, ex)
                    lease.wait_all()
                    lease.release()
                dt = time.process_time() - t0
                s = cache.stats.as_dict()
                if r and (best is None or dt < best[0]):     # the first pass fills the cache
                    best = (dt, s["uses"], s["loads"])
            cache.close()
            dt, uses, loads = best
            out.append({"slots": slots, "shape": f"{layers}x{experts} top-{top_k}", "policy": policy,
                        "us_per_use": 1e6 * dt / uses, "loads_per_use": loads / uses})
    return out


PATH_STEPS = (
    ("lru", "LRU: acquire + release"),
    ("predictive", "predictive policy, no predictions"),
    ("predictive+hints", "+ the candidates as hints (set_predicted), no prefetch"),
    ("predictive+prefetch", "+ the engine's prefetch of the own layer (gate, do no harm, read at the op)"),
)


def path_rows(repeats: int = 3, passes: int = 40) -> list[dict]:
    """The cache's side of one MoE layer call at Qwen3-30B-A3B's shape (48 x 128, top-8, 25%),
    no model, in the steps the engine adds for ``predictive+lookahead``: CPU us per layer call.
    A candidate list is the router's 8 plus 2 others (what the benchmark's lookahead sees),
    routing uniform; best of ``repeats`` after a filling pass."""
    from expertflow_compile.runtime.cache import ExpertCache
    from expertflow_compile.tools.replay import ByteStore

    layers, experts, top_k = 48, 128, 8
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(passes):
        for layer in range(layers):
            p = torch.randperm(experts, generator=g)[:top_k + 2].tolist()
            calls.append((layer, p, sorted(p[:top_k])))
    out = []
    for step, what in PATH_STEPS:
        cache = ExpertCache(ByteStore(dict.fromkeys(range(layers), experts)), layers * experts // 4,
                            policy=step.split("+")[0], prefetch="deferred")
        best = None
        for r in range(repeats + 1):
            cache.stats.reset()
            t0 = time.process_time()
            for layer, cands, routed in calls:
                if step == "predictive+hints":
                    cache.enter_layer(layer)
                    cache.set_predicted(layer, cands, 0)
                    cache.enter_layer(layer, routed=routed)
                elif step == "predictive+prefetch":    # ExpertEngine._prefetch_ranked, then _experts
                    cache.prefetch(layer, cands, harm_limit=layers, min_precision=0.95, enter=True)
                    cache.run_prefetches()
                    cache.enter_layer(layer, routed=routed)
                lease = cache.acquire_layer(layer, routed)
                lease.wait_all()
                lease.release()
            dt = time.process_time() - t0
            st = cache.stats.as_dict()
            if r and (best is None or dt < best[0]):
                best = (dt, st["loads"] / st["uses"], st["ready_rate"])
        cache.close()
        out.append({"step": step, "what": what, "us_per_call": 1e6 * best[0] / len(calls),
                    "loads_per_use": best[1], "ready_rate": best[2]})
    return out


def format_path(prow: list[dict]) -> str:
    lines = ["| layer call, cache side (48x128 top-8, 25%) | CPU us per layer call | x LRU | loads/use | ready rate |",
             "|---|---|---|---|---|"]
    base = prow[0]["us_per_call"] if prow else 1.0
    for p in prow:
        lines.append(f"| {p['what']} | {p['us_per_call']:.1f} | {p['us_per_call'] / base:.2f}x | "
                     f"{p['loads_per_use']:.2f} | {p['ready_rate']:.2f} |")
    return "\n".join(lines)


def format_tables(rows: list[dict], crows: list[dict]) -> str:
    lines = ["| shape | budget | setting | ms/token wall | ms/token CPU | x hf-resident (wall / CPU) | "
             "x ef-resident (wall / CPU) | loads/use | resident rate | logits vs ef-resident |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loads = f"{r['loads_per_use']:.2f}" if "loads_per_use" in r else "-"
        hit = f"{r['resident_rate']:.2f}" if "resident_rate" in r else "-"
        same = "-" if "max_abs_diff" not in r else ("equal" if r["max_abs_diff"] == 0 else
                                                    f"max diff {r['max_abs_diff']:.1e}")
        if r.get("reference") == "uncompiled" and same != "-":
            same += " (vs the uncompiled model)"
        xr = {k: (f"{r[k]:.2f}" if k in r else "?") for k in ("x_hf_wall", "x_hf_cpu", "x_ef_wall", "x_ef_cpu")}
        lines.append(f"| {SHAPE_NAMES[r['shape']]} | {r['budget']} | {r['setting']} | {r['wall_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} | {xr['x_hf_wall']} / {xr['x_hf_cpu']} | "
                     f"{xr['x_ef_wall']} / {xr['x_ef_cpu']} | {loads} | {hit} | {same} |")
    if crows:
        lines += ["", "| cache alone | policy | us per use (CPU) | loads/use |", "|---|---|---|---|"]
        for c in crows:
            lines.append(f"| {c['slots']} slots ({c['shape']}) | {c['policy']} | {c['us_per_use']:.2f} | "
                         f"{c['loads_per_use']:.2f} |")
        for policy in ("lru", "lfu", "predictive"):
            pair = [c for c in crows if c["policy"] == policy]
            if len(pair) != 2:
                continue
            a, b = pair
            lines.append(f"| 3,712 / 64 slots | {policy} | {b['us_per_use'] / a['us_per_use']:.2f}x | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--budgets", default="12.5%,25%,50%")
    ap.add_argument("--steps", type=int, default=32, help="measured decode steps per setting")
    ap.add_argument("--no-cache-bench", action="store_true")
    ap.add_argument("--path-bench", action="store_true", help="also the cache's side of a layer call at "
                    "Qwen3-30B-A3B's shape, step by step (LRU, predictive policy, + hints, + prefetch)")
    ap.add_argument("--policies", default=",".join(p if q == "none" else f"{p}+{q}" for p, q in POLICIES),
                    help="comma-separated settings: lru, lfu, predictive+lookahead, predictive+lookahead-exact "
                    "(the lookahead with the whole router chain: lookahead_ranking=False)")
    ap.add_argument("--no-resident", action="store_true", help="leave out the two resident rows (logits are "
                    "then compared with the uncompiled model; --merge takes the ratios from another run's)")
    ap.add_argument("--interleave", action="store_true", help="compile every setting of a shape side by side "
                    "and take their measured segments in turn (robust to a machine whose speed drifts)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "runtime_overhead.json"))
    ap.add_argument("--merge", metavar="JSON,...", help="print (and write to --json) one table from the "
                    "JSON files of separate runs (e.g. one run per shape, in parallel), then exit")
    args = ap.parse_args(argv)
    if args.merge:
        parts = []
        for path in (p.strip() for p in args.merge.split(",") if p.strip()):
            with open(path) as f:
                parts.append(json.load(f))
        merged = {"rows": [r for d in parts for r in d["rows"]], "cache": [c for d in parts for c in d["cache"]],
                  "steps": sorted({d["steps"] for d in parts}), "budgets": parts[0]["budgets"] if parts else []}
        add_ratios(merged["rows"])     # runs of one shape: over that shape's resident rows, wherever measured
        print(f"runtime overhead, CPU, 1 thread, {'/'.join(map(str, merged['steps']))} measured decode steps "
              f"per setting (merged from {len(parts)} runs)")
        print(format_tables(merged["rows"], merged["cache"]))
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)
        print(f"wrote {args.json}")
        return 0
    torch.set_num_threads(1)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shapes {bad}; known: {', '.join(SHAPES)}")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    known = {p if q == "none" else f"{p}+{q}": (p, q) for p, q in POLICIES + EXTRA_POLICIES}
    wanted = [x.strip() for x in args.policies.split(",") if x.strip()]
    if any(w not in known for w in wanted):
        ap.error(f"unknown policies {[w for w in wanted if w not in known]}; known: {', '.join(known)}")
    policies = [known[w] for w in wanted]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)

    def save(rows, crows=(), partial=True, prow=()):    # after every setting: a run cut short keeps its rows
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "cache": list(crows), "path": list(prow), "steps": args.steps,
                       "budgets": budgets, "partial": partial}, f, indent=1)

    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        done = list(rows)
        rows += model_rows(shape, budgets, args.steps, policies=policies, resident=not args.no_resident,
                           on_row=lambda r, done=done: save(done + r), interleave=args.interleave)
    crows = [] if args.no_cache_bench else cache_rows()
    prow = path_rows() if args.path_bench else []
    print(f"\nruntime overhead, CPU, 1 thread, {args.steps} measured decode steps per setting "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(format_tables(rows, crows))
    if prow:
        print("\n" + format_path(prow))
    save(rows, crows, partial=False, prow=prow)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
