"""Side-by-side decode benchmark: HF resident, HF + accelerate offload, expertflow variants.

Every (mode, budget) runs in its own subprocess (clean Dynamo state, 1 thread, its own
peak RSS) over the same prompts; results are gathered into one table, a JSON and a
PNG (the PNG only with matplotlib, and ``hf-accelerate`` only with accelerate: both are
in the ``bench`` extra). ``link_bandwidth`` (bytes/s) emulates a slower host-device link for expertflow's
expert loads: each load sleeps ``bytes / bandwidth`` (on the prefetch worker for
prefetches, in the compute thread for demand loads), so a CPU run shows what
prefetching hides. Rows with an emulated link are labelled so.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from ..runtime.store import ExpertStore

__all__ = ["MODES", "ThrottledStore", "run_mode", "run_bench", "format_table", "plot"]

MODES = ("hf-resident", "hf-accelerate", "ef-lru", "ef-lookahead", "ef-predictive-lookahead")
DEFAULT_PROMPTS = ("The Python standard library", "def main():", "import os", "Exceptions are raised")


class ThrottledStore(ExpertStore):
    """Wraps a store; each read takes at least ``bytes / bytes_per_s`` seconds (an
    emulated host-device link: the sleep releases the GIL like a real DMA wait)."""

    def __init__(self, inner: ExpertStore, bytes_per_s: float):
        if bytes_per_s <= 0:
            raise ValueError(f"link bandwidth must be positive, got {bytes_per_s}")
        self.inner, self.bytes_per_s, self.specs = inner, float(bytes_per_s), inner.specs

    def read_into(self, layer, expert, out):
        t0 = time.perf_counter()
        self.inner.read_into(layer, expert, out)
        wait = self.specs[layer].expert_nbytes() / self.bytes_per_s - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)

    def close(self):
        self.inner.close()


def parse_bandwidth(text: str | None) -> float | None:
    """``"16GB/s"``, ``"500MB/s"``, ``"2GiB/s"`` -> bytes per second (None stays None)."""
    if text is None:
        return None
    from ..runtime.budget import parse_budget

    raw = text.strip()
    if not raw.lower().endswith("/s"):
        raise ValueError(f"link bandwidth {text!r} must look like '16GB/s'")
    b = parse_budget(raw[:-2])
    if b.kind != "bytes":
        raise ValueError(f"link bandwidth {text!r} must be bytes per second, like '16GB/s'")
    return b.value


def _expert_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n)


def run_mode(mode: str, path: str, budget: str, new_tokens: int, prompts=DEFAULT_PROMPTS,
             link_bandwidth: float | None = None, predictor_path: str | None = None) -> dict:
    """One (mode, budget) measurement in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import expertflow_compile as ef

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    inputs = [tok(p, return_tensors="pt").input_ids for p in prompts]
    info: dict = {"mode": mode, "budget": budget, "link_bandwidth": link_bandwidth}
    if mode == "hf-resident":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        info["expert_bytes_resident"] = info["expert_bytes_total"] = _expert_bytes(model)
    elif mode == "hf-accelerate":
        import tempfile

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        total, experts = sum(p.numel() * 4 for p in ref.parameters()), _expert_bytes(ref)
        del ref
        share = float(budget.rstrip("%")) / 100 if budget.endswith("%") else 1.0
        cap = int(total - experts + share * experts)
        offload = tempfile.mkdtemp(prefix="ef-accelerate-")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="auto", max_memory={"cpu": cap}, offload_folder=offload).eval()
        info["expert_bytes_total"] = experts
        info["expert_bytes_resident"] = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters()
            if p.dim() == 3 and "experts" in n and p.device.type == "cpu")
    elif mode.startswith("ef-"):
        # ef-lru: no prediction; ef-NAME: LRU + predictor NAME; ef-predictive-NAME: the predictive policy
        policy, predictor = "lru", (mode[3:] if mode != "ef-lru" else "none")
        if predictor.startswith("predictive-"):
            policy, predictor = "predictive", predictor[len("predictive-"):]
        options = {"expert_budget": budget, "predictor": predictor, "policy": policy}
        if predictor in ("path", "oracle"):
            options["predictor_path"] = predictor_path
        model = ef.from_pretrained(path, dtype=torch.float32)
        model.compile(backend="expertflow", options=options)
        with torch.no_grad():   # compile every prompt length outside the timed part
            for x in inputs:
                model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
        if link_bandwidth:
            from ..runtime.engine import engines_for_module

            for eng in engines_for_module(model):
                eng.build_cache(ThrottledStore(eng.store, link_bandwidth))
        ef.reset_stats(model)
    else:
        raise ValueError(f"unknown mode {mode!r}; modes: {MODES}")
    outs, n_tokens = [], 0
    t0 = time.perf_counter()
    for x in inputs:
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        outs.append(out[0].tolist())
        n_tokens += new_tokens
    dt = time.perf_counter() - t0
    info.update(tokens=n_tokens, seconds=dt, tokens_per_s=n_tokens / dt, outputs=outs,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if mode.startswith("ef-"):
        s = ef.stats(model)
        info.update(expert_bytes_resident=s["peak_cache_bytes"], resident_rate=s["resident_rate"],
                    ready_rate=s["ready_rate"], min_loads=s["min_loads"], loads_over_min=s["loads_over_min"],
                    wasted_loads=s["wasted_loads"], stall_seconds=s["stall_seconds"],
                    stall_per_token=s["stall_seconds"] / n_tokens, bytes_moved_per_token=s["bytes_moved"] / n_tokens,
                    stall_share=s["stall_seconds"] / dt, predictor_recall=s["predictor_recall"],
                    loads_per_token=s["loads"] / n_tokens)
    return info


def run_bench(path: str, budgets, modes=MODES, new_tokens: int = 16, prompts=DEFAULT_PROMPTS,
              link_bandwidth: float | None = None, predictor_path: str | None = None,
              progress=True, bound: bool = True) -> list[dict]:
    """Every (mode, budget) in a subprocess; ``hf-resident`` once. Returns result rows."""
    from tqdm import tqdm

    jobs = [(m, b) for m in modes for b in (budgets if m != "hf-resident" else ["100%"])]
    rows = []
    for mode, budget in tqdm(jobs, desc="bench", disable=not progress):
        cfg = json.dumps({"mode": mode, "path": path, "budget": budget, "new_tokens": new_tokens,
                          "prompts": list(prompts), "link_bandwidth": link_bandwidth,
                          "predictor_path": predictor_path})
        proc = subprocess.run([sys.executable, "-m", "expertflow_compile.tools.bench", cfg],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"mode": mode, "budget": budget, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["mode"] == "hf-resident" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["ratio_to_resident"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["same_tokens_as_resident"] = r["outputs"] == base["outputs"]
    if base is not None and bound:
        extra = bound_rows(path, base["outputs"], budgets)
        for r in extra:   # the bound on time per token: compute, or MIN's bytes over the link
            transfer = r["loads_per_token"] * r["expert_bytes"] / link_bandwidth if link_bandwidth else 0.0
            r["bound_seconds_per_token"] = max(1.0 / base["tokens_per_s"], transfer)
            r["bound_transfer_seconds_per_token"] = transfer
        rows.extend(extra)
    return rows


def bound_rows(path: str, sequences: list[list[int]], budgets) -> list[dict]:
    """Belady's MIN on the routing of the resident run's token sequences (every token as a
    decode step, slots shared by all layers): the fewest loads any policy can make and the
    resident rate that goes with them. Prefetching (oracle) can reach a ready rate of 1.0 at the
    price of more loads; see benchmarks/prediction.py for that trade-off."""
    from transformers import AutoModelForCausalLM

    from .replay import belady_min, layer_calls, slots_for_share
    from ..runtime.trace import record_routing

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    trace = record_routing(model, [torch.tensor(s).unsqueeze(0) for s in sequences], progress=False)
    calls = layer_calls(trace, batch=1)
    expert_bytes = _expert_bytes(model) // max(1, sum(trace.num_experts[l] for l in trace.layers))
    out = []
    for b in budgets:
        if not str(b).endswith("%"):
            continue
        m = belady_min(calls, slots_for_share(trace, float(b.rstrip("%")) / 100))
        out.append({"mode": "bound-MIN", "budget": b, "resident_rate": m.resident_rate, "ready_rate": m.ready_rate,
                    "expert_bytes": expert_bytes,
                    "loads_per_token": m.loads_per_token, "replay": True})
    return out


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':<15}{'budget':>8}{'tokens/s':>10}{'x resident':>12}{'expert MiB':>12}{'resident':>10}"
            f"{'ready':>8}{'loads/tok':>10}{'/MIN':>6}{'KiB/tok':>10}{'stall':>8}{'stall s/tok':>12}{'same':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['mode']:<15}{r['budget']:>8}  failed: {r['error']}")
            continue
        if r.get("replay"):
            lines.append(f"{r['mode']:<15}{r['budget']:>8}{'-':>10}{'-':>12}{'-':>12}{r['resident_rate']:>10.3f}"
                         f"{r['ready_rate']:>8.3f}{r['loads_per_token']:>10.2f}{'x1.00':>6}   (replay of the resident run"
                         + (f"; bound {r['bound_seconds_per_token']:.4f} s/token = max(compute, MIN loads x expert "
                            f"bytes / bandwidth = {r['bound_transfer_seconds_per_token']:.4f})"
                            if r.get("bound_transfer_seconds_per_token") else "") + ")")
            continue

        def opt(key, fmt):
            return format(r[key], fmt) if key in r else "-"

        lines.append(
            f"{r['mode']:<15}{r['budget']:>8}{r['tokens_per_s']:>10.2f}{opt('ratio_to_resident', '.3f'):>12}"
            f"{r['expert_bytes_resident'] / 2**20:>12.2f}{opt('resident_rate', '.3f'):>10}{opt('ready_rate', '.3f'):>8}"
            f"{opt('loads_per_token', '.2f'):>10}"
            f"{('x' + format(r['loads_over_min'], '.2f')) if r.get('loads_over_min') else '-':>6}"
            f"{(format(r['bytes_moved_per_token'] / 1024, '.0f') if 'bytes_moved_per_token' in r else '-'):>10}"
            f"{opt('stall_share', '.2f'):>8}{opt('stall_per_token', '.4f'):>12}"
            f"{str(r.get('same_tokens_as_resident', '-')):>7}")
    return "\n".join(lines)


def plot(rows: list[dict], png: str, title: str) -> str | None:
    """Write the PNG (tokens/s and resident rate over budgets); returns None, or why there is no
    PNG (matplotlib, in the ``bench`` extra, is optional: the table and JSON never need it)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'expertflow-compile[bench]')"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    base = next((r for r in rows if r["mode"] == "hf-resident" and "error" not in r), None)
    for mode in sorted({r["mode"] for r in rows if r["mode"] != "hf-resident"}):
        pts = sorted(((float(r["budget"].rstrip("%")), r) for r in rows
                      if r["mode"] == mode and "error" not in r and r["budget"].endswith("%")), key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        if "tokens_per_s" in pts[0][1]:
            a1.plot(xs, [p[1]["tokens_per_s"] for p in pts], marker="o", label=mode)
        if "resident_rate" in pts[0][1]:
            a2.plot(xs, [p[1]["resident_rate"] for p in pts], marker="o", label=mode)
    if base is not None:
        a1.axhline(base["tokens_per_s"], color="k", ls="--", label="hf-resident")
    a1.set_xlabel("expert budget (% of all experts)")
    a1.set_ylabel("decode tokens/s")
    a2.set_xlabel("expert budget (% of all experts)")
    a2.set_ylabel("resident rate")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":   # one job, run by run_bench in a subprocess
    job = json.loads(sys.argv[1])
    print(json.dumps(run_mode(job["mode"], job["path"], job["budget"], job["new_tokens"], tuple(job["prompts"]),
                              job["link_bandwidth"], job["predictor_path"])))
