"""Decode speed and expert memory, side by side, one run, same model and prompts.

Modes:
  hf-resident      plain HF model, every expert in memory (the reference)
  hf-accelerate    HF + accelerate disk offload (device_map with a CPU memory cap + offload_folder)
  ef-lru           expertflow, experts on disk, LRU cache, no prediction
                   (the mixtral-offloading-without-speculation baseline)
  ef-lookahead     expertflow, experts on disk, LRU cache + lookahead prefetch

Each mode runs in its own subprocess (clean Dynamo state, its own peak RSS).
Prints tokens/s and the ratio to fully resident, peak expert memory, hit/ready rate,
and whether the greedy tokens equal the resident ones; writes JSON.

    python benchmarks/offload_speed.py                      # the shipped tiny model
    python benchmarks/offload_speed.py --size medium        # a 200 MiB-expert model built here
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "expertflow_compile", "assets", "tiny_mixtral")
PROMPTS = ["The Python standard library", "def main():", "import os", "Exceptions are raised"]
MODES = ["hf-resident", "hf-accelerate", "ef-lru", "ef-lookahead"]


def _medium_checkpoint(workdir: str) -> str:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    path = os.path.join(workdir, "mixtral_h512_i1024_e8_l4")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(SHIPPED).save_pretrained(path)
    return path


def _expert_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n)


def run_mode(mode: str, path: str, budget: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import expertflow_compile as ef

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    info: dict = {"mode": mode}
    if mode == "hf-resident":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        info["expert_bytes_resident"] = _expert_bytes(model)
    elif mode == "hf-accelerate":
        import tempfile

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        total, experts = sum(p.numel() * 4 for p in ref.parameters()), _expert_bytes(ref)
        del ref
        cap = int(total - experts + float(budget.rstrip("%")) / 100 * experts)
        offload = tempfile.mkdtemp(prefix="ef-accelerate-")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="auto", max_memory={"cpu": cap}, offload_folder=offload).eval()
        dm = getattr(model, "hf_device_map", {})
        info["device_map_disk_modules"] = sum(1 for v in dm.values() if v == "disk")
        on_cpu = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if p.dim() == 3 and "experts" in n and p.device.type == "cpu")
        info["expert_bytes_resident"] = on_cpu
    else:
        model = ef.from_pretrained(path, dtype=torch.float32)
        predictor = "lookahead" if mode == "ef-lookahead" else "none"
        model.compile(backend="expertflow", options={"expert_budget": budget, "predictor": predictor})
        with torch.no_grad():   # compile (every prompt length) outside the timed part
            for p in prompts:
                model.generate(p, max_new_tokens=3, do_sample=False, pad_token_id=0)
        ef.reset_stats(model)
    outs, n_tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        out = model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        outs.append(out[0].tolist())
        n_tokens += new_tokens
    dt = time.perf_counter() - t0
    info.update(tokens=n_tokens, seconds=dt, tokens_per_s=n_tokens / dt, outputs=outs,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if mode.startswith("ef-"):
        s = ef.stats(model)
        info.update(expert_bytes_resident=s["peak_cache_bytes"], hit_rate=s["hit_rate"],
                    ready_rate=s["ready_rate"], bytes_moved_per_token=s["bytes_moved"] / n_tokens,
                    stall_seconds=s["stall_seconds"], predictor_recall=s["predictor_recall"])
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["shipped", "medium"], default="shipped")
    ap.add_argument("--model", default=None, help="a local Mixtral-style checkpoint (overrides --size)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--workdir", default="/tmp/expertflow-bench")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "offload_speed.json"))
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)   # internal: run one mode
    args = ap.parse_args()
    path = args.model or (SHIPPED if args.size == "shipped" else _medium_checkpoint(args.workdir))
    if args.mode:
        print(json.dumps(run_mode(args.mode, path, args.budget, args.new_tokens)))
        return 0
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--model", path, "--budget", args.budget,
               "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({"mode": mode, "error": proc.stderr[-500:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next(r for r in results if r["mode"] == "hf-resident")
    print(f"model {path}, budget {args.budget}, {len(PROMPTS)} prompts x {args.new_tokens} new tokens, "
          f"1 thread per mode, CPU")
    head = f"{'mode':<15}{'tokens/s':>10}{'x resident':>12}{'expert MiB':>12}{'hit rate':>10}" \
           f"{'ready':>8}{'KiB moved/tok':>15}{'same tokens':>13}"
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<15} failed: {r['error'][-120:]!r}")
            continue
        same = r["outputs"] == base["outputs"]
        r["same_tokens_as_resident"] = same
        r["ratio_to_resident"] = r["tokens_per_s"] / base["tokens_per_s"]
        hit = f"{r['hit_rate']:.3f}" if "hit_rate" in r else "-"
        ready = f"{r['ready_rate']:.3f}" if "ready_rate" in r else "-"
        moved = f"{r['bytes_moved_per_token'] / 1024:.0f}" if "bytes_moved_per_token" in r else "-"
        print(f"{r['mode']:<15}{r['tokens_per_s']:>10.2f}{r['ratio_to_resident']:>12.3f}"
              f"{r['expert_bytes_resident'] / 2**20:>12.2f}{hit:>10}{ready:>8}{moved:>15}{str(same):>13}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": path, "budget": args.budget, "results": results}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
