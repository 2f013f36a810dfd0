"""The ``expertflow`` command.

Subcommands:
  graph   compile a model with the backend and print what was matched and rewritten
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("graph", help="print the MoE blocks the backend finds and the rewritten graph")
    g.add_argument("--family", default="mixtral", help="a built-in tiny model family (default: mixtral)")
    g.add_argument("--model", default=None, help="a local Hugging Face checkpoint directory instead")
    g.add_argument("--impl", default=None, choices=["grouped_mm", "batched_mm", "eager"],
                   help="transformers experts implementation (default: the model's)")
    g.add_argument("--seq-len", type=int, default=8)
    g.add_argument("--code", action="store_true", help="also print the rewritten graph's code")
    g.set_defaults(func=cmd_graph)
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
