"""The ``expertflow`` command.

Subcommands:
  bench   one run, same prompts: HF resident, HF + accelerate offload, expertflow
          LRU / lookahead at several budgets; a table, a JSON and a PNG
  run     generate with the shipped model (or --model) under an expert budget and
          print the text and the cache statistics next to the fully resident run
  graph   compile a model with the backend and print what was matched and rewritten
  simulate  project tokens/s and memory for real model sizes on a hardware profile
  trace / train-predictor / eval   routing traces and expert predictors

Bad input: every bad argument is one line on stderr, ``expertflow <command>: error:
<argument> <value>: <what is valid>``, and exit code 2, never a traceback. Values argparse
can check (ints, choices) are checked by their ``type=``; what needs a file or the model is
checked by the command before any long work, and errors raised deeper for a user's input
(a budget too small for the model, a checkpoint that does not load, a trace of another
model) are caught where that argument is used and re-raised as :class:`CLIError` naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .common import (  # noqa: F401 - SHIPPED_MODEL, CLIError, _load_checkpoint are imported from here too
    CLIError,
    _Parser,
    _one_line,
    _first_line,
    _int_at_least,
    _positive_float,
    _positive_int,
    _nonneg_int,
    _existing_file,
    _output_file,
    _read_text,
    _load_trace,
    _load_predictor,
    SHIPPED_MODEL,
    _shipped_or,
    _moe_config,
    _quiet_loading,
    _load_checkpoint,
)

__all__ = ["main"]


def _load_model(args):
    import torch

    from ..testing.tiny_models import FAMILIES, build_tiny_model

    if args.model:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isdir(args.model):
            raise CLIError(f"--model {args.model!r}: model path is not a directory")
        try:
            AutoConfig.from_pretrained(args.model)
        except Exception as exc:  # noqa: BLE001  (any load failure is a user error here)
            raise CLIError(f"--model {args.model!r}: cannot read a transformers config ({_first_line(exc)})") from None
        kwargs = {"experts_implementation": args.impl} if args.impl else {}
        try:
            with _quiet_loading():
                return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs).eval()
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"--model {args.model!r}: cannot load the checkpoint ({_first_line(exc)})") from None
    if args.family not in FAMILIES:
        raise CLIError(f"--family {args.family!r} is unknown; known: {', '.join(sorted(FAMILIES))}")
    return build_tiny_model(args.family, experts_implementation=args.impl)


def cmd_graph(args) -> int:
    import torch

    from .. import explain

    model = _load_model(args)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.seq_len > limit:
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context of {limit} tokens")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    report = explain(model, ids)
    print(report)
    if args.code:
        print()
        print(report.code)
    return 0


def _generate(model, ids, max_new_tokens: int, desc: str):
    import time

    from tqdm import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False, disable=None)   # only on a terminal

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
    from ..tools.schedule import generate_batched

    text = _read_text("--prompts-file", args.prompts_file)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise CLIError(f"--prompts-file {args.prompts_file!r} has no prompts; give one prompt per line")
    model, tok = _load_checkpoint(path)
    prompts = [tok(ln, return_tensors="pt").input_ids[0] for ln in lines]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise CLIError(f"--prompts-file {args.prompts_file!r}: prompt {empty[0] + 1} has no tokens")
    limit = model.config.max_position_embeddings
    too_long = [i for i, p in enumerate(prompts) if p.numel() + args.max_new_tokens > limit]
    if too_long:
        raise CLIError(f"--prompts-file: prompt {too_long[0] + 1} exceeds the model's context of {limit} tokens with "
                       f"--max-new-tokens {args.max_new_tokens}")
    refs = [model.generate(p[None], max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           do_sample=False, pad_token_id=0)[0, p.numel():] for p in prompts]
    model.compile(backend="expertflow", options=options)
    with _budget_is_the_cause(args.budget):
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
    print(f"  resident rate / ready rate                {s['resident_rate']:.3f} / {s['ready_rate']:.3f}")
    print(f"  loads (demand + speculative, wasted)      {s['demand_loads']} + {s['prefetch_loads']}, "
          f"{s['wasted_loads']} wasted")
    print(f"  MIN loads (Belady, same slots) / ratio    {_min_text(s)}")
    print(f"  bytes moved                               {s['bytes_moved'] / 2**20:.2f} MiB")
    print(f"  scheduling / generation time              {res.schedule_seconds:.2f} s / {res.generate_seconds:.2f} s")
    return 0


def _min_text(s: dict) -> str:
    if s.get("min_loads") is None:
        return "- (no routing log)"
    return f"{s['min_loads']} / x{s['loads_over_min']:.2f}" if s["min_loads"] else "0"


def _budget_option(text: str):
    """``--budget 3`` is the int form (experts per MoE layer, pooled); anything else a string."""
    return int(text) if str(text).strip().isdigit() else text


@contextlib.contextmanager
def _budget_is_the_cause(budget: str):
    """An OptionError raised while the model compiles is about --budget (the only option the
    model can refuse): name the argument."""
    from ..errors import OptionError

    try:
        yield
    except OptionError as exc:
        raise CLIError(f"--budget {budget!r}: {exc}") from None


def cmd_run(args) -> int:
    import torch

    import expertflow_compile as ef
    from ..config import ExpertFlowConfig, OptionError

    options = {"expert_budget": _budget_option(args.budget), "policy": args.policy, "predictor": args.predictor}
    try:
        ExpertFlowConfig.from_options(options)
    except OptionError as exc:
        raise CLIError(f"--budget {args.budget!r}: {exc}") from None
    path = _shipped_or(args.model)
    if args.prompts_file:
        return _run_batched(args, path, options)
    torch.manual_seed(0)
    model, tok = _load_checkpoint(path)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise CLIError(f"--prompt {args.prompt!r} has no tokens; give some text")
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:
        raise CLIError(f"--prompt of {ids.shape[1]} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
                       f"model's context of {limit} tokens")
    ref, t_ref = _generate(model, ids, args.max_new_tokens, "fully resident")
    model.compile(backend="expertflow", options=options)
    with _budget_is_the_cause(args.budget):   # the budget is checked against the model when it compiles
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
        ("resident rate / ready rate", f"{s['resident_rate']:.3f} / {s['ready_rate']:.3f} ({s['uses']} expert uses)"),
        ("predictor precision / recall",
         f"{s['predictor_precision']:.3f} / {s['predictor_recall']:.3f} ({args.predictor})"),
        ("prefetch precision (used / issued)",
         f"{s['prefetch_precision']:.3f} ({s['prefetch_used'] + s['prefetch_late']}/{s['prefetch_issued']})"),
        ("loads (demand + speculative, wasted)",
         f"{s['demand_loads']} + {s['prefetch_loads']} = {s['loads']}, {s['wasted_loads']} wasted"),
        ("MIN loads (Belady, same slots) / ratio", _min_text(s)),
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

    from ..tools import bench
    from ..config import ExpertFlowConfig, OptionError

    path = _shipped_or(args.model)
    _moe_config(path)
    try:
        bw = bench.parse_bandwidth(args.link_bandwidth)
    except ValueError:
        raise CLIError(f"--link-bandwidth {args.link_bandwidth!r} is not valid; give bytes per second > 0 like "
                       "'16GB/s', '500MB/s' or '2GiB/s'") from None
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise CLIError(f"--budgets {args.budgets!r} names no budget; give e.g. '12.5%,25%,50%'")
    for b in budgets:
        try:
            ExpertFlowConfig.from_options({"expert_budget": _budget_option(b)})
        except OptionError as exc:
            raise CLIError(f"--budgets: {b!r}: {exc}") from None
    explicit = args.modes is not None
    modes = [m.strip() for m in (args.modes or ",".join(bench.MODES)).split(",") if m.strip()]
    valid = bench.MODES + ("ef-path", "ef-oracle")
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        raise CLIError(f"--modes {args.modes!r}: unknown mode(s) {bad}; modes: {', '.join(valid)}")
    wants_file = [m for m in modes if m in ("ef-path", "ef-oracle")]
    if wants_file and not args.predictor_path:
        raise CLIError(f"--modes {','.join(wants_file)} needs --predictor-path (a path-predictor file for ef-path, "
                       "a routing trace for ef-oracle)")
    if args.predictor_path:
        if not wants_file:
            raise CLIError("--predictor-path is read only by the ef-path / ef-oracle modes; add one to --modes")
        _existing_file("--predictor-path", args.predictor_path, "a path-predictor file or a routing trace")
    if "hf-accelerate" in modes and any(not b.endswith("%") for b in budgets):
        raise CLIError(f"--budgets {args.budgets!r}: the hf-accelerate mode takes shares only (like '25%'); "
                       "leave it out of --modes for byte or int budgets")
    dropped = "hf-accelerate" in modes and not _importable("accelerate")
    if dropped:
        if explicit:
            raise CLIError("--modes hf-accelerate needs the accelerate package: "
                           "pip install 'expertflow-compile[bench]' (or leave that mode out)")
        modes.remove("hf-accelerate")
    if os.path.isfile(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a folder for bench.json and bench.png")
    if dropped:   # after every check: a bad argument stays one line
        print("expertflow bench: no hf-accelerate rows (accelerate is not installed: "
              "pip install 'expertflow-compile[bench]')", file=sys.stderr)
    rows = bench.run_bench(path, budgets, modes, args.new_tokens, link_bandwidth=bw,
                           predictor_path=args.predictor_path)
    link = f", emulated link {args.link_bandwidth} (EMULATED: loads sleep bytes/bandwidth)" if bw else ""
    title = (f"expertflow bench: {os.path.basename(os.path.normpath(path))}, {len(bench.DEFAULT_PROMPTS)} prompts "
             f"x {args.new_tokens} new tokens, 1 thread per mode{link}")
    print(title)
    print(bench.format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
    why_not = bench.plot(rows, os.path.join(args.out, "bench.png"), title)
    if why_not:
        print(f"wrote {json_path}; no bench.png: {why_not}")
    else:
        print(f"wrote {json_path} and bench.png")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _heldout_trace(tokens: int, name: str = "tiny_mixtral"):
    """Record shipped model ``name``'s routing on held-out text (never trained on)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import HELDOUT_TEXT, shipped_model_path
    from ..runtime.trace import record_routing

    path = shipped_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 10**9   # we cut the text into model-sized pieces ourselves
    text = open(HELDOUT_TEXT, encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    seq = 64
    n = max(1, tokens // seq)
    if ids.numel() < n * seq:
        raise CLIError(f"--tokens {tokens}: the held-out text has only {ids.numel()} tokens")
    batches = [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(n)]
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    trace = record_routing(model, batches, progress=True)
    trace.meta["shipped_model"] = name
    return trace


def _simulate_budgets(text: str) -> list[float]:
    """``--budgets 12.5%,25%``: shares of all expert bytes in (0%, 100%]."""
    from ..runtime.budget import parse_budget

    out = []
    for part in [p.strip() for p in text.split(",")]:
        try:
            b = parse_budget(part) if part.endswith("%") else None
        except ValueError:
            b = None
        if b is None:
            raise CLIError(f"--budgets {text!r}: {part!r} is not a share; use shares in (0%, 100%] like "
                           "'12.5%,25%,50%'")
        out.append(b.value)
    return out


def _routing_source(args, trace, shape) -> str:
    """What routing the projection replays, for its assumptions."""
    if not args.trace:
        name = trace.meta.get("shipped_model", "tiny_mixtral")
        e_src = max(trace.num_experts.values())
        unused = shape.num_experts - (shape.num_experts // e_src) * e_src
        spare = f"; {unused} of the {shape.num_experts} experts are never routed to" if unused else ""
        return (f"routing: the shipped {name}'s routing ({e_src} experts, "
                f"top-{max(trace.top_k.values())}) recorded on {trace.num_tokens} held-out tokens, mapped onto "
                f"this shape{spare} (see `expertflow_compile/tools/simulate.py`)")
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime.trace import fingerprint

    with _quiet_loading():
        shipped = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    whose = ("the shipped model's routing" if trace.fingerprint and trace.fingerprint == fingerprint(shipped)
             else f"routing of a {trace.meta.get('model_type') or 'unknown'} model (fingerprint "
                  f"{(trace.fingerprint or 'none')[:16]}...), not the shipped model's")
    return (f"routing: {whose}, from --trace {args.trace} ({trace.num_tokens} tokens, {len(trace.layers)} MoE layers, "
            f"{max(trace.num_experts.values())} experts, top-{max(trace.top_k.values())}), mapped onto this shape")


def cmd_simulate(args) -> int:
    import json
    import math

    from ..tools import simulate as sim

    if args.hardware not in sim.PROFILES:
        raise CLIError(f"--hardware {args.hardware!r} is unknown; known: {', '.join(sim.PROFILES)}")
    if args.model in sim.SHAPES:
        shape = sim.SHAPES[args.model]
    elif os.path.isfile(args.model):
        try:
            shape = sim.shape_from_config(args.model)
        except Exception as exc:  # noqa: BLE001  (the user's config file)
            raise CLIError(f"--model {args.model!r} is not a usable MoE config.json ({_first_line(exc)})") from None
    else:
        raise CLIError(f"--model {args.model!r} is neither a known shape ({', '.join(sim.SHAPES)}) "
                       "nor a config.json path")
    budgets = _simulate_budgets(args.budgets)
    least = shape.top_k / (shape.num_layers * shape.num_experts)      # one layer's top-k experts
    small = [b for b in budgets if math.floor(b * shape.num_layers * shape.num_experts + 1e-9) < shape.top_k]
    if small:
        raise CLIError(f"--budgets {args.budgets!r}: {small[0] * 100:g}% is below what one MoE layer of {shape.name} "
                       f"needs at once (its top-{shape.top_k} experts: >= {math.ceil(least * 10000) / 100:g}%)")
    if args.json:
        _output_file("--json", args.json)
    trace = _load_trace("--trace", args.trace) if args.trace else _heldout_trace(args.tokens, sim.trace_model_for(shape))
    profile = sim.PROFILES[args.hardware]
    rows = sim.simulate(trace, shape, profile, budgets, batch=args.batch, max_tokens=args.tokens)
    print(f"expertflow simulate: {shape.name} on {profile.name}, batch {args.batch} "
          f"(PROJECTION; assumptions below)")
    head = f"{'budget':>7} {'policy':<22}{'tokens/s':>10}{'x resident':>11}{'device GiB':>11}{'fits':>6}" \
           f"{'resident':>9}{'ready':>7}{'loads/tok':>10}{'/MIN':>7}{'stall':>7}"
    print(head)
    print("-" * len(head))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['budget']:>7} {r['predictor']:<22}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base:>11.3f}"
              f"{r['device_GiB']:>11.1f}{str(r['fits']):>6}{r['resident_rate']:>9.3f}{r['ready_rate']:>7.3f}"
              f"{r['loads_per_token']:>10.2f}"
              f"{('x%.2f' % r['loads_over_min']) if r.get('loads_over_min') else '-':>7}{r['stall_share']:>7.2f}")
    notes = sim.assumptions(shape, profile, _routing_source(args, trace, shape))
    print("assumptions:")
    for a in notes:
        print(f"  - {a}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape.__dict__, "profile": profile.__dict__, "rows": rows,
                       "assumptions": notes}, f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..config import POLICIES

    p = _Parser(prog="expertflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate under an expert budget and print cache statistics")
    r.add_argument("--model", default=None, help="a shipped model's name (tiny_mixtral, tiny_qwen2_moe) or a local "
                   "MoE checkpoint (default: the shipped tiny Mixtral)")
    r.add_argument("--budget", default="25%",
                   help='expert budget: "25%%", "2MiB", or an int n (n x MoE layers slots, shared by all layers)')
    r.add_argument("--policy", default="lru", choices=POLICIES, help="cache policy")
    r.add_argument("--predictor", default="lookahead", choices=("none", "lookahead"), help="expert predictor")
    r.add_argument("--prompt", default="The Python standard library", help="the prompt")
    r.add_argument("--max-new-tokens", type=_positive_int, default=32)
    r.add_argument("--prompts-file", default=None, help="many prompts, one per line (batched generation)")
    r.add_argument("--batch-size", type=_positive_int, default=8, help="with --prompts-file")
    r.add_argument("--schedule", default="routing", choices=["routing", "arrival"],
                   help="with --prompts-file: group prompts by routing, or keep arrival order")
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="side-by-side decode benchmark: HF resident, accelerate, expertflow")
    b.add_argument("--model", default=None, help="a shipped model's name (tiny_mixtral, tiny_qwen2_moe) or a local "
                   "MoE checkpoint (default: the shipped tiny Mixtral)")
    b.add_argument("--budgets", default="12.5%,25%,50%", help="comma-separated expert budgets")
    b.add_argument("--modes", default=None, help="comma-separated, from hf-resident, hf-accelerate, ef-lru, "
                   "ef-lookahead, ef-predictive-lookahead, ef-path, ef-oracle (default: the first five; hf-accelerate "
                   "needs the bench extra)")
    b.add_argument("--new-tokens", type=_positive_int, default=16)
    b.add_argument("--link-bandwidth", default=None, help='emulate a host-device link, e.g. "2GB/s"')
    b.add_argument("--predictor-path", default=None, help="for ef-path / ef-oracle modes")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("simulate", help="project tokens/s and memory of real model sizes on a hardware profile")
    m.add_argument("--model", default="mixtral-8x7b",
                   help="mixtral-8x7b, qwen3-30b-a3b, deepseek-v3, or a path to an HF config.json")
    m.add_argument("--hardware", default="rtx4090-pcie4", help="rtx4090-pcie4, a100-pcie4, h200-pcie5, laptop-nvme")
    m.add_argument("--budgets", default="12.5%,25%,50%", help="shares of all expert bytes, in (0%%, 100%%]")
    m.add_argument("--batch", type=_positive_int, default=1)
    m.add_argument("--tokens", type=_positive_int, default=256, help="routing tokens to replay")
    m.add_argument("--trace", default=None, help="a recorded routing trace (default: record the shipped model "
                                                  "on held-out text)")
    m.add_argument("--json", default=None)
    m.set_defaults(func=cmd_simulate)
    g = sub.add_parser("graph", help="print the MoE blocks the backend finds and the rewritten graph")
    g.add_argument("--family", default="mixtral", help="a built-in tiny model family (default: mixtral)")
    g.add_argument("--model", default=None, help="a local Hugging Face checkpoint directory instead")
    g.add_argument("--impl", default=None, choices=["grouped_mm", "batched_mm", "eager"],
                   help="transformers experts implementation (default: the model's)")
    g.add_argument("--seq-len", type=_positive_int, default=8)
    g.add_argument("--code", action="store_true", help="also print the rewritten graph's code")
    g.set_defaults(func=cmd_graph)
    from .predict import add_commands

    add_commands(sub)   # trace, train-predictor, eval
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for any bad argument, with one line on stderr)."""
    from ..errors import OptionError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # argparse: --help (0) or a bad argument (2, its one line printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CLIError, OptionError) as exc:
        print(f"expertflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
