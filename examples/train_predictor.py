"""Record routing, train ExpertFlow's routing-path predictor, and serve with it.

    python examples/train_predictor.py [--model tiny_qwen2_moe] [--epochs 2]

1. ``record_routing`` runs the model teacher-forced over text and keeps every token's experts.
2. ``train_path_predictor`` fits the predictor on that trace (held-out precision/recall printed).
3. The model is compiled with ``predictor="path"`` and the saved predictor file; the tokens
   equal the uncompiled model's (a misprediction costs time, never accuracy).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from _common import PROMPT, load

import expertflow_compile as ef
from expertflow_compile.assets import HELDOUT_TEXT
from expertflow_compile.runtime.prediction import train_path_predictor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_mixtral")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text to record")
    args = ap.parse_args()

    model, tok, _ = load(args.model)
    text = open(HELDOUT_TEXT, encoding="utf-8").read()
    flat = tok(text, return_tensors="pt").input_ids[0][: args.tokens]
    batches = list(flat[: flat.numel() // 128 * 128].view(-1, 128).split(4))
    trace = ef.record_routing(model, batches, progress=False)
    print(f"recorded {trace.num_tokens} tokens over {len(trace.layers)} MoE layers")

    predictor = train_path_predictor(trace, model, epochs=args.epochs, progress=False, log=None)
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "path_predictor.pt")
        predictor.save(file)
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, do_sample=False)
        model.compile(backend="expertflow", options={"expert_budget": "25%", "policy": "predictive",
                                                      "predictor": "path", "predictor_path": file})
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
    same = torch.equal(got, want)
    print(f"same tokens as the uncompiled model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
