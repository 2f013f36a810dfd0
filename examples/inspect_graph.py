"""What the backend found and rewrote: every MoE block, and why a block was left alone.

    python examples/inspect_graph.py [--model tiny_qwen2_moe]
"""

from __future__ import annotations

import argparse

from _common import PROMPT, load

import expertflow_compile as ef


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_mixtral")
    args = ap.parse_args()

    model, tok, _ = load(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    report = ef.explain(model, ids)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
