"""Peak host memory: plain transformers loading vs expertflow's disk-backed experts.

Creates (once) a Mixtral-style checkpoint whose experts take >= 1 GiB (fp32, random
weights) under ``--workdir``, then measures, each in its own fresh Python process:

* ``plain``: ``AutoModelForCausalLM.from_pretrained`` + ``generate`` 32 tokens;
* ``expertflow``: ``expertflow_compile.from_pretrained`` (experts stay on disk) +
  ``model.compile(backend="expertflow", options={"expert_budget": "25%"})`` +
  ``generate`` 32 tokens.

Peak RSS is the process's ``ru_maxrss``. The dense-only baseline is the RSS right
after ``expertflow_compile.from_pretrained`` returns (interpreter + torch + dense
weights, no experts). Prints a table and writes ``benchmarks/results/offload_memory.json``.

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
SMALL = dict(hidden_size=512, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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


def child(mode: str, path: str, tokens: int, budget: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import expertflow_compile

    out = {"mode": mode, "rss_after_import": _rss()}
    t0 = time.time()
    if mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model = expertflow_compile.from_pretrained(path, dtype=torch.float32)
    out["load_s"] = time.time() - t0
    out["rss_after_load"] = _rss()
    out["peak_rss_after_load"] = _peak_rss()
    if mode == "expertflow":
        model.compile(backend="expertflow", options={"expert_budget": budget})
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    t0 = time.time()
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    out["generate_s"] = time.time() - t0
    out["new_tokens"] = int(ids.shape[1] - prompt.shape[1])
    out["tokens"] = ids[0].tolist()
    out["peak_rss"] = _peak_rss()
    out["rss_end"] = _rss()
    if mode == "expertflow":
        s = expertflow_compile.stats(model)
        out["stats"] = {k: s[k] for k in ("budget_bytes", "peak_cache_bytes", "bytes_moved", "hit_rate",
                                          "demand_loads", "prefetch_loads")}
    return out


def run_child(mode: str, path: str, tokens: int, budget: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", path,
           "--tokens", str(tokens), "--budget", budget]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/expertflow-bench/")
    ap.add_argument("--small", action="store_true", help="a ~100 MB model (quick check)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "offload_memory.json"))
    ap.add_argument("--child", choices=["plain", "expertflow"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args.tokens, args.budget)), flush=True)
        return

    os.makedirs(args.workdir, exist_ok=True)
    # the model is created in a subprocess too, so this process stays small
    sizes = SMALL if args.small else FULL
    path = subprocess.run(
        [sys.executable, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]); "
         "from offload_memory import ensure_model; print(ensure_model(sys.argv[2], json.loads(sys.argv[3])))",
         HERE, args.workdir, json.dumps(sizes)],
        check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    ).stdout.strip().splitlines()[-1]
    dense, experts = checkpoint_bytes(path)

    plain = run_child("plain", path, args.tokens, args.budget)
    ours = run_child("expertflow", path, args.tokens, args.budget)
    budget = ours["stats"]["budget_bytes"]
    baseline = ours["rss_after_load"]
    over = ours["peak_rss"] - baseline

    rows = [
        ("checkpoint", path),
        ("dense bytes", _gib(dense)),
        ("expert bytes", _gib(experts)),
        (f"budget bytes ({args.budget})", _gib(budget)),
        ("peak RSS, plain HF from_pretrained + generate", _gib(plain["peak_rss"])),
        ("peak RSS, expertflow from_pretrained + compile + generate", _gib(ours["peak_rss"])),
        ("dense-only baseline (RSS after expertflow load)", _gib(baseline)),
        ("expertflow peak RSS - baseline", _gib(over)),
        ("(peak RSS - baseline) / budget", f"{over / budget:.2f}"),
        ("peak RSS ratio expertflow / plain", f"{ours['peak_rss'] / plain['peak_rss']:.3f}"),
        ("peak cache bytes", _gib(ours["stats"]["peak_cache_bytes"])),
        ("bytes moved from disk", _gib(ours["stats"]["bytes_moved"])),
        ("generate time plain / expertflow", f"{plain['generate_s']:.1f} s / {ours['generate_s']:.1f} s"),
        ("same greedy tokens", str(plain["tokens"] == ours["tokens"])),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"{'metric':<{w}}  value")
    print("-" * (w + 2 + 24))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")

    result = {
        "checkpoint": path, "sizes": sizes, "small": args.small, "budget": args.budget, "tokens": args.tokens,
        "dense_bytes": dense, "expert_bytes": experts, "budget_bytes": budget,
        "dense_only_baseline_rss": baseline, "peak_rss_minus_baseline": over,
        "plain": {k: v for k, v in plain.items() if k != "tokens"},
        "expertflow": {k: v for k, v in ours.items() if k != "tokens"},
        "same_tokens": plain["tokens"] == ours["tokens"],
        "peak_rss_ratio": ours["peak_rss"] / plain["peak_rss"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
