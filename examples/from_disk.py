"""A model whose experts stay on disk: only the dense weights are read at load.

    python examples/from_disk.py [--model tiny_qwen2_moe]

``expertflow_compile.from_pretrained`` is transformers' own loading with the expert
tensors diverted: they become zero-memory placeholders and the compiled model reads each
expert from the safetensors file when its cache needs it. Uncompiled use raises.
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
    args = ap.parse_args()

    reference, tok, path = load(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False)

    model = ef.from_pretrained(path).eval()          # experts: placeholders, read from disk later
    held = sum(p.untyped_storage().nbytes() for p in model.parameters())
    print(f"parameter bytes held after load: {held / 2**20:.1f} MiB "
          f"(the full model: {sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**20:.1f} MiB)")
    try:
        model(ids)
    except RuntimeError as e:                         # uncompiled use is refused, in one line
        print("uncompiled:", str(e).splitlines()[0])
    model.compile(backend="expertflow", options={"expert_budget": args.budget})
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    same = torch.equal(got, want)
    print(f"same tokens as the model loaded whole: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
