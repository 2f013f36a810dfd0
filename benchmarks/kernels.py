"""Fused Triton MoE kernels vs ``grouped_mm`` and a per-expert matmul loop, on real layer shapes.

For each layer shape (bf16, random weights and routing) and token count it first
checks the Triton result against the per-expert loop (and the loop against the torch
reference at 16 tokens), then times, with CUDA events, one whole routed-expert layer:

* ``triton``: ``triton_grouped_experts`` (align + fused up/act + fused down/weight + sum over k);
* ``grouped_mm``: sort pairs, gather rows, ``torch.nn.functional.grouped_mm`` (or
  ``torch._grouped_mm``) for up and down, SiLU-GLU and routing weight in torch, combine;
* ``loop``: the same per expert with ``offsets.tolist()`` and two matmuls per expert
  (what the engine's torch path does).

Reported per row: time, TFLOP/s (``2 * T*K * (H*2I + I*H)``), achieved bandwidth
(bytes of the active experts' weights + the hidden input and output, / time) and the
speed-ups of Triton over both baselines. L2 is not flushed between iterations (the
active weights of every shape but the smallest decode cases exceed H200's 50 MB L2).

    python benchmarks/kernels.py                      # all shapes, writes benchmarks/results/kernels.json
    python benchmarks/kernels.py --models qwen3-30b-a3b --tokens 1 128
    python benchmarks/kernels.py --tune               # also sweep a few configs, write kernels/configs/<device>.json
    python benchmarks/kernels.py --interpret-smoke    # no GPU: one tiny shape under TRITON_INTERPRET=1
                                                      # (writes JSON only with --out)

Without CUDA (and without ``--interpret-smoke``) it prints "no CUDA device: not
measured" and exits 0. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODELS = {
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, K=2),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, K=8),
    "deepseek-v3": dict(H=7168, I=2048, E=256, K=8),
}
TOKENS = [1, 16, 128, 1024, 8192]
DEFAULT_OUT = os.path.join(HERE, "results", "kernels.json")


# ----------------------------------------------------------------------------- layer

def make_layer(H, I, E, dtype, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    up = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype).mul_(1 / math.sqrt(H))
    down = torch.randn(E, H, I, generator=g, device=device, dtype=dtype).mul_(1 / math.sqrt(I))
    return up, down


def make_routing(T, H, E, K, dtype, device, seed=1):
    import torch

    g = torch.Generator(device=device).manual_seed(seed + T)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    logits = torch.randn(T, E, generator=g, device=device)
    vals, ids = logits.topk(K, dim=-1)
    return x, ids, torch.softmax(vals, -1).to(dtype)


def silu_glu(h):
    import torch.nn.functional as F

    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def _grouped_mm_fn():
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def grouped_mm_layer(x, ids, w, up, down):
    """Baseline: permute + gather rows, grouped_mm up, SiLU-GLU, grouped_mm down, weight, combine."""
    import torch

    T, K = ids.shape
    E = up.shape[0]
    gmm = _grouped_mm_fn()
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // K]
    h = silu_glu(gmm(xs, up.transpose(-2, -1), offs=offs))
    y = gmm(h, down.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1)[order].unsqueeze(-1)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(T, K, -1).sum(1)


def loop_layer(x, ids, w, up, down):
    """Baseline: one expert at a time (host sync for the offsets), two matmuls per expert."""
    import torch

    T, K = ids.shape
    E = up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = [0] + torch.bincount(flat, minlength=E).cumsum(0).tolist()
    xs = x[order // K]
    rows = torch.empty(T * K, x.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        s, t = offs[e], offs[e + 1]
        if s < t:
            rows[s:t] = silu_glu(xs[s:t] @ up[e].t()) @ down[e].t()
    rows = rows * w.reshape(-1)[order].unsqueeze(-1)
    out = torch.empty_like(rows)
    out[order] = rows
    return out.view(T, K, -1).sum(1)


def triton_layer(x, ids, w, up, down, config=None):
    from expertflow_compile.kernels.triton_moe import triton_grouped_experts

    return triton_grouped_experts(x, ids, w, up, down, kind="silu_glu", up_transposed=False,
                                  down_transposed=False, config=config)


def reference_layer(x, ids, w, up, down):
    """The engine's torch reference (expertflow_compile.kernels.reference)."""
    from expertflow_compile.kernels.reference import grouped_experts_reference
    from expertflow_compile.layer import ExpertMath
    from expertflow_compile.compiler.ops import permute

    order, offsets = permute(ids, up.shape[0])
    math_ = ExpertMath(False, False, silu_glu)
    return grouped_experts_reference(x, w, order, offsets.tolist(),
                                     lambda e: {"up": up[e], "down": down[e]}, math_, x.shape[1], x.dtype)


def max_err(out, ref):
    """Max |out - ref| relative to max |ref|."""
    d = (out.float() - ref.float()).abs().max().item()
    return d / max(ref.float().abs().max().item(), 1e-6)


# ----------------------------------------------------------------------------- timing

def cuda_time_ms(fn, budget_s=0.25, min_iters=3, max_iters=50):
    """Median of per-iteration CUDA-event times (after warm-up, incl. compilation)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-5)
    iters = int(min(max_iters, max(min_iters, budget_s / est)))
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cpu_time_ms(fn, iters=1):
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def layer_metrics(T, H, I, K, ids, itemsize, ms):
    active = int(ids.unique().numel())
    flops = 2 * T * K * (H * 2 * I + I * H)
    nbytes = active * (2 * I * H + H * I) * itemsize + 2 * T * H * itemsize
    sec = ms / 1e3
    return dict(active_experts=active, flops=flops, bytes=nbytes,
                tflops=flops / sec / 1e12 if sec > 0 else None,
                gbps=nbytes / sec / 1e9 if sec > 0 else None)


# ----------------------------------------------------------------------------- runs

def measure_shape(name, shape, tokens, dtype, device, timer, tol, config=None, log=print):
    """Correctness checks then timings for one layer shape; returns (rows, ok)."""
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    up, down = make_layer(H, I, E, dtype, device)
    rows, ok = [], True

    # correctness first: loop vs the torch reference, Triton and grouped_mm vs the loop
    x, ids, w = make_routing(16, H, E, K, dtype, device)
    ref = reference_layer(x, ids, w, up, down)
    loop = loop_layer(x, ids, w, up, down)
    tri = triton_layer(x, ids, w, up, down, config)
    errs = {"loop_vs_reference": max_err(loop, ref), "triton_vs_reference": max_err(tri, ref)}
    if _grouped_mm_fn() is not None:
        try:
            errs["grouped_mm_vs_reference"] = max_err(grouped_mm_layer(x, ids, w, up, down), ref)
        except Exception as exc:  # noqa: BLE001 - report, keep going
            errs["grouped_mm_vs_reference"] = f"error: {exc}"[:200]
    bad = {k: v for k, v in errs.items() if isinstance(v, float) and v > tol}
    if bad.get("triton_vs_reference") is not None:
        log(f"{name}: CORRECTNESS FAILED {errs}")
        return [dict(model=name, tokens=16, correct=False, errors=errs)], False
    log(f"{name}: correct at 16 tokens (relative max error {errs})")

    for T in tokens:
        x, ids, w = make_routing(T, H, E, K, dtype, device)
        loop = loop_layer(x, ids, w, up, down)
        tri = triton_layer(x, ids, w, up, down, config)
        err = max_err(tri, loop)
        row = dict(model=name, H=H, I=I, E=E, K=K, tokens=T, dtype=str(dtype).removeprefix("torch."),
                   triton_vs_loop_err=err, correct=err <= tol)
        if err > tol:
            ok = False
            log(f"{name} T={T}: Triton differs from the loop (relative {err:.3g}); not timed")
            rows.append(row)
            continue
        t_tri = timer(lambda: triton_layer(x, ids, w, up, down, config))
        t_loop = timer(lambda: loop_layer(x, ids, w, up, down))
        t_gmm, gmm_err = None, None
        if _grouped_mm_fn() is not None:
            try:
                t_gmm = timer(lambda: grouped_mm_layer(x, ids, w, up, down))
            except Exception as exc:  # noqa: BLE001
                gmm_err = f"{type(exc).__name__}: {exc}"[:200]
        m = layer_metrics(T, H, I, K, ids, up.element_size(), t_tri)
        row.update(triton_ms=t_tri, loop_ms=t_loop, grouped_mm_ms=t_gmm, **m,
                   speedup_vs_loop=t_loop / t_tri,
                   speedup_vs_grouped_mm=(t_gmm / t_tri) if t_gmm else None)
        if gmm_err:
            row["grouped_mm_error"] = gmm_err
        rows.append(row)
        log(f"{name:14s} T={T:5d}  triton {t_tri:9.3f} ms  {m['tflops']:7.2f} TFLOP/s  {m['gbps']:8.1f} GB/s  "
            f"x{row['speedup_vs_loop']:.2f} vs loop  "
            + (f"x{row['speedup_vs_grouped_mm']:.2f} vs grouped_mm" if t_gmm else f"grouped_mm: {gmm_err}"))
    return rows, ok


def tune_shape(name, shape, dtype, device, timer, tokens=(16, 1024), log=print):
    """Pick, among a few configs, the one with the best geometric-mean time over ``tokens``.

    One config per shape for every token count (configs never depend on T).
    """
    from expertflow_compile.kernels.triton_moe import KernelConfig, MoEConfig, default_moe_config

    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    up, down = make_layer(H, I, E, dtype, device)
    base = default_moe_config(H, I, E, dtype)
    cands = [base]
    for bm in (16, 32, 64):
        for up_n, up_k, warps in ((64, 64, 4), (128, 64, 8), (64, 128, 4)):
            cands.append(MoEConfig(BLOCK_M=bm, up=KernelConfig(up_n, up_k, 8, warps, 3),
                                   down=KernelConfig(128, 64, 8, 8 if H >= 2048 else 4, 3)))
    data = [make_routing(T, H, E, K, dtype, device) for T in tokens]
    best, best_t = None, math.inf
    for cfg in dict.fromkeys(cands):
        try:
            times = [timer(lambda: triton_layer(x, ids, w, up, down, cfg)) for x, ids, w in data]
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
            log(f"  {name}: config {cfg} failed: {type(exc).__name__}")
            continue
        gm = math.exp(sum(math.log(t) for t in times) / len(times))
        log(f"  {name}: BLOCK_M={cfg.BLOCK_M} up={cfg.up.BLOCK_N}x{cfg.up.BLOCK_K}/{cfg.up.num_warps}w "
            f"-> {' '.join(f'{t:.3f}' for t in times)} ms")
        if gm < best_t:
            best, best_t = cfg, gm
    return best


def environment(device):
    import torch

    env = dict(torch=torch.__version__, python=sys.version.split()[0])
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        env["device"] = "cpu (Triton interpreter)"
    return env


# ----------------------------------------------------------------------------- main

def interpret_smoke(args) -> int:
    """A tiny shape through the whole script under the Triton interpreter (no GPU needed)."""
    os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported
    import torch

    from expertflow_compile.kernels.triton_moe import KernelConfig, MoEConfig

    small = MoEConfig(BLOCK_M=16, up=KernelConfig(16, 16, 4, 1, 1), down=KernelConfig(16, 16, 4, 1, 1))
    shape = dict(H=40, I=24, E=4, K=2)
    torch.manual_seed(0)
    rows, ok = measure_shape("smoke", shape, [1, 5], torch.float32, torch.device("cpu"), cpu_time_ms,
                             tol=1e-4, config=small)
    result = dict(measured=False, note="interpreter smoke run: times are CPU interpreter times, not kernel times",
                  env=environment(torch.device("cpu")), results=rows)
    if args.out:                                   # never overwrites the GPU results by default
        _write(args.out, result)
    print(f"interpret smoke: {'OK' if ok else 'FAILED'}" + (f" (wrote {args.out})" if args.out else ""))
    return 0 if ok else 1


def _write(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT})")
    p.add_argument("--tune", action="store_true",
                   help="sweep a few configs per shape first and write kernels/configs/<device>.json")
    p.add_argument("--tol", type=float, default=3e-2, help="max relative error accepted (bf16)")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="run one tiny shape under TRITON_INTERPRET=1 on CPU to prove the script works")
    args = p.parse_args(argv)

    if args.interpret_smoke:
        return interpret_smoke(args)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: not measured")
        return 0
    device = torch.device("cuda")
    dtype = torch.bfloat16
    env = environment(device)
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}")
    if _grouped_mm_fn() is None:
        print("torch has no grouped_mm: that baseline is skipped")

    configs = {}
    if args.tune:
        from expertflow_compile.kernels import triton_moe as tm

        tuned = {}
        for name in args.models:
            s = MODELS[name]
            best = tune_shape(name, s, dtype, device, cuda_time_ms)
            if best is not None:
                configs[name] = best
                tuned[tm.config_key(s["H"], s["I"], s["E"], dtype)] = best.as_dict()
        path = tm.CONFIG_DIR / tm._device_file_name(env["device"])
        existing = json.loads(path.read_text()) if path.is_file() else {}
        existing.update(tuned)
        _write(str(path), existing)
        print(f"tuned configs written to {path}")

    all_rows, ok = [], True
    from expertflow_compile.kernels.triton_moe import get_moe_config

    used_configs = {}
    for name in args.models:
        s = MODELS[name]
        cfg = configs.get(name) or get_moe_config(s["H"], s["I"], s["E"], dtype, device)
        used_configs[name] = cfg.as_dict()
        rows, good = measure_shape(name, s, args.tokens, dtype, device, cuda_time_ms, args.tol, cfg)
        all_rows += rows
        ok &= good
        torch.cuda.empty_cache()
    out = args.out or DEFAULT_OUT
    _write(out, dict(measured=True, env=env, dtype="bfloat16", configs=used_configs, results=all_rows))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
