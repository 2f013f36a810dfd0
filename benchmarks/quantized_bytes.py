"""Bytes moved per token when quantized experts stay compressed: block-FP8 and MXFP4 next to bf16.

Two models, each written twice with the SAME weights (``expertflow_compile.testing.checkpoints``):
as a bf16 checkpoint and as its quantized release.

* ``fp8``: DeepSeek-V3 layout (sigmoid group-limited routing, a shared expert), hidden 256,
  expert intermediate 256, 32 routed experts top-4, 4 MoE layers, block-FP8 128 x 128
  (``float8_e4m3fn`` + float32 ``weight_scale_inv``, as DeepSeek-V3/R1 ship).
* ``mxfp4``: GPT-OSS layout (biases, clamped SwiGLU), hidden 256, intermediate 256,
  32 experts top-4, 4 layers, MXFP4 ``*_blocks`` / ``*_scales`` experts (GPT-OSS's release).

Routing is spread as a trained router's (FACTS.md: embeddings ~ N(0, 1), router ~ N(0, 1),
attention output and expert down projections x 0.01) and decode is fed random tokens
(teacher forcing), so cache hits are not flattered. Each setting runs in its own process,
one thread: ``expertflow_compile.from_pretrained`` (bf16 compute), ``expert_budget`` either
25% of that checkpoint's own expert bytes (the same number of cache slots: the bytes per
load shrink) or the bf16 checkpoint's 25% in bytes (the same memory: the compressed
experts fit 2x / 3.8x as many slots, so fewer loads too), a 4-token prefill, then
``--tokens`` decode steps. Reported: bytes per expert, KiB moved per decode token, loads per
token, resident rate; and, once per quantized checkpoint, the first logits against
transformers' own (CPU-dequantized) load of it.

    python benchmarks/quantized_bytes.py                 # writes benchmarks/results/quantized_bytes.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SIZES = dict(num_layers=4, num_experts=32, top_k=4, hidden=256, inter=256)


def _spread(model) -> None:
    """Routing like a balanced trained router's (FACTS.md)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith(("mlp.gate.weight", "router.weight")):
                p.normal_(0.0, 1.0)
            elif name.endswith(("o_proj.weight", "experts.down_proj")):
                p.mul_(0.01)


def ensure(workdir: str, kind: str) -> dict:
    """The bf16 and the quantized checkpoint of ``kind`` (created once)."""
    import torch

    from expertflow_compile.testing.checkpoints import save_hub_layout, write_fp8_checkpoint, write_mxfp4_checkpoint
    from expertflow_compile.testing.tiny_models import build_tiny_model

    paths = {"bf16": os.path.join(workdir, f"{kind}_bf16"), kind: os.path.join(workdir, f"{kind}_{kind}")}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    family = "deepseek_v3" if kind == "fp8" else "gpt_oss"
    extra = dict(vocab_size=1024, num_attention_heads=4, num_key_value_heads=4 if kind == "fp8" else 2)
    model = build_tiny_model(family, seed=0, **SIZES, **extra)
    _spread(model)
    model = model.to(torch.bfloat16)
    save_hub_layout(model, paths["bf16"])
    if kind == "fp8":
        write_fp8_checkpoint(model, paths[kind], block=(128, 128))
    else:
        write_mxfp4_checkpoint(model, paths[kind])
    return paths


def child(path: str, budget: str, tokens: int, check: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    import expertflow_compile as ef

    out = {"path": path, "budget": budget}
    if check:   # first logits against transformers' own load (on CPU it dequantizes)
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ours = ef.from_pretrained(path, dtype=torch.float32)
        ours.compile(backend="expertflow", options={"expert_budget": "25%"})
        ids = torch.randint(0, ref.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = ref(ids).logits, ours(ids).logits
        out["fp32_max_abs_diff_vs_transformers"] = (got - want).abs().max().item()
        out["fp32_logit_scale"] = want.abs().max().item()
        del ref, ours
        torch._dynamo.reset()
    model = ef.from_pretrained(path, dtype=torch.bfloat16)
    store = model._expertflow_store
    spec = store.specs[min(store.specs)]
    out["expert_bytes"] = spec.expert_nbytes()
    out["expert_tensors"] = {n: [list(s), str(spec.tensor_dtype(n))] for n, s in spec.shapes.items()}
    out["total_expert_bytes"] = store.total_expert_bytes()
    model.compile(backend="expertflow", options={"expert_budget": budget})
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    with torch.no_grad():
        res = model(torch.randint(0, vocab, (1, 4), generator=g), use_cache=True)
        cache = res.past_key_values
        ef.reset_stats(model)
        for _ in range(tokens):
            res = model(torch.randint(0, vocab, (1, 1), generator=g), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
    s = ef.stats(model)
    out.update(budget_bytes=s["budget_bytes"], bytes_moved=s["bytes_moved"], loads=s["loads"],
               resident_rate=s["resident_rate"], tokens=tokens, kib_per_token=s["bytes_moved"] / tokens / 1024,
               loads_per_token=s["loads"] / tokens)
    return out


def run_child(path: str, budget: str, tokens: int, check: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--budget", budget, "--tokens", str(tokens)]
    if check:
        cmd.append("--check")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed for {path} at {budget}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/expertflow-bench/quantized")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quantized_bytes.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="25%", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.budget, args.tokens, args.check)), flush=True)
        return 0

    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for kind in ("fp8", "mxfp4"):
        paths = subprocess.run(
            [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
             "from quantized_bytes import ensure; print(json.dumps(ensure(sys.argv[2], sys.argv[3])))",
             HERE, args.workdir, kind],
            check=True, capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")).stdout.strip().splitlines()[-1]
        paths = json.loads(paths)
        bf16 = run_child(paths["bf16"], "25%", args.tokens, check=False)
        same_share = run_child(paths[kind], "25%", args.tokens, check=True)
        same_bytes = run_child(paths[kind], str(bf16["budget_bytes"]), args.tokens, check=False)
        for label, r in (("bf16", bf16), (f"{kind}, 25% of its bytes", same_share),
                         (f"{kind}, bf16's 25% in bytes", same_bytes)):
            rows.append(dict(model=kind, setting=label, **r))
    print(f"\n{'model':6} {'setting':30} {'B/expert':>9} {'x bf16':>7} {'budget':>10} {'KiB/token':>10} "
          f"{'loads/tok':>9} {'resident':>8}")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["setting"] == "bf16")
        print(f"{r['model']:6} {r['setting']:30} {r['expert_bytes']:9d} {base['expert_bytes'] / r['expert_bytes']:7.2f} "
              f"{r['budget_bytes'] / 2**20:8.2f}Mi {r['kib_per_token']:10.1f} {r['loads_per_token']:9.2f} "
              f"{r['resident_rate']:8.3f}")
    for r in rows:
        if "fp32_max_abs_diff_vs_transformers" in r:
            print(f"{r['model']}: fp32 logits vs transformers' load of the same checkpoint: max |diff| "
                  f"{r['fp32_max_abs_diff_vs_transformers']:.3g} (max |logit| {r['fp32_logit_scale']:.3g})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sizes": SIZES, "tokens": args.tokens, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
