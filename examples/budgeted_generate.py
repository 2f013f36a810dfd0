"""Generate with a quarter of the experts resident, and check the tokens against eager.

    python examples/budgeted_generate.py [--model tiny_qwen2_moe] [--budget 25%]

The compiled model keeps ``--budget`` of the expert bytes in its cache and loads the rest
from the host tier as they are needed; the generated tokens equal the uncompiled model's.
"""

from __future__ import annotations

import argparse

import torch
from _common import PROMPT, load

import expertflow_compile as ef


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_mixtral")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()

    model, tok, _ = load(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    model.compile(backend="expertflow", options={"expert_budget": args.budget, "policy": "lru"})
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    print(tok.decode(got[0], skip_special_tokens=True))
    print("stats:", {k: v for k, v in ef.stats(model).items() if not isinstance(v, (dict, list))})
    same = torch.equal(got, want)
    print(f"same tokens as the uncompiled model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
