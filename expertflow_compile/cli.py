"""The ``expertflow`` command.

Subcommands:
  bench   one run, same prompts: HF resident, HF + accelerate offload, expertflow
          LRU / lookahead at several budgets; a table, a JSON and a PNG
  run     generate with the shipped model (or --model) under an expert budget and
          print the text and the cache statistics next to the fully resident run
  graph   compile a model with the backend and print what was matched and rewritten
  simulate  project tokens/s and memory for real model sizes on a hardware profile
  trace / train-predictor / eval   routing traces and expert predictors
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _load_model(args):
    import torch

    from .testing.tiny_models import FAMILIES, build_tiny_model

    if args.model:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isdir(args.model):
            raise CLIError(f"model path {args.model!r} is not a directory")
        try:
            AutoConfig.from_pretrained(args.model)
        except Exception as exc:  # noqa: BLE001  (any load failure is a user error here)
            raise CLIError(f"cannot read a transformers config from {args.model!r}: {exc}") from None
        kwargs = {"experts_implementation": args.impl} if args.impl else {}
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs).eval()
        return model
    if args.family not in FAMILIES:
        raise CLIError(f"unknown family {args.family!r}; known: {', '.join(sorted(FAMILIES))}")
    return build_tiny_model(args.family, experts_implementation=args.impl)


def cmd_graph(args) -> int:
    import torch

    from . import explain

    model = _load_model(args)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    report = explain(model, ids)
    print(report)
    if args.code:
        print()
        print(report.code)
    return 0


SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), "assets", "tiny_mixtral")


def _shipped_or(path: str | None) -> str:
    path = path or SHIPPED_MODEL
    if not os.path.isdir(path):
        raise CLIError(f"model path {path!r} is not a directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CLIError(f"{path!r} has no config.json: not a Hugging Face checkpoint")
    return path


def _load_checkpoint(path: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"cannot read a transformers config from {path!r}: {exc}") from None
    if not any(hasattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise CLIError(f"{path!r} is not a Mixture-of-Experts model ({type(cfg).__name__} has no experts)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _generate(model, ids, max_new_tokens: int, desc: str):
    import time

    from tqdm import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False)

    class _Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            bar.update(1)
            return False

    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([_Tick()]),
                         pad_token_id=model.config.eos_token_id)
    dt = time.perf_counter() - t0
    bar.close()
    return out, dt


def _run_batched(args, path: str, options: dict) -> int:
    """``run --prompts-file``: many prompts, batches of --batch-size formed by --schedule."""
    import torch

    import expertflow_compile as ef
    from .schedule import generate_batched

    if not os.path.isfile(args.prompts_file):
        raise CLIError(f"prompts file {args.prompts_file!r} does not exist")
    lines = [ln.strip() for ln in open(args.prompts_file, encoding="utf-8") if ln.strip()]
    if not lines:
        raise CLIError(f"prompts file {args.prompts_file!r} has no prompts")
    model, tok = _load_checkpoint(path)
    prompts = [tok(ln, return_tensors="pt").input_ids[0] for ln in lines]
    limit = model.config.max_position_embeddings
    too_long = [i for i, p in enumerate(prompts) if p.numel() + args.max_new_tokens > limit]
    if too_long:
        raise CLIError(f"prompt {too_long[0] + 1} exceeds the model's context of {limit} tokens with "
                       f"{args.max_new_tokens} new tokens")
    refs = [model.generate(p[None], max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           do_sample=False, pad_token_id=0)[0, p.numel():] for p in prompts]
    model.compile(backend="expertflow", options=options)
    res = generate_batched(model, prompts, batch_size=args.batch_size, schedule=args.schedule,
                           max_new_tokens=args.max_new_tokens)
    s = ef.stats(model)
    for line, out in zip(lines, res.outputs):
        print(f"> {line}\n{tok.decode(out, skip_special_tokens=True)}\n")
    same = all(torch.equal(a, b) for a, b in zip(res.outputs, refs))
    print(f"expertflow run: {len(prompts)} prompts, batch {args.batch_size}, schedule {args.schedule}, "
          f"budget {args.budget}, policy {args.policy}")
    print(f"  same tokens as one-by-one fully resident  {same}")
    print(f"  batches                                   {res.batches}")
    print(f"  hit rate                                  {s['hit_rate']:.3f}")
    print(f"  bytes moved                               {s['bytes_moved'] / 2**20:.2f} MiB")
    print(f"  scheduling / generation time              {res.schedule_seconds:.2f} s / {res.generate_seconds:.2f} s")
    return 0


def cmd_run(args) -> int:
    import torch

    import expertflow_compile as ef
    from .config import ExpertFlowConfig

    try:
        budget = int(args.budget) if str(args.budget).isdigit() else args.budget
        options = {"expert_budget": budget, "policy": args.policy, "predictor": args.predictor}
        ExpertFlowConfig.from_options(options)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    path = _shipped_or(args.model)
    if args.prompts_file:
        return _run_batched(args, path, options)
    torch.manual_seed(0)
    model, tok = _load_checkpoint(path)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:
        raise CLIError(f"prompt of {ids.shape[1]} tokens + {args.max_new_tokens} new tokens exceeds the "
                       f"model's context of {limit} tokens")
    ref, t_ref = _generate(model, ids, args.max_new_tokens, "fully resident")
    model.compile(backend="expertflow", options=options)
    _generate(model, ids, 4, "compiling")   # compile (prefill, decode, dynamic shapes) outside the timed run
    ef.reset_stats(model)
    out, t_ours = _generate(model, ids, args.max_new_tokens, f"expertflow {args.budget}")
    s = ef.stats(model)
    print(tok.decode(out[0], skip_special_tokens=True))
    print()
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if p.dim() == 3 and "experts" in n)
    rows = [
        ("same tokens as fully resident", str(torch.equal(out, ref))),
        ("expert memory (budget / all experts)",
         f"{s['budget_bytes'] / 2**20:.2f} MiB / {total / 2**20:.2f} MiB ({100 * s['budget_bytes'] / max(total, 1):.0f}%)"),
        ("peak expert cache", f"{s['peak_cache_bytes'] / 2**20:.2f} MiB"),
        ("hit rate", f"{s['hit_rate']:.3f}"),
        ("ready rate", f"{s['ready_rate']:.3f}"),
        ("predictor precision / recall",
         f"{s['predictor_precision']:.3f} / {s['predictor_recall']:.3f} ({args.predictor})"),
        ("prefetch precision (used / issued)",
         f"{s['prefetch_precision']:.3f} ({s['prefetch_used'] + s['prefetch_late']}/{s['prefetch_issued']})"),
        ("loads (demand + prefetch)", f"{s['demand_loads']} + {s['prefetch_loads']}"),
        ("bytes moved", f"{s['bytes_moved'] / 2**20:.2f} MiB ({s['bytes_moved'] / args.max_new_tokens / 2**10:.1f} KiB/token)"),
        ("stall time", f"{s['stall_seconds']:.3f} s"),
        ("tokens/s (expertflow / resident)",
         f"{args.max_new_tokens / t_ours:.1f} / {args.max_new_tokens / t_ref:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"expertflow run: {os.path.basename(os.path.normpath(path))}, budget {args.budget}, policy {args.policy}, "
          f"predictor {args.predictor}, "
          f"{args.max_new_tokens} new tokens")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def cmd_bench(args) -> int:
    import json

    from . import bench

    path = _shipped_or(args.model)
    try:
        bw = bench.parse_bandwidth(args.link_bandwidth)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    for b in budgets:
        try:
            ExpertFlowConfig_check(b)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in modes if m not in bench.MODES + ("ef-path", "ef-oracle")]
    if bad:
        raise CLIError(f"unknown mode(s) {bad}; modes: {', '.join(bench.MODES)}, ef-path, ef-oracle")
    rows = bench.run_bench(path, budgets, modes, args.new_tokens, link_bandwidth=bw,
                           predictor_path=args.predictor_path)
    link = f", emulated link {args.link_bandwidth} (EMULATED: loads sleep bytes/bandwidth)" if bw else ""
    title = (f"expertflow bench: {os.path.basename(os.path.normpath(path))}, {len(bench.DEFAULT_PROMPTS)} prompts "
             f"x {args.new_tokens} new tokens, 1 thread per mode{link}")
    print(title)
    print(bench.format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
    bench.plot(rows, os.path.join(args.out, "bench.png"), title)
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.png")
    return 0


def _heldout_trace(tokens: int):
    """Record the shipped model's routing on held-out text (never trained on)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .runtime.trace import record_routing

    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    tok.model_max_length = 10**9   # we cut the text into model-sized pieces ourselves
    text = open(os.path.join(os.path.dirname(SHIPPED_MODEL), "heldout.txt"), encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    seq = 64
    n = max(1, tokens // seq)
    if ids.numel() < n * seq:
        raise CLIError(f"held-out text has only {ids.numel()} tokens")
    batches = [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    return record_routing(model, batches, progress=True)


def cmd_simulate(args) -> int:
    import json

    from . import simulate as sim

    if args.hardware not in sim.PROFILES:
        raise CLIError(f"unknown hardware profile {args.hardware!r}; known: {', '.join(sim.PROFILES)}")
    if args.model in sim.SHAPES:
        shape = sim.SHAPES[args.model]
    elif os.path.isfile(args.model):
        try:
            shape = sim.shape_from_config(args.model)
        except (KeyError, ValueError) as exc:
            raise CLIError(f"{args.model}: {exc}") from None
    else:
        raise CLIError(f"--model {args.model!r} is neither a known shape ({', '.join(sim.SHAPES)}) "
                       "nor a config.json path")
    try:
        budgets = [float(b.strip().rstrip("%")) / 100 for b in args.budgets.split(",")]
    except ValueError:
        raise CLIError(f"--budgets {args.budgets!r}: use shares like '12.5%,25%,50%'") from None
    if args.trace:
        from .runtime.trace import RoutingTrace

        trace = RoutingTrace.load(args.trace)
    else:
        trace = _heldout_trace(args.tokens)
    profile = sim.PROFILES[args.hardware]
    rows = sim.simulate(trace, shape, profile, budgets, batch=args.batch, max_tokens=args.tokens)
    print(f"expertflow simulate: {shape.name} on {profile.name}, batch {args.batch} "
          f"(PROJECTION; assumptions below)")
    head = f"{'budget':>7} {'policy':<22}{'tokens/s':>10}{'x resident':>11}{'device GiB':>11}{'fits':>6}" \
           f"{'ready':>7}{'loads/tok':>10}{'stall':>7}"
    print(head)
    print("-" * len(head))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['budget']:>7} {r['predictor']:<22}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base:>11.3f}"
              f"{r['device_GiB']:>11.1f}{str(r['fits']):>6}{r['ready_rate']:>7.3f}{r['loads_per_token']:>10.2f}"
              f"{r['stall_share']:>7.2f}")
    print("assumptions:")
    for a in sim.assumptions(shape, profile):
        print(f"  - {a}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape.__dict__, "profile": profile.__dict__, "rows": rows,
                       "assumptions": sim.assumptions(shape, profile)}, f, indent=1)
    return 0


def ExpertFlowConfig_check(budget: str) -> None:
    from .config import ExpertFlowConfig

    ExpertFlowConfig.from_options({"expert_budget": int(budget) if budget.isdigit() else budget})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate under an expert budget and print cache statistics")
    r.add_argument("--model", default=None, help="a local MoE checkpoint (default: the shipped tiny Mixtral)")
    r.add_argument("--budget", default="25%", help='expert budget: "25%%", "2MiB" or experts per layer')
    r.add_argument("--policy", default="lru", help="cache policy: lru, lfu or predictive")
    r.add_argument("--predictor", default="lookahead", help="expert predictor: none or lookahead")
    r.add_argument("--prompt", default="The Python standard library", help="the prompt")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--prompts-file", default=None, help="many prompts, one per line (batched generation)")
    r.add_argument("--batch-size", type=int, default=8, help="with --prompts-file")
    r.add_argument("--schedule", default="routing", choices=["routing", "arrival"],
                   help="with --prompts-file: group prompts by routing, or keep arrival order")
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="side-by-side decode benchmark: HF resident, accelerate, expertflow")
    b.add_argument("--model", default=None, help="a local MoE checkpoint (default: the shipped tiny Mixtral)")
    b.add_argument("--budgets", default="12.5%,25%,50%", help="comma-separated expert budgets")
    b.add_argument("--modes", default=",".join(("hf-resident", "hf-accelerate", "ef-lru", "ef-lookahead")))
    b.add_argument("--new-tokens", type=int, default=16)
    b.add_argument("--link-bandwidth", default=None, help='emulate a host-device link, e.g. "2GB/s"')
    b.add_argument("--predictor-path", default=None, help="for ef-path / ef-oracle modes")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("simulate", help="project tokens/s and memory of real model sizes on a hardware profile")
    m.add_argument("--model", default="mixtral-8x7b",
                   help="mixtral-8x7b, qwen3-30b-a3b, deepseek-v3, or a path to an HF config.json")
    m.add_argument("--hardware", default="rtx4090-pcie4", help="rtx4090-pcie4, a100-pcie4, h200-pcie5, laptop-nvme")
    m.add_argument("--budgets", default="12.5%,25%,50%")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--tokens", type=int, default=256, help="routing tokens to replay")
    m.add_argument("--trace", default=None, help="a recorded routing trace (default: record the shipped model "
                                                  "on held-out text)")
    m.add_argument("--json", default=None)
    m.set_defaults(func=cmd_simulate)
    g = sub.add_parser("graph", help="print the MoE blocks the backend finds and the rewritten graph")
    g.add_argument("--family", default="mixtral", help="a built-in tiny model family (default: mixtral)")
    g.add_argument("--model", default=None, help="a local Hugging Face checkpoint directory instead")
    g.add_argument("--impl", default=None, choices=["grouped_mm", "batched_mm", "eager"],
                   help="transformers experts implementation (default: the model's)")
    g.add_argument("--seq-len", type=int, default=8)
    g.add_argument("--code", action="store_true", help="also print the rewritten graph's code")
    g.set_defaults(func=cmd_graph)
    from .cli_predict import add_commands

    add_commands(sub)   # trace, train-predictor, eval
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"expertflow: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"expertflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
