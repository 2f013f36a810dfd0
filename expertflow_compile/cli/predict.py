"""``expertflow trace``, ``expertflow train-predictor`` and ``expertflow eval``.

``add_commands(subparsers)`` registers them on the ``expertflow`` parser (main.py):

  trace            text file -> routing trace (safetensors)
  train-predictor  routing trace -> path-predictor file; prints validation precision/recall
  eval             held-out trace (or text) + predictor -> prediction quality and cache
                   replay tables (LRU, LFU, predictive + lookahead/path/oracle, MIN)

The evaluation itself is :mod:`~expertflow_compile.tools.evaluate` (benchmarks/prediction.py calls it too).
"""

from __future__ import annotations

import json
import os

from ..tools.evaluate import acceptance, evaluate, format_acceptance, format_tables, text_batches

__all__ = ["add_commands"]


def _load(path: str | None):
    from .common import _load_checkpoint, _shipped_or

    return _load_checkpoint(_shipped_or(path))


def _batches(tok, text: str, text_arg: str, args, **kw):
    """text_batches with its user errors (too little text, a sequence longer than the model's
    context) named by argument."""
    from .common import CLIError

    try:
        return text_batches(tok, text, seq_len=args.seq_len, **kw)
    except ValueError as exc:
        raise CLIError(f"{text_arg}: {exc} (--seq-len {args.seq_len})") from None


def _check_seq_len(model, args) -> None:
    from .common import CLIError

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.seq_len > limit:
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context of {limit} tokens")


# ----------------------------------------------------------------------------- commands


def cmd_trace(args) -> int:
    import torch

    from .common import _output_file, _read_text
    from ..runtime.trace import record_routing

    text = _read_text("TEXT", args.text)
    _output_file("--out", args.out)
    torch.manual_seed(0)
    model, tok = _load(args.model)
    _check_seq_len(model, args)
    batches = _batches(tok, text, f"TEXT {args.text!r}", args, batch_size=args.batch_size, max_tokens=args.max_tokens)
    trace = record_routing(model, batches, progress=True)
    trace.meta.update(source=os.path.basename(args.text), seq_len=args.seq_len)
    trace.save(args.out)
    print(f"recorded {trace.num_tokens} tokens ({trace.num_sequences} sequences of {args.seq_len}) through MoE "
          f"layers {trace.layers} -> {args.out}")
    return 0


def cmd_train(args) -> int:
    import time

    from .common import _existing_file, _load_trace, _output_file
    from ..runtime.prediction import train_path_predictor

    _existing_file("TRACE", args.trace, "a routing trace (expertflow trace --out FILE)")
    _output_file("--out", args.out)
    model, _tok = _load(args.model)
    trace = _load_trace("TRACE", args.trace, model=model)
    t0 = time.perf_counter()
    pred = train_path_predictor(trace, model, epochs=args.epochs, context=args.context, width=args.width,
                                lr=args.lr, progress=True)
    pred.save(args.out)
    m = pred.metrics
    val = f", validated on {m['validation_tokens']} held-back tokens" if m.get("validation_tokens") else \
        " (no validation split: the trace has one sequence)"
    print(f"trained on {m.get('train_tokens', trace.num_tokens)} tokens{val} in {time.perf_counter() - t0:.0f} s "
          f"-> {args.out}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .common import CLIError, _existing_file, _load_predictor, _load_trace, _output_file, _read_text
    from ..runtime.trace import record_routing

    if bool(args.trace) == bool(args.text):
        raise CLIError("eval needs exactly one of --trace (a held-out routing trace) or --text (held-out text)")
    if args.trace:
        _existing_file("--trace", args.trace, "a routing trace (expertflow trace --out FILE)")
    text = _read_text("--text", args.text) if args.text else None
    if args.predictor:
        _existing_file("--predictor", args.predictor, "a path-predictor file (expertflow train-predictor --out FILE)")
    if args.json:
        _output_file("--json", args.json)
    model, tok = _load(args.model)
    if args.trace:
        trace = _load_trace("--trace", args.trace, model=model)
    else:
        _check_seq_len(model, args)
        torch.manual_seed(0)
        trace = record_routing(model, _batches(tok, text, f"--text {args.text!r}", args, batch_size=8,
                                               max_tokens=args.max_tokens), progress=True)
    room = min(trace.lookahead_ids[l].shape[1] - trace.top_k[l] for l in trace.layers) if trace.lookahead_ids \
        else min(trace.num_experts[l] - trace.top_k[l] for l in trace.layers)
    if args.extra > room:
        raise CLIError(f"--extra {args.extra}: this trace holds top-k+{room} candidates per token and layer; "
                       f"give 0..{room}")
    pred = _load_predictor("--predictor", args.predictor, model) if args.predictor else None
    result = evaluate(trace, pred, model, max_tokens=args.max_tokens, extra=args.extra)
    result["acceptance"] = acceptance(result)
    print(format_tables(result))
    print(format_acceptance(result["acceptance"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def add_commands(subparsers) -> None:
    """Register ``trace``, ``train-predictor`` and ``eval`` on the ``expertflow`` subparsers."""
    from .common import _nonneg_int, _positive_float, _positive_int

    t = subparsers.add_parser("trace", help="record the routing of a text through a model (a routing trace file)")
    t.add_argument("text", metavar="TEXT", help="a UTF-8 text file (documents separated by <|endoftext|> lines)")
    t.add_argument("--out", required=True, help="the trace file to write (safetensors)")
    t.add_argument("--model", default=None, help="a local MoE checkpoint (default: the shipped tiny Mixtral)")
    t.add_argument("--seq-len", type=_positive_int, default=256)
    t.add_argument("--batch-size", type=_positive_int, default=8)
    t.add_argument("--max-tokens", type=_positive_int, default=None)
    t.set_defaults(func=cmd_trace)
    p = subparsers.add_parser("train-predictor", help="train a path predictor on a routing trace")
    p.add_argument("trace", metavar="TRACE", help="a routing trace recorded on TRAINING text")
    p.add_argument("--out", required=True, help="the predictor file to write (safetensors)")
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--context", type=_nonneg_int, default=4,
                   help="previous embeddings averaged into the input (0: none)")
    p.add_argument("--width", type=_positive_int, default=256)
    p.add_argument("--lr", type=_positive_float, default=3e-3)
    p.set_defaults(func=cmd_train)
    e = subparsers.add_parser("eval", help="prediction quality and cache replay (LRU/LFU/predictive/MIN) on held-out routing")
    e.add_argument("--trace", default=None, help="a routing trace of HELD-OUT text")
    e.add_argument("--text", default=None, help="or held-out text to record first")
    e.add_argument("--predictor", default=None, help="a path-predictor file (optional)")
    e.add_argument("--model", default=None)
    e.add_argument("--seq-len", type=_positive_int, default=256)
    e.add_argument("--max-tokens", type=_positive_int, default=8192, help="tokens replayed per mode")
    e.add_argument("--extra", type=_nonneg_int, default=1, help="candidates beyond top-k per token and layer")
    e.add_argument("--json", default=None, help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)
