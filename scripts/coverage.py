"""Coverage of the expertflow matcher over every MoE family of the installed transformers.

For each family found by ``discover_moe_families()``: build it tiny, count its MoE
layers, compile it with ``backend="expertflow"`` and ``expert_budget="50%"``, run it
once on a (1, 6) batch while collecting the backend's per-graph reports (the same
reports ``expertflow_compile.explain`` returns, gathered from this one compilation
instead of a second one to halve the run time), and compare the logits with eager.

"Loads from a checkpoint": the same tiny model saved with ``save_pretrained`` in both
layouts transformers 5 writes (the default, original per-expert names, and
``save_original_format=False``, the fused one), loaded with
``expertflow_compile.from_pretrained`` (experts left on disk), every dense tensor and
buffer and every expert compared with ``AutoModel*.from_pretrained``'s load of the same
files, compiled at ``expert_budget="25%"`` (one layer's top-k minimum where 25% is
below it) and its logits compared with that transformers model's.

    python scripts/coverage.py                       # all families
    python scripts/coverage.py --families mixtral dbrx --no-write

Writes ``benchmarks/results/coverage.json``, ``docs/coverage.md`` and the table between
the coverage markers in ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from expertflow_compile import stats  # noqa: E402
from expertflow_compile.compiler.backend import collect_reports  # noqa: E402
from expertflow_compile.compiler.passes.report import ExplainReport  # noqa: E402
from expertflow_compile.testing.checkpoints import check_loads_from_checkpoint  # noqa: E402
from expertflow_compile.testing.families import (  # noqa: E402
    build_tiny_family, count_moe_layers, discover_all_moe_families, expert_groups_per_layer, family_head,
    family_inputs, skipped_moe_families)

BUDGET = "50%"
LOAD_BUDGET = "25%"
TOL = 1e-5
LAYOUTS = (("original", {}), ("fused", {"save_original_format": False}))


# Expert groups left resident on purpose, and why (the table's "left resident" column).
RESIDENT_WHY = {
    "nllb-moe": "transformers 5.24's per-expert loop one-hot-encodes the already one-hot top-1 mask, so only "
                "experts 0 and 1 ever run: a transformers bug not reproduced in a traceable form (runs as written)",
    "doge": "its \"experts\" are rows of an embedding table (product-key retrieval): no expert weights",
    "jetmoe": "the mixture-of-attention experts (JetMoeMoA): a per-expert query projection, then attention "
              "over all heads, then a per-expert output projection - two single-GEMM expert sets with "
              "attention between them, while the engine's expert is one up -> gate -> down MLP per slot; "
              "its MLP experts are offloaded",
}


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:240] if msg else ''}"


def run_family(family: str, *, seed: int = 0, build_limit_s: float = 120.0) -> dict:
    row = dict(family=family, moe_layers=0, matched=0, offloaded=0, exact=None, max_diff=None,
               scale=None, untouched=[], notes=[], error=None, seconds=0.0)
    t0 = time.perf_counter()
    torch._dynamo.reset()
    try:
        model, notes = build_tiny_family(family, seed=seed, time_limit_s=build_limit_s)
    except Exception as e:
        row["error"] = f"build: {_short(e)}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row
    row["notes"] += notes
    row["moe_layers"] = count_moe_layers(model)
    row["head"] = family_head(family)[0]
    per_layer = expert_groups_per_layer(model)
    row["groups"] = sum(len(v) for v in per_layer.values())
    row["groups_per_layer"] = max((len(v) for v in per_layer.values()), default=0)
    row["group_paths"] = [g for v in per_layer.values() for g in v]
    inputs = family_inputs(model, family, seed=seed)
    row["inputs"] = sorted(inputs)
    try:
        with torch.no_grad():
            ref = model(**inputs, use_cache=False).logits.float()
    except Exception as e:
        row["error"] = f"eager: {_short(e)}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row
    report = ExplainReport()
    try:
        compiled = torch.compile(model, backend="expertflow", options={"expert_budget": BUDGET})
        with collect_reports(report.graphs.append), torch.no_grad():
            out = compiled(**inputs, use_cache=False).logits.float()
        diff = (out - ref).abs().max().item()
        scale = ref.abs().max().item()
        row.update(max_diff=diff, scale=scale, exact=bool(diff <= TOL * scale))
    except Exception as e:
        row["error"] = f"compile: {_short(e)}"
        row["exact"] = False
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    row["matched"] = len([b for b in report.blocks])
    row["matched_layers"] = sorted({b.layer for b in report.blocks if b.layer is not None})
    row["untouched"] = [dict(layer=b.layer, where=b.where, reason=b.reason) for b in report.untouched]
    if row["matched"] and row["error"] is None:
        try:
            s = stats(compiled)
            moved = s.get("bytes_moved", 0)
            if s.get("offloading") and moved > 0:   # expert groups that went through the cache
                row["offloaded"] = sum(1 for v in s.get("per_layer", {}).values() if v.get("bytes_moved", 0) > 0)
            row["bytes_moved"] = moved
            row["offloading"] = bool(s.get("offloading"))
        except Exception as e:
            row["notes"].append(f"stats: {_short(e)}")
    if row["moe_layers"] and row["error"] is None and row["head"] in ("causal-lm", "seq2seq-lm"):
        ids = inputs["input_ids"]
        row["checkpoint"] = {name: load_from_checkpoint(family, model, ids, kw) for name, kw in LAYOUTS}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    del model
    return row


def load_from_checkpoint(family: str, model, ids, save_kw: dict) -> dict:
    """One layout of the "loads from a checkpoint" column (see the module docstring)."""
    return check_loads_from_checkpoint(model, family, ids, save_kw=save_kw, budget=LOAD_BUDGET, tol=TOL)


def _loads_cell(r: dict, verbose: bool = False) -> str:
    ck = r.get("checkpoint")
    if not ck:
        return "-"
    if all(v["ok"] for v in ck.values()):
        low = sorted({v["budget"] for v in ck.values() if v["budget"] != LOAD_BUDGET})
        return "yes" + (f" (at the minimum budget {low[0]})" if low and verbose else "")
    bad = {k: v for k, v in ck.items() if not v["ok"]}
    if not verbose:
        return "**no**" if len(bad) == len(ck) else f"{', '.join(k for k in ck if ck[k]['ok'])} only"
    return "; ".join(f"{k}: {v['stage']}: {v['error']}" for k, v in bad.items())


def _reason_key(reason: str) -> str:
    """Group reasons that differ only in node names / numbers."""
    if not reason:
        return "(no reason given)"
    key = re.sub(r"\d+", "N", reason.split(":")[0].strip())
    key = re.sub(r"\(\w+\)", "(...)", key)                 # node names: (indices), (topk_indices)
    key = re.sub(r"\['l_self_modules\w*'?[^\]]*\]", "[<module params/inputs>]", key)
    return key[:160]


def _silent(r: dict) -> int:
    """Expert groups neither rewritten nor reported untouched (a report without a layer
    number may stand for several groups, e.g. a dispatch split off the graph)."""
    if any(u["layer"] is None for u in r["untouched"]) or r["family"] in RESIDENT_WHY:
        return 0
    return max(0, _groups(r) - max(r["matched"], r["offloaded"]) - len(r["untouched"]))


def _groups(r: dict) -> int:
    return r.get("groups", r["moe_layers"])


def _all_offloaded(r: dict) -> bool:
    """Every routed expert group rewritten and served through the expert cache."""
    g = _groups(r)
    return bool(g) and r["offloaded"] >= g and not r["error"]


def _resident(r: dict) -> tuple[int, str]:
    """(expert groups left resident, why)."""
    g = _groups(r)
    left = max(0, g - r["offloaded"]) if not r["error"] else g
    if r["family"] in RESIDENT_WHY and (left or not g):
        return left, RESIDENT_WHY[r["family"]]
    if not left:
        return 0, ""
    why = sorted({u["reason"] for u in r["untouched"]}) or ([r["error"]] if r["error"] else [])
    return left, "; ".join(why) or "not offloaded (no reason reported)"


def summarize(rows: list[dict]) -> dict:
    built = [r for r in rows if not (r["error"] or "").startswith(("build", "eager"))]
    reasons = Counter()
    examples: dict[str, list[str]] = {}
    for r in rows:
        for u in r["untouched"]:
            k = _reason_key(u["reason"])
            reasons[k] += 1
            if r["family"] not in examples.setdefault(k, []):
                examples[k].append(r["family"])
        if r["error"] and r["error"].startswith("compile"):
            k = "compile error: " + r["error"][len("compile: "):][:100]
            reasons[k] += 1
            examples.setdefault(k, []).append(r["family"])
        silent = _silent(r)
        if not r["error"] and silent > 0:
            k = "expert group neither rewritten nor reported untouched (silent miss)"
            reasons[k] += silent
            examples.setdefault(k, []).append(r["family"])
    full = [r for r in rows if _all_offloaded(r)]
    return dict(
        families=len(rows),
        heads=dict(Counter(r.get("head", "?") for r in rows)),
        with_images=sum(1 for r in rows if "pixel_values" in r.get("inputs", [])),
        built=len(built),
        exact=sum(1 for r in rows if r["exact"]),
        groups=sum(_groups(r) for r in rows),
        groups_offloaded=sum(min(r["offloaded"], _groups(r)) for r in rows),
        two_groups_per_layer=[r["family"] for r in rows if r.get("groups_per_layer", 1) > 1],
        fully_offloaded=len(full),
        fully_offloaded_share=round(len(full) / max(1, len(rows)), 4),
        not_fully_offloaded=[(r["family"], *_resident(r)) for r in rows if not _all_offloaded(r)],
        # engine layers (groups) that moved bytes but whose graph report was not collected
        reports_short=[r["family"] for r in rows if r["matched"] < r["offloaded"]],
        loads_from_checkpoint=sum(1 for r in rows if r.get("checkpoint")
                                  and all(v["ok"] for v in r["checkpoint"].values())),
        checkpoint_failures=[(r["family"], _loads_cell(r, verbose=True)) for r in rows if r.get("checkpoint")
                             and not all(v["ok"] for v in r["checkpoint"].values())],
        build_failures=[(r["family"], r["error"]) for r in rows if (r["error"] or "").startswith(("build", "eager"))],
        compile_errors=[(r["family"], r["error"]) for r in rows if (r["error"] or "").startswith("compile")],
        unmatched_reasons=[dict(reason=k, count=n, families=examples[k]) for k, n in reasons.most_common()],
    )


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _groups_cell(r: dict) -> str:
    g, per = _groups(r), r.get("groups_per_layer", 1)
    return f"{g} ({per} per layer)" if per > 1 else str(g)


def _inputs_cell(r: dict) -> str:
    inp = r.get("inputs", ["input_ids"])
    return "text + image" if "pixel_values" in inp else "text"


def _exact_cell(r: dict) -> str:
    return "-" if r["exact"] is None else ("yes" if r["exact"] else "**no**")


def _headline(summary: dict) -> str:
    return (f"**{summary['families']} MoE families discovered ({summary['with_images']} run with an image), "
            f"{summary['exact']} exact, {summary['fully_offloaded']} with every routed expert group offloaded "
            f"({100 * summary['fully_offloaded_share']:.1f}%); {summary['groups_offloaded']} of "
            f"{summary['groups']} expert groups offloaded; {summary.get('loads_from_checkpoint', 0)} of the "
            f"language models loading from a checkpoint in both layouts**")


def to_markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    lines = ["# MoE family coverage", "",
             f"Generated by `python scripts/coverage.py` with transformers {meta['transformers']}, "
             f"torch {meta['torch']}, CPU, fp32, tiny random models (2 layers, 8 experts, top-2; every sub-config "
             f"shrunk), built with the family's own head class, `expert_budget=\"{BUDGET}\"`. Inputs: 6 text "
             "tokens; families with an image input builder also get one image (a 4 x 4 patch grid, its "
             "placeholder tokens in the ids) so their vision tower and any image-only expert group run. "
             "An expert group is one set of routed experts with its own router (ERNIE-4.5-VL has a text and a "
             "vision group per layer; shared experts are not routed and not counted). "
             "Exact: compiled logits within 1e-5 x max|eager| of eager. "
             "Offloaded: expert groups whose experts went through the expert cache (bytes moved > 0). "
             "Loads from a checkpoint (language-model heads): saved with `save_pretrained` in both layouts "
             "(original per-expert names and `save_original_format=False`), loaded with "
             "`expertflow_compile.from_pretrained`, every dense tensor, buffer and expert equal to "
             f"`AutoModel*.from_pretrained`'s load, compiled at `expert_budget=\"{LOAD_BUDGET}\"` (one layer's "
             "top-k minimum where that is less) and its logits within 1e-5 x max|logit| of that model's.", "",
             "## Summary", "", _headline(summary), "",
             f"- heads: {', '.join(f'{k} {v}' for k, v in sorted(summary['heads'].items()))}",
             f"- built tiny and ran eagerly: **{summary['built']}**; exact: **{summary['exact']}**",
             f"- two expert groups per layer: {', '.join(summary['two_groups_per_layer']) or 'none'}",
             f"- compile errors: **{len(summary['compile_errors'])}**, build failures: "
             f"**{len(summary['build_failures'])}**", "",
             "## Expert groups left resident", "", "| family | groups left resident | why |", "|---|---|---|"]
    for fam, n, why in summary["not_fully_offloaded"]:
        lines.append(f"| {fam} | {n} | {_cell(why)[:700]} |")
    lines += ["", "## Top reasons for unmatched blocks", "", "| reason | blocks | families |", "|---|---|---|"]
    for u in summary["unmatched_reasons"]:
        lines.append(f"| {_cell(u['reason'])} | {u['count']} | {', '.join(u['families'][:8])}"
                     f"{' ...' if len(u['families']) > 8 else ''} |")
    if summary.get("checkpoint_failures"):
        lines += ["", "## Families that do not load from a checkpoint (both layouts)", "",
                  "| family | why |", "|---|---|"]
        lines += [f"| {fam} | {_cell(why)[:600]} |" for fam, why in summary["checkpoint_failures"]]
    lines += ["", "## Families", "",
              "| family | head | inputs | expert groups | offloaded | exact | loads from a checkpoint | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = []
        if r["error"]:
            notes.append(r["error"])
        notes += sorted({f"untouched: {u['reason']}" for u in r["untouched"]})
        silent = _silent(r)
        if not r["error"] and silent > 0:
            notes.append(f"{silent} expert group(s) neither rewritten nor reported (silent miss)")
        notes += r["notes"]
        lines.append(f"| {r['family']} | {r.get('head', '-')} | {_inputs_cell(r)} | {_groups_cell(r)} | "
                     f"{r['offloaded']} | {_exact_cell(r)} | {_cell(_loads_cell(r, verbose=True))[:300]} | "
                     f"{_cell('; '.join(notes))[:600]} |")
    if meta.get("skipped"):
        lines += ["", "## MoE model types that are not families of their own (run through their composite)", ""]
        lines.append(", ".join(f"`{mt}`" for mt, _ in meta["skipped"]))
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def to_readme(rows: list[dict], summary: dict, meta: dict) -> str:
    """The README's coverage block: summary and a compact per-family table."""
    lines = [README_BEGIN,
             f"Generated by `python scripts/coverage.py` (transformers {meta['transformers']}, tiny models, "
             f"`expert_budget=\"{BUDGET}\"`; reasons and build notes in [`docs/coverage.md`](docs/coverage.md)): "
             + _headline(summary) + ".",
             "", "| family | head | inputs | expert groups | offloaded | exact | loads from a checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r.get('head', '-')} | {_inputs_cell(r)} | {_groups_cell(r)} | "
                     f"{r['offloaded']} | {_exact_cell(r)} | {_loads_cell(r)} |")
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(block: str, path: str = os.path.join(ROOT, "README.md")) -> None:
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        print(f"{path} has no {README_BEGIN} ... {README_END} markers; README not updated")
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + block + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", help="only these model types (default: all discovered)")
    ap.add_argument("--build-limit", type=float, default=120.0, help="seconds per tiny build")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "coverage.json"))
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "coverage.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render", action="store_true", help="only re-render --md (and the summary) from --json")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.json) as f:
            data = json.load(f)
        data["summary"] = summarize(data["families"])
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(args.md, "w") as f:
            f.write(to_markdown(data["families"], data["summary"], data["meta"]))
        write_readme(to_readme(data["families"], data["summary"], data["meta"]))
        print(f"re-rendered {args.md} and the README's coverage table")
        return 0

    import transformers

    families = args.families or discover_all_moe_families()
    try:
        from tqdm import tqdm
        it = tqdm(families, desc="coverage", file=sys.stdout)
    except ImportError:  # pragma: no cover
        it = families
    rows = []
    t0 = time.perf_counter()
    for fam in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(fam)
        row = run_family(fam, build_limit_s=args.build_limit)
        rows.append(row)
        status = row["error"] or (f"offloaded {row['offloaded']}/{_groups(row)} groups exact={row['exact']} "
                                  f"loads={_loads_cell(row, verbose=True)}")
        print(f"  {fam}: {status} ({row['seconds']}s)", flush=True)
    summary = summarize(rows)
    meta = dict(transformers=transformers.__version__, torch=torch.__version__, python=platform.python_version(),
                budget=BUDGET, tolerance=TOL, input_shape=[1, 6], seconds=round(time.perf_counter() - t0, 1),
                skipped=skipped_moe_families() if not args.families else [])
    print(json.dumps({k: v for k, v in summary.items() if k != "unmatched_reasons"}, indent=1))
    for u in summary["unmatched_reasons"]:
        print(f"  {u['count']:3d}  {u['reason']}  [{', '.join(u['families'][:6])}]")
    if not args.no_write:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        os.makedirs(os.path.dirname(args.md), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, summary=summary, families=rows), f, indent=1, default=str)
        with open(args.md, "w") as f:
            f.write(to_markdown(rows, summary, meta))
        write_readme(to_readme(rows, summary, meta))
        print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
