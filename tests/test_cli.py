import subprocess
import sys

from expertflow_compile.cli.main import main


def test_graph_prints_every_layer(capsys):
    assert main(["graph", "--family", "gpt_oss", "--seq-len", "4", "--code"]) == 0
    out = capsys.readouterr().out
    assert "2 MoE block(s) rewritten" in out
    assert "layer 0: rewritten" in out and "layer 1: rewritten" in out
    assert "expertflow.grouped_gemm" in out   # the rewritten code


def test_graph_bad_model_path_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "expertflow_compile.cli", "graph", "--model", "/nonexistent"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a directory" in proc.stderr


def test_run_bad_budget_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "expertflow_compile.cli", "run", "--budget", "lots"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "expert_budget" in proc.stderr


def test_run_on_shipped_model_same_tokens_at_25_percent(capsys):
    assert main(["run", "--budget", "25%", "--max-new-tokens", "6", "--prompt", "import os"]) == 0
    out = capsys.readouterr().out
    table = dict(line.strip().split("  ", 1) for line in out.splitlines()
                 if line.startswith("  ") and "  " in line.strip())
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["same tokens as fully resident"] == "True"
    assert "(25%)" in table["expert memory (budget / all experts)"]
    resident, ready = (float(x) for x in table["resident rate / ready rate"].split(" (")[0].split(" / "))
    assert 0.0 <= resident <= ready <= 1.0
    loads = table["loads (demand + speculative, wasted)"]            # "D + S = L, W wasted"
    demand, rest = loads.split(" + ")
    spec, rest = rest.split(" = ")
    total, wasted = rest.split(", ")
    assert int(demand) + int(spec) == int(total) and int(wasted.split()[0]) <= int(spec)
    min_loads, ratio = table["MIN loads (Belady, same slots) / ratio"].split(" / x")
    assert 0 < int(min_loads) <= int(total) and float(ratio) >= 1.0
    assert "hit rate" not in out


def test_run_takes_a_shipped_models_short_name(capsys):
    assert main(["run", "--model", "tiny_qwen2_moe", "--budget", "50%", "--max-new-tokens", "2",
                 "--prompt", "import os", "--predictor", "none"]) == 0
    out = capsys.readouterr().out
    same = [ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("same tokens as fully resident")]
    assert "expertflow run: tiny_qwen2_moe" in out and same == ["True"]
    assert main(["run", "--model", "tiny_nothing"]) == 2
    assert "nor a shipped model's name (tiny_mixtral, tiny_qwen2_moe)" in capsys.readouterr().err


def test_run_non_moe_model_is_one_line_exit_2(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "expertflow_compile.cli", "run", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a Mixture-of-Experts model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_small_table_json_png(tmp_path, capsys):
    import json

    out_dir = tmp_path / "b"
    assert main(["bench", "--modes", "hf-resident,ef-lru", "--budgets", "50%", "--new-tokens", "2",
                 "--link-bandwidth", "1GB/s", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "EMULATED" in printed
    rows = json.loads((out_dir / "bench.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"hf-resident", "ef-lru", "bound-MIN"}
    bound = next(r for r in rows if r["mode"] == "bound-MIN")
    assert 0.0 <= bound["ready_rate"] <= 1.0 and bound["loads_per_token"] > 0
    ef_row = next(r for r in rows if r["mode"] == "ef-lru")
    assert ef_row["same_tokens_as_resident"] is True
    assert ef_row["expert_bytes_resident"] < next(r for r in rows if r["mode"] == "hf-resident")["expert_bytes_resident"]
    assert (out_dir / "bench.png").stat().st_size > 1000


def test_bench_bad_bandwidth_exit_2():
    assert main(["bench", "--link-bandwidth", "fast"]) == 2


def test_simulate_projects_every_budget(tmp_path, capsys):
    import json

    out = tmp_path / "sim.json"
    assert main(["simulate", "--model", "mixtral-8x7b", "--hardware", "h200-pcie5", "--tokens", "64",
                 "--budgets", "25%,50%", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PROJECTION" in printed and "assumptions:" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == ["100%"] + ["25%"] * 5 + ["50%"] * 5
    lru = {r["budget"]: r for r in rows if r["predictor"] == "lru"}
    bound = {r["budget"]: r for r in rows if r["predictor"] == "MIN (bound)"}
    assert lru["50%"]["tokens_per_s"] >= lru["25%"]["tokens_per_s"]   # more budget, never slower
    for b in ("25%", "50%"):       # MIN's loads, all on demand: never more loads nor slower than LRU
        assert bound[b]["loads_per_token"] <= lru[b]["loads_per_token"]
        assert bound[b]["tokens_per_s"] >= lru[b]["tokens_per_s"] - 1e-9
    for r in rows[1:]:
        assert r["loads_over_min"] >= 1.0 - 1e-9 and r["resident_rate"] <= r["ready_rate"] + 1e-9
    assert "tiny_mixtral" in printed and "routing:" in printed
    assert all(r["tokens_per_s"] <= rows[0]["tokens_per_s"] + 1e-9 for r in rows)
    assert lru["25%"]["device_GiB"] < rows[0]["device_GiB"]


def test_simulate_fine_grained_target_replays_the_fine_grained_model(capsys):
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--tokens", "64", "--budgets", "25%"]) == 0
    printed = capsys.readouterr().out
    assert "routing: the shipped tiny_qwen2_moe's routing (60 experts, top-4)" in printed


def test_simulate_bad_profile_exit_2():
    assert main(["simulate", "--hardware", "abacus"]) == 2


def test_run_batched_prompts_file(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("import os\ndef main():\nclass Foo:\n")
    assert main(["run", "--prompts-file", str(f), "--batch-size", "2", "--max-new-tokens", "2",
                 "--budget", "50%", "--schedule", "routing"]) == 0
    out = capsys.readouterr().out
    assert "same tokens as one-by-one fully resident  True" in out


def test_run_prompt_longer_than_context_exit_2(capsys):
    assert main(["run", "--max-new-tokens", "600"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_trace_train_predictor_eval_on_the_shipped_model(tmp_path, capsys):
    """The prediction subcommands end to end with small settings (held-out text only
    stands in for training text here: this checks the plumbing, not the predictor)."""
    import os

    from expertflow_compile.runtime.prediction import PathPredictor
    from expertflow_compile.runtime.trace import RoutingTrace

    text = os.path.join(os.path.dirname(__file__), "..", "expertflow_compile", "assets", "heldout.txt")
    trace_path, pred_path = str(tmp_path / "t.safetensors"), str(tmp_path / "p.safetensors")
    assert main(["trace", text, "--out", trace_path, "--seq-len", "32", "--batch-size", "4",
                 "--max-tokens", "512"]) == 0
    trace = RoutingTrace.load(trace_path)
    assert trace.num_tokens == 512 and len(trace.layers) == 6
    assert main(["train-predictor", trace_path, "--out", pred_path, "--epochs", "2"]) == 0
    assert PathPredictor.load(pred_path).layers == trace.layers
    assert main(["eval", "--trace", trace_path, "--predictor", pred_path, "--max-tokens", "128"]) == 0
    out = capsys.readouterr().out
    assert "MIN (Belady)" in out and "lookahead" in out
    # the acceptance grid: the oracle (the true future) makes MIN's loads with every use ready, at every point
    grid = [ln.split() for ln in out.splitlines() if ln.strip().split()[2:3] == ["oracle"]]
    assert len(grid) == 6 and all(row[-1] == "yes" for row in grid), grid


def test_bench_without_matplotlib_writes_table_and_json(tmp_path, capsys, monkeypatch):
    """matplotlib is optional (the bench extra): no PNG, one line saying why, table and JSON as always."""
    import json

    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` raises ImportError
    out_dir = tmp_path / "b"
    assert main(["bench", "--modes", "hf-resident", "--budgets", "50%", "--new-tokens", "1",
                 "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "hf-resident" in printed                                   # the table
    rows = json.loads((out_dir / "bench.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"hf-resident", "bound-MIN"}
    assert not (out_dir / "bench.png").exists()
    why = [ln for ln in printed.splitlines() if "no bench.png" in ln]
    assert len(why) == 1 and "matplotlib is not installed" in why[0] and "[bench]" in why[0]


def test_bench_drops_default_accelerate_mode_without_accelerate(monkeypatch, capsys, tmp_path):
    """Without accelerate (the bench extra), an explicit hf-accelerate mode is refused and the
    default mode list leaves it out with a note."""
    from expertflow_compile.cli import main as cli

    monkeypatch.setattr(cli, "_importable", lambda name: name != "accelerate")
    assert main(["bench", "--modes", "hf-accelerate"]) == 2
    assert "needs the accelerate package" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr("expertflow_compile.tools.bench.run_bench", lambda path, budgets, modes, *a, **k: calls.append(modes) or [])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--out", str(tmp_path)]) == 0
    assert calls == [["hf-resident", "ef-lru", "ef-lookahead", "ef-predictive-lookahead"]]
    assert "no hf-accelerate rows" in capsys.readouterr().err
