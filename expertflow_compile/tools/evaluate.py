"""Prediction evaluation: how well a predictor names the coming experts, and what the cache
makes of it, on a held-out routing trace.

``evaluate(trace, predictor, model)`` measures prediction quality (precision / recall of each
predictor against the trace's true experts) and replays the trace through the cache
(:mod:`~expertflow_compile.tools.replay`) at several budgets and batch sizes: LRU, LFU,
the predictive policy alone (no predictor), predictive + lookahead / path / oracle, the
next-call ceiling (the predictive policy told each layer's true next call: what a perfect
next-token routing predictor could give it) and Belady's MIN for the same slot count.
``format_tables`` prints the result; ``acceptance`` / ``format_acceptance`` check it against
issue 14's targets (oracle within 2% of MIN with ready rate >= 0.99; real predictors within
1.3x MIN with ready rate >= 0.90 and never more loads than LRU). ``text_batches`` and
``training_documents`` turn the shipped model's corpus into token batches.

Used by ``expertflow eval`` (:mod:`~expertflow_compile.cli.predict`) and
``benchmarks/prediction.py``.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["evaluate", "format_tables", "acceptance", "format_acceptance", "text_batches", "training_documents",
           "DOC_SEPARATOR"]

DOC_SEPARATOR = "\n<|endoftext|>\n"
PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"
HOLDOUT_MOD = 20     # scripts/prepare_corpus.py's split: held out iff sha256(relpath)[:8] % 20 == 0


def training_documents(source_dir: str = PYTHON_DOCS) -> list[str]:
    """The TRAINING documents of the shipped model's corpus (python3.11-doc sources minus the
    held-out split of scripts/prepare_corpus.py), normalised as that script does."""
    import re

    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"{source_dir} not found: apt-get install -y python3.11-doc")
    docs = []
    for root, _dirs, files in os.walk(source_dir):
        for name in sorted(files):
            if not name.endswith((".txt", ".rst")):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, source_dir)
            if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HOLDOUT_MOD == 0:
                continue                      # held out: never train on it
            text = open(full, "rb").read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            text = "\n".join(line.rstrip() for line in text.split("\n"))
            text = re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"
            if text.strip():
                docs.append((rel, text))
    return [t for _, t in sorted(docs)]


def text_batches(tok, text: str, *, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
                 eos_id: int | None = None):
    """Tokenise ``text`` (documents separated by ``<|endoftext|>`` lines), join the documents
    with the EOS token and cut the stream into [batch_size, seq_len] batches (the tail that
    does not fill a whole sequence is dropped)."""
    import torch

    eos = tok.eos_token_id if eos_id is None else eos_id
    stream: list[int] = []
    for doc in text.split(DOC_SEPARATOR):
        if doc.strip():
            stream.extend(tok(doc, add_special_tokens=False).input_ids)
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_seq = len(stream) // seq_len
    if n_seq == 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    seqs = torch.tensor(stream[:n_seq * seq_len]).view(n_seq, seq_len)
    return [seqs[i:i + batch_size] for i in range(0, n_seq, batch_size)]


def evaluate(trace, predictor=None, model=None, *, budgets=(0.125, 0.25, 0.5), batches=(1, 8),
             max_tokens: int | None = 8192, extra: int = 1, progress: bool = True,
             min_confidence: float = 0.0, min_precision: float | None = 0.95) -> dict:
    """Prediction quality and cache replay on a held-out ``trace`` (see the module docstring).

    ``predictor``: a PathPredictor (needs ``model`` for the token embeddings) or None.
    Predictions are prefetched when their confidence (measured precision of their rank,
    :func:`~expertflow_compile.tools.replay.rank_precision`) is ``>= min_confidence``, and then
    (``min_precision``, the live engine's rule, ``prefetch_min_precision``) the predictive
    policy enters the layer at its prediction, hints every candidate and loads those at list
    positions whose online-measured precision is ``>= min_precision`` (None: the old rule,
    everything that passed ``min_confidence`` is prefetched before the layer is entered)."""
    from tqdm import tqdm

    from ..runtime.prediction import path_features, prediction_metrics
    from ..runtime.prediction.path import _embeddings
    from .replay import (belady_min, bypass_bound, call_predictions, candidate_sets, layer_calls,
                                 rank_precision, replay, slots_for_share)

    layers = list(trace.layers)
    sources = {"lookahead": candidate_sets(trace, "lookahead", extra)} if trace.lookahead_ids else {}
    if predictor is not None:
        if model is None:
            raise ValueError("evaluate: a path predictor needs the model (token embeddings)")
        feats = path_features(_embeddings(model, trace.token_ids), trace.seq_offsets, predictor.context)
        cand = predictor.candidates(feats, extra)
        sources["path"] = {l: cand[:, i] for i, l in enumerate(predictor.layers)}
    precision = {name: rank_precision(trace, cands) for name, cands in sources.items()}
    quality = {}
    for name in ("lookahead", "path"):
        if name in sources:
            quality[name] = {}
            for l in layers:
                p, r = prediction_metrics(sources[name][l], trace.ids[l])
                quality[name][str(l)] = {"precision": p, "recall": r}
    result = {"tokens_in_trace": trace.num_tokens, "min_confidence": min_confidence, "min_precision": min_precision,
              "extra_candidates": extra,
              "candidates_per_token": {str(l): trace.top_k[l] + extra for l in layers},
              "prediction": quality, "replay": []}
    total = sum(trace.num_experts[l] for l in layers)
    jobs = []
    for b in batches:
        calls = layer_calls(trace, b, max_tokens)
        preds = {name: call_predictions(trace, calls, cands, precision=precision[name]) for name, cands in sources.items()}
        preds["oracle"] = None                 # replay's oracle: the true experts and true next uses
        preds["next-call"] = None              # replay's ceiling: each layer's true next call, no prefetch
        for share in budgets:
            jobs.append((b, share, calls, preds))
    runs = [("lru", "none"), ("lfu", "none"), ("predictive", "none"), ("predictive", "lookahead"),
            ("predictive", "path"), ("predictive", "oracle"), ("predictive", "next-call")]
    bar = tqdm(total=len(jobs) * (len(runs) + 1), desc="cache replay", unit="run", disable=not progress)
    for b, share, calls, preds in jobs:
        slots = slots_for_share(trace, share)
        rows = []
        for policy, pred in runs:
            if pred != "none" and pred not in preds:
                continue
            gate = {} if pred in ("none", "oracle", "next-call") else {"min_precision": min_precision,
                                                           "enter_first": min_precision is not None}
            r = replay(trace, calls, slots, policy, pred, predictions=preds.get(pred), min_confidence=min_confidence,
                       **gate)
            rows.append(r.as_dict())
            bar.update(1)
        m = belady_min(calls, slots).as_dict()
        m["bypass_bound_loads"] = bypass_bound(calls, slots)
        rows.append(m)
        bar.update(1)
        for r in rows:
            r.update(batch=b, budget=share, total_experts=total)
        result["replay"].extend(rows)
    bar.close()
    return result


def format_tables(result: dict) -> str:
    lines = []
    q = result["prediction"]
    if q:
        layers = sorted({l for v in q.values() for l in v}, key=int)
        lines.append("Per-layer prediction quality (held-out, per token, top-k+%s candidates): precision / recall"
                     % result.get("extra_candidates", 1))
        lines.append("  predictor  " + "  ".join(f"layer {l:>2}   " for l in layers) + "  mean")
        for name, per in q.items():
            ps = [per[l]["precision"] for l in layers]
            rs = [per[l]["recall"] for l in layers]
            lines.append(f"  {name:<9}  " + "  ".join(f"{p:.2f} / {r:.2f}" for p, r in zip(ps, rs))
                         + f"  {sum(ps) / len(ps):.2f} / {sum(rs) / len(rs):.2f}")
        lines.append("")
    names = {("lru", "none"): "LRU", ("lfu", "none"): "LFU", ("predictive", "none"): "predictive (alone)",
             ("predictive", "lookahead"): "predictive+lookahead", ("predictive", "path"): "predictive+path",
             ("predictive", "oracle"): "predictive+oracle", ("predictive", "next-call"): "next-call (ceiling)",
             ("min", "none"): "MIN (Belady)"}
    rows = result["replay"]
    for b in sorted({r["batch"] for r in rows}):
        sub = [r for r in rows if r["batch"] == b]
        budgets = sorted({r["budget"] for r in sub})
        tokens = sub[0]["tokens"]
        lines.append(f"Cache replay, {'decode (batch 1)' if b == 1 else f'batch {b}'}, {tokens} tokens: "
                     "loads / MIN, ready rate, resident rate (loads per token)")
        slots = {s: next(r for r in sub if r["budget"] == s)["slots"] for s in budgets}
        head = "  " + "policy".ljust(22) + "".join(("%g%% (%d slots)" % (100 * s, slots[s])).rjust(30) for s in budgets)
        lines.append(head)
        for key, label in names.items():
            cells = []
            for s in budgets:
                r = next((r for r in sub if r["budget"] == s and (r["policy"], r["predictor"]) == key), None)
                cells.append(f"{'-':>30}" if r is None else
                             (f"x{r['loads'] / max(r['min_loads'], 1):.2f} {r['ready_rate']:.3f} {r['resident_rate']:.3f}"
                              f" ({r['loads_per_token']:.2f})").rjust(30))
            lines.append(f"  {label:<22}" + "".join(cells))
        mins = [next(r for r in sub if r["budget"] == s and r["policy"] == "min") for s in budgets]
        lines.append(f"  {'(bypass lower bound)':<22}" + "".join(
            ("loads %.3f" % (m["bypass_bound_loads"] / m["tokens"])).rjust(30) for m in mins))
        lines.append("")
    return "\n".join(lines)


ORACLE_MAX_OVER_MIN, ORACLE_MIN_READY = 1.02, 0.99        # issue 14's acceptance
PREDICTOR_MAX_OVER_MIN, PREDICTOR_MIN_READY = 1.3, 0.90


def acceptance(result: dict) -> list[dict]:
    """Issue 14's acceptance on an :func:`evaluate` result, one row per (batch, budget,
    predictor): the oracle needs loads <= 1.02 x MIN and ready rate >= 0.99; lookahead and
    path need loads <= 1.3 x MIN, ready rate >= 0.90 and no more loads than LRU's at the
    same budget. Each row carries the figures and ``met``."""
    rows = result["replay"]
    out = []
    for b in sorted({r["batch"] for r in rows}):
        for share in sorted({r["budget"] for r in rows if r["batch"] == b}):
            sub = {(r["policy"], r["predictor"]): r for r in rows if r["batch"] == b and r["budget"] == share}
            lru = sub.get(("lru", "none"))
            for pred in ("oracle", "lookahead", "path"):
                r = sub.get(("predictive", pred))
                if r is None:
                    continue
                over = r["loads"] / max(r["min_loads"], 1)
                if pred == "oracle":
                    checks = {"loads/MIN": over <= ORACLE_MAX_OVER_MIN, "ready": r["ready_rate"] >= ORACLE_MIN_READY}
                else:
                    checks = {"loads/MIN": over <= PREDICTOR_MAX_OVER_MIN,
                              "ready": r["ready_rate"] >= PREDICTOR_MIN_READY,
                              "<= LRU": lru is not None and r["loads"] <= lru["loads"]}
                out.append({"batch": b, "budget": share, "predictor": pred, "loads_over_min": over,
                            "ready_rate": r["ready_rate"], "loads_per_token": r["loads_per_token"],
                            "lru_loads_per_token": None if lru is None else lru["loads_per_token"],
                            "min_loads_per_token": r["min_loads"] / max(r["tokens"], 1),
                            "failed": [k for k, ok in checks.items() if not ok], "met": all(checks.values())})
    return out


def format_acceptance(rows: list[dict], title: str = "") -> str:
    """The acceptance grid as a table (one line per row of :func:`acceptance`)."""
    lines = [f"Acceptance (issue 14){': ' + title if title else ''}: oracle loads <= {ORACLE_MAX_OVER_MIN} x MIN, "
             f"ready >= {ORACLE_MIN_READY}; lookahead / path loads <= {PREDICTOR_MAX_OVER_MIN} x MIN, ready >= "
             f"{PREDICTOR_MIN_READY}, loads <= LRU",
             "  batch  budget  predictor   loads/tok   LRU    MIN   loads/MIN  ready  met"]
    for r in rows:
        lru = "-" if r["lru_loads_per_token"] is None else f"{r['lru_loads_per_token']:.2f}"
        verdict = "yes" if r["met"] else "NO (" + ", ".join(r["failed"]) + ")"
        lines.append(f"  {r['batch']:>5}  {100 * r['budget']:>5g}%  {r['predictor']:<10} {r['loads_per_token']:>9.2f} "
                     f"{lru:>6} {r['min_loads_per_token']:>6.2f}   x{r['loads_over_min']:.2f}    {r['ready_rate']:.3f}  "
                     f"{verdict}")
    met = sum(r["met"] for r in rows)
    lines.append(f"  met {met} of {len(rows)}")
    return "\n".join(lines)
