"""Peak host memory: plain transformers loading vs expertflow's disk-backed experts.

Creates (once) a Mixtral-style checkpoint whose experts take >= 1 GiB (fp32, random
weights) under ``--workdir``, then measures, each in its own fresh Python process:

* ``plain``: ``AutoModelForCausalLM.from_pretrained`` + ``generate``;
* ``expertflow`` at ``--budget`` (default ``25%``): ``expertflow_compile.from_pretrained``
  (experts stay on disk) + ``model.compile(backend="expertflow", options={"expert_budget": ...})``
  + ``generate``;
* ``expertflow`` at the MINIMUM budget the backend accepts (one MoE layer's top-k
  experts: ``num_experts_per_tok`` slots, given in bytes), to separate the runtime's
  fixed overhead from the budget-proportional memory.

Each child runs: imports, load, ``model.compile`` (lazy), a warm-up ``generate`` of
``--warmup`` tokens (Dynamo traces and the backend compiles the graphs here), then the
timed ``generate`` of ``--tokens`` tokens. RSS is read from ``/proc/self/status`` after
each stage, and each stage's own peak is its ``VmHWM``, reset between stages by writing
``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0; elsewhere only the whole-run peak,
``ru_maxrss``, is known). Peak RSS = the largest stage peak.

Definitions used in the report (``baseline`` = RSS right after the loader returns:
interpreter + torch + transformers + dense weights, no experts):

* load peak = the highest RSS during ``expertflow_compile.from_pretrained`` minus the RSS
  after the imports, compared with the checkpoint's dense bytes (target: within 10%:
  the load never materialises an expert). transformers memory-maps the dense tensors, so
  their pages come in on first use; the child pages them in right after the load (the
  "dense weights paged in" stage, also within the target), and that RSS is the baseline;

* over baseline = peak RSS - baseline (at ``--budget``): the headline, compared with the budget;
* fixed runtime overhead = peak RSS at the minimum budget - its baseline - its cache bytes
  (Dynamo import and tracing, compiled graphs and guards, code pages, the prefetch thread);
  split per stage: ``model.compile`` (lazy), what the warm-up generate keeps, and the
  warm-up's transient (RSS peak during it minus RSS after it);
* budget-proportional = (peak at ``--budget`` - peak at minimum) / (budget - minimum budget):
  1.00 means every budget byte costs exactly one byte of RSS.

Prints a table and writes ``benchmarks/results/offload_memory.json``.

    python benchmarks/offload_memory.py            # 1.5 GiB of experts
    python benchmarks/offload_memory.py --small    # ~100 MB model, quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = dict(hidden_size=1024, intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2,
            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
LARGE = dict(hidden_size=2048, intermediate_size=4096, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
SMALL = dict(hidden_size=512, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _proc_status() -> dict:
    """VmRSS / VmHWM / RssAnon / RssFile in bytes (empty where /proc is missing)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                key, _, val = ln.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS, so the next reading is the next stage's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Stages:
    """RSS after each stage and each stage's own peak (see the module docstring)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.per_stage = _reset_hwm() and "VmHWM" in _proc_status()
        self.first_peak = None

    def mark(self, name: str, cache_bytes: int = 0) -> dict:
        st = _proc_status()
        rss = st.get("VmRSS", _rss())
        if self.per_stage:
            peak = st["VmHWM"]
            _reset_hwm()
        else:
            peak = _peak_rss()
        row = {"stage": name, "rss": rss, "stage_peak": max(peak, rss), "rss_anon": st.get("RssAnon"),
               "rss_file": st.get("RssFile"), "cache_bytes": cache_bytes}
        self.rows.append(row)
        return row

    def peak(self) -> int:
        return max(r["stage_peak"] for r in self.rows)


def _gib(n) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- model


def ensure_model(workdir: str, sizes: dict) -> str:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    tag = "mixtral_h{hidden_size}_i{intermediate_size}_e{num_local_experts}_l{num_hidden_layers}".format(**sizes)
    path = os.path.join(workdir, tag)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    print(f"creating {path} (random weights, fp32) ...", flush=True)
    t0 = time.time()
    cfg = MixtralConfig(max_position_embeddings=512, tie_word_embeddings=False, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():   # decisive routing, bounded activations
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.02)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, path)
    print(f"  saved in {time.time() - t0:.1f} s", flush=True)
    return path


# ----------------------------------------------------------------------------- child


def _min_budget(model) -> tuple[str, int, int]:
    """The smallest expert_budget the backend accepts for ``model`` (bytes, as a string),
    its slot count, and its bytes; checks that one byte less is refused."""
    from expertflow_compile.runtime.budget import parse_budget

    specs = model._expertflow_store.specs
    slot = max(s.slot_nbytes() for s in specs.values())
    need = int(model.config.num_experts_per_tok)
    nbytes = need * slot
    assert parse_budget(str(nbytes)).resolve_slots(specs, need) == need
    try:
        parse_budget(str(nbytes - 1)).resolve_slots(specs, need)
    except ValueError:
        pass
    else:
        raise AssertionError(f"expert_budget {nbytes - 1} bytes was accepted; the minimum is not {nbytes}")
    return str(nbytes), need, nbytes


def child(mode: str, path: str, tokens: int, budget: str, warmup: int) -> dict:
    stages = _Stages()
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import expertflow_compile

    out = {"mode": mode, "per_stage_peaks": stages.per_stage}
    out["rss_after_import"] = stages.mark("imports (torch, transformers, expertflow_compile)")["rss"]
    t0 = time.time()
    if mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model = expertflow_compile.from_pretrained(path, dtype=torch.float32)
    out["load_s"] = time.time() - t0
    row = stages.mark("loader" if mode == "expertflow" else "from_pretrained")
    out["rss_after_loader"] = row["rss"]
    if mode == "expertflow":
        # transformers' loader memory-maps the dense tensors (file pages come in on first use): page
        # them in once, so that the baseline holds the dense weights as the model will
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1 and not all(s == 0 for s in p.stride()):
                    p.float().sum()
        row = stages.mark("dense weights paged in (dense-only baseline)")
    out["rss_after_load"] = row["rss"]
    out["peak_rss_after_load"] = stages.peak()

    cache_bytes = lambda: 0  # noqa: E731
    if mode == "expertflow":
        if budget == "min":
            budget, out["min_budget_slots"], out["min_budget_bytes"] = _min_budget(model)
        out["expert_budget"] = budget
        model.compile(backend="expertflow", options={"expert_budget": budget})
        stages.mark("model.compile (lazy)")
        from expertflow_compile.runtime.engine import engines_for_module

        def cache_bytes():
            engines = engines_for_module(model)
            return engines[-1].cache.allocated_bytes if engines and engines[-1].cache is not None else 0

    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        t0 = time.time()
        if warmup:
            model.generate(prompt, max_new_tokens=warmup, min_new_tokens=warmup, do_sample=False)
        out["warmup_s"] = time.time() - t0
        stages.mark(f"warm-up generate({warmup})" + (" [compiles]" if mode == "expertflow" else ""), cache_bytes())
        t0 = time.time()
        ids = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        out["generate_s"] = time.time() - t0
    stages.mark(f"timed generate({tokens})", cache_bytes())
    out["new_tokens"] = int(ids.shape[1] - prompt.shape[1])
    out["tokens"] = ids[0].tolist()
    out["stages"] = stages.rows
    out["peak_rss"] = stages.peak()
    out["rss_end"] = stages.rows[-1]["rss"]
    if mode == "expertflow":
        s = expertflow_compile.stats(model)
        out["stats"] = {k: s[k] for k in ("budget_bytes", "peak_cache_bytes", "bytes_moved", "resident_rate", "ready_rate",
                                          "demand_loads", "prefetch_loads")}
    return out


def run_child(mode: str, path: str, tokens: int, budget: str, warmup: int) -> dict:
    print(f"running {mode} (budget {budget}) ...", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", path,
           "--tokens", str(tokens), "--budget", budget, "--warmup", str(warmup)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{mode} subprocess failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """(dense bytes, expert bytes) of the checkpoint."""
    from expertflow_compile.runtime.store import safetensors_index

    dense = experts = 0
    for name, e in safetensors_index(path).items():
        if ".experts." in name:
            experts += e.end - e.begin
        else:
            dense += e.end - e.begin
    return dense, experts


def _stage_delta(run: dict, name_prefix: str) -> dict:
    return next(r for r in run["stages"] if r["stage"].startswith(name_prefix))


def breakdown(run: dict) -> dict:
    """Where an expertflow run's memory above its baseline went, per stage."""
    base = run["rss_after_load"]
    comp = _stage_delta(run, "model.compile")
    warm = _stage_delta(run, "warm-up")
    timed = _stage_delta(run, "timed")
    cache = run["stats"]["peak_cache_bytes"]
    return {
        "baseline": base,
        "peak_over_baseline": run["peak_rss"] - base,
        "cache_bytes": cache,
        "overhead": run["peak_rss"] - base - cache,
        "compile_lazy": comp["rss"] - base,
        "warmup_kept": warm["rss"] - comp["rss"] - warm["cache_bytes"],
        "warmup_transient": warm["stage_peak"] - warm["rss"],
        "timed_growth": timed["rss"] - warm["rss"],
        "timed_transient": timed["stage_peak"] - timed["rss"],
        "steady_over_baseline": timed["rss"] - base,
    }


def _print_table(rows) -> None:
    w = max(len(k) for k, _ in rows)
    print(f"{'metric':<{w}}  value")
    print("-" * (w + 2 + 30))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def _print_stages(title: str, run: dict) -> None:
    base = run["rss_after_load"]
    print(f"\n{title}: RSS per stage (stage peak = the highest RSS during that stage)")
    print(f"  {'stage':<52} {'RSS':>11} {'stage peak':>11} {'peak-base':>11} {'cache':>10}")
    for r in run["stages"]:
        print(f"  {r['stage']:<52} {_gib(r['rss']):>11} {_gib(r['stage_peak']):>11} "
              f"{_gib(r['stage_peak'] - base):>11} {_gib(r['cache_bytes']):>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/expertflow-bench/")
    ap.add_argument("--small", action="store_true", help="a ~100 MB model (quick check)")
    ap.add_argument("--large", action="store_true", help="a model with 6 GiB of experts (plain HF peaks ~15 GiB)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4, help="tokens of the warm-up generate (0: none)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "offload_memory.json"))
    ap.add_argument("--child", choices=["plain", "expertflow"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args.tokens, args.budget, args.warmup)), flush=True)
        return

    os.makedirs(args.workdir, exist_ok=True)
    # the model is created in a subprocess too, so this process stays small
    sizes = SMALL if args.small else LARGE if args.large else FULL
    path = subprocess.run(
        [sys.executable, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]); "
         "from offload_memory import ensure_model; print(ensure_model(sys.argv[2], json.loads(sys.argv[3])))",
         HERE, args.workdir, json.dumps(sizes)],
        check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    ).stdout.strip().splitlines()[-1]
    dense, experts = checkpoint_bytes(path)

    plain = run_child("plain", path, args.tokens, args.budget, args.warmup)
    ours = run_child("expertflow", path, args.tokens, args.budget, args.warmup)
    low = run_child("expertflow", path, args.tokens, "min", args.warmup)
    budget, budget_min = ours["stats"]["budget_bytes"], low["stats"]["budget_bytes"]
    b, m = breakdown(ours), breakdown(low)
    over = b["peak_over_baseline"]
    fixed = m["overhead"]
    d_peak, d_budget = ours["peak_rss"] - low["peak_rss"], budget - budget_min
    load_peak = _stage_delta(ours, "loader")["stage_peak"] - ours["rss_after_import"]   # the load alone
    paged = _stage_delta(ours, "dense weights paged in")["stage_peak"] - ours["rss_after_import"]
    proportional = d_peak / d_budget if d_budget else float("nan")

    print()
    _print_stages(f"expertflow, expert_budget={args.budget!r} ({_gib(budget)})", ours)
    _print_stages(f"expertflow, minimum expert_budget={low['expert_budget']!r} bytes "
                  f"({low['min_budget_slots']} slots, {_gib(budget_min)})", low)
    print()
    rows = [
        ("checkpoint", path),
        ("dense bytes (checkpoint)", _gib(dense)),
        ("expert bytes (checkpoint)", _gib(experts)),
        (f"budget bytes ({args.budget})", _gib(budget)),
        (f"minimum budget bytes ({low['min_budget_slots']} slots = top-k of one layer)", _gib(budget_min)),
        ("peak RSS, plain HF from_pretrained + generate", _gib(plain["peak_rss"])),
        ("peak RSS, expertflow from_pretrained + compile + generate", _gib(ours["peak_rss"])),
        ("peak RSS ratio expertflow / plain", f"{ours['peak_rss'] / plain['peak_rss']:.3f}"),
        ("RSS after imports (interpreter, torch, transformers)", _gib(ours["rss_after_import"])),
        ("dense-only baseline (RSS after expertflow loader)", _gib(b["baseline"])),
        ("  loader's growth (dense weights + model code) / dense bytes",
         f"{_gib(b['baseline'] - ours['rss_after_import'])} / {_gib(dense)}"),
        ("peak RSS during the expertflow load - RSS after imports", f"{_gib(load_peak)} = "
                                                                     f"{load_peak / dense:.3f} x dense bytes"),
        ("  target: <= dense bytes + 10% (no expert materialised)",
         f"{'met' if load_peak <= 1.10 * dense else 'NOT met'} (limit {_gib(1.10 * dense)}; "
         f"experts {_gib(experts)})"),
        ("  same, after paging in the memory-mapped dense weights", f"{_gib(paged)} = {paged / dense:.3f} x dense "
                                                                    "bytes"),
        ("HEADLINE peak RSS - baseline", f"{_gib(over)} = {over / budget:.2f} x budget"),
        ("  target: <= budget + 10%", f"{'met' if over <= 1.10 * budget else 'NOT met'} "
                                      f"(limit {_gib(1.10 * budget)})"),
        ("fixed runtime overhead (peak - baseline - cache, minimum budget)", _gib(fixed)),
        ("  model.compile (lazy: imports Dynamo)", _gib(m["compile_lazy"])),
        ("  kept by the warm-up generate (graphs, guards, code), excl. cache", _gib(m["warmup_kept"])),
        ("  transient during the warm-up generate (Dynamo compile)", _gib(m["warmup_transient"])),
        ("  growth during the timed generate", _gib(m["timed_growth"])),
        ("same overhead measured at the budget (peak - baseline - cache)", _gib(b["overhead"])),
        ("budget-proportional: peak(budget) - peak(minimum)", _gib(d_peak)),
        ("  / (budget - minimum budget)", f"{_gib(d_peak)} / {_gib(d_budget)} = {proportional:.3f}"),
        ("peak RSS - baseline - fixed overhead, vs budget",
         f"{_gib(over - fixed)} = {(over - fixed) / budget:.3f} x budget"),
        ("steady-state RSS - baseline (after timed generate)", _gib(b["steady_over_baseline"])),
        ("peak cache bytes", _gib(ours["stats"]["peak_cache_bytes"])),
        ("bytes moved from disk (warm-up + timed)", _gib(ours["stats"]["bytes_moved"])),
        ("resident rate", f"{ours['stats']['resident_rate']:.3f}"),
        (f"timed generate({args.tokens}) plain / expertflow / expertflow minimum",
         f"{plain['generate_s']:.1f} s / {ours['generate_s']:.1f} s / {low['generate_s']:.1f} s"),
        ("same greedy tokens (plain vs expertflow, both budgets)",
         str(plain["tokens"] == ours["tokens"] == low["tokens"])),
    ]
    _print_table(rows)
    if not ours["per_stage_peaks"]:
        print("\n(note: /proc/self/clear_refs is not writable here; stage peaks are whole-run peaks so far)")

    result = {
        "checkpoint": path, "sizes": sizes, "small": args.small, "budget": args.budget, "tokens": args.tokens,
        "warmup_tokens": args.warmup,
        "dense_bytes": dense, "expert_bytes": experts, "budget_bytes": budget, "min_budget_bytes": budget_min,
        "dense_only_baseline_rss": b["baseline"], "peak_rss_minus_baseline": over,
        "load_peak_over_imports": load_peak, "load_peak_per_dense_bytes": load_peak / dense,
        "paged_in_dense_over_imports": paged, "paged_in_dense_per_dense_bytes": paged / dense,
        "load_target_dense_plus_10pct_met": load_peak <= 1.10 * dense,
        "peak_over_baseline_per_budget": over / budget,
        "target_budget_plus_10pct_met": over <= 1.10 * budget,
        "fixed_overhead_bytes": fixed,
        "fixed_overhead_breakdown": {k: m[k] for k in ("compile_lazy", "warmup_kept", "warmup_transient",
                                                       "timed_growth", "timed_transient")},
        "overhead_at_budget_bytes": b["overhead"],
        "budget_proportional": {"peak_delta": d_peak, "budget_delta": d_budget, "ratio": proportional},
        "peak_minus_baseline_minus_fixed_per_budget": (over - fixed) / budget,
        "steady_state_over_baseline": b["steady_over_baseline"],
        "plain": {k: v for k, v in plain.items() if k != "tokens"},
        "expertflow": {k: v for k, v in ours.items() if k != "tokens"},
        "expertflow_min_budget": {k: v for k, v in low.items() if k != "tokens"},
        "same_tokens": plain["tokens"] == ours["tokens"] == low["tokens"],
        "peak_rss_ratio": ours["peak_rss"] / plain["peak_rss"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
