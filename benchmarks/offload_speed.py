"""Decode speed and expert memory, side by side, one run, same model and prompts.

Modes (each in its own subprocess, 1 thread, compile excluded; see expertflow_compile/tools/bench.py):
  hf-resident      plain HF model, every expert in memory (the reference)
  hf-accelerate    HF + accelerate disk offload (device_map with a CPU memory cap + offload_folder)
  ef-lru           expertflow, experts on disk, LRU cache, no prediction
                   (the mixtral-offloading-without-speculation baseline)
  ef-lookahead     expertflow, experts on disk, LRU cache + lookahead prefetch

    python benchmarks/offload_speed.py                      # the shipped tiny model
    python benchmarks/offload_speed.py --model tiny_qwen2_moe   # the shipped fine-grained model
    python benchmarks/offload_speed.py --size medium        # a 200 MiB-expert model built here
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "expertflow_compile", "assets", "tiny_mixtral")


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


def main() -> int:
    from expertflow_compile.tools import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["shipped", "medium"], default="shipped")
    ap.add_argument("--model", default=None, help="a shipped model's name (tiny_mixtral, tiny_qwen2_moe) or a local "
                    "checkpoint directory (overrides --size)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--link-bandwidth", default=None, help='emulated host-device link, e.g. "1GB/s"')
    ap.add_argument("--workdir", default="/tmp/expertflow-bench")
    ap.add_argument("--json", default=None, help="default benchmarks/results/offload_speed[_MODEL].json")
    args = ap.parse_args()
    from expertflow_compile.assets import SHIPPED_MODELS, shipped_model_path

    if args.model in SHIPPED_MODELS and not os.path.isdir(args.model):
        path = shipped_model_path(args.model)
    else:
        path = args.model or (SHIPPED if args.size == "shipped" else _medium_checkpoint(args.workdir))
    if args.json is None:
        suffix = f"_{args.model}" if args.model in SHIPPED_MODELS and args.model != "tiny_mixtral" else ""
        args.json = os.path.join(ROOT, "benchmarks", "results", f"offload_speed{suffix}.json")
    bw = bench.parse_bandwidth(args.link_bandwidth)
    rows = bench.run_bench(path, [args.budget], bench.MODES, args.new_tokens, link_bandwidth=bw)
    print(f"model {path}, budget {args.budget}, {len(bench.DEFAULT_PROMPTS)} prompts x {args.new_tokens} new "
          f"tokens, 1 thread per mode, CPU" + (f", EMULATED link {args.link_bandwidth}" if bw else ""))
    print(bench.format_table(rows))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": path, "budget": args.budget, "link_bandwidth": bw, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
