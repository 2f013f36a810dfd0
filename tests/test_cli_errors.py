"""Every bad argument of the ``expertflow`` command: exit code 2, one line on stderr that
names the argument (and what is valid), no traceback; checked in-process through
``main(argv)``. Cases that need a file use the fixtures below (``{name}`` in the argv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from expertflow_compile.cli.main import SHIPPED_MODEL, main

HELDOUT = os.path.join(os.path.dirname(SHIPPED_MODEL), "heldout.txt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad (and a few good) inputs, made once for the module."""
    from transformers import LlamaConfig

    from expertflow_compile.runtime.trace import record_routing
    from expertflow_compile.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("cli-inputs")
    f = {"dir": str(root / "a-folder"), "missing": str(root / "missing.safetensors")}
    os.makedirs(f["dir"])
    for name, data in (("garbage", b"\x00\x01 not a safetensors file" * 50), ("empty", b""),
                       ("binary", b"\xff\xfe\xfa\x00 not utf-8 \xc3\x28"), ("short", b"hi")):
        path = root / name
        path.write_bytes(data)
        f[name] = str(path)
    f["prompts"] = str(root / "prompts.txt")
    open(f["prompts"], "w").write("import os\n")
    f["text"] = HELDOUT
    llama = root / "llama"
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(llama)
    f["llama"], f["llama_config"] = str(llama), str(llama / "config.json")
    truncated = root / "truncated"
    shutil.copytree(SHIPPED_MODEL, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    f["truncated"] = str(truncated)
    f["empty_dir"] = str(root / "no-config")
    os.makedirs(f["empty_dir"])
    # a routing trace of the shipped model, and one of another model (another family)
    f["trace"] = str(root / "shipped.trace")
    assert main(["trace", HELDOUT, "--out", f["trace"], "--seq-len", "32", "--batch-size", "2",
                 "--max-tokens", "128"]) == 0
    torch._dynamo.reset()
    other = build_tiny_model("qwen3_moe", num_layers=2)
    trace = record_routing(other, [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))])
    f["other_trace"] = str(root / "other.trace")
    trace.save(f["other_trace"])
    torch._dynamo.reset()
    return f


# (argv, the argument the message must name, another piece the message must hold)
CASES = [
    # run
    ("run --budget lots", "--budget", "25%"),
    ("run --budget 0", "--budget", ">= 1"),
    ("run --budget=-5%", "--budget", "'25%'"),
    ("run --budget 150%", "--budget", "<= 100%"),
    ("run --budget 0B", "--budget", "1 byte"),
    ("run --budget 1KiB --max-new-tokens 1", "--budget", "needs 2 resident experts"),
    ("run --policy fifo", "--policy", "'lru'"),
    ("run --predictor path", "--predictor", "'lookahead'"),
    ("run --max-new-tokens 0", "--max-new-tokens", ">= 1"),
    ("run --max-new-tokens -3", "--max-new-tokens", ">= 1"),
    ("run --max-new-tokens ten", "--max-new-tokens", "not an int"),
    ("run --max-new-tokens 600", "--max-new-tokens", "context of 512"),
    ("run --prompts-file {prompts} --batch-size 0", "--batch-size", ">= 1"),
    ("run --schedule random", "--schedule", "'routing'"),
    ("run --prompt=", "--prompt", "no tokens"),
    ("run --prompts-file {missing}", "--prompts-file", "does not exist"),
    ("run --prompts-file {dir}", "--prompts-file", "is a directory"),
    ("run --prompts-file {empty}", "--prompts-file", "no prompts"),
    ("run --prompts-file {binary}", "--prompts-file", "UTF-8"),
    ("run --model {missing}", "--model", "not a directory"),
    ("run --model {garbage}", "--model", "not a directory"),
    ("run --model {empty_dir}", "--model", "no config.json"),
    ("run --model {llama}", "--model", "not a Mixture-of-Experts model"),
    ("run --model {truncated}", "--model", "cannot load the checkpoint"),
    ("run --no-such-flag", "--no-such-flag", "unrecognized"),
    # bench
    ("bench --link-bandwidth fast", "--link-bandwidth", "16GB/s"),
    ("bench --link-bandwidth 0GB/s", "--link-bandwidth", "> 0"),
    ("bench --link-bandwidth 25%/s", "--link-bandwidth", "16GB/s"),
    ("bench --budgets 2GiB", "--budgets", "hf-accelerate mode takes shares only"),
    ("bench --budgets lots", "--budgets", "25%"),
    ("bench --budgets ,", "--budgets", "12.5%"),
    ("bench --budgets 25%,0", "--budgets", ">= 1"),
    ("bench --modes magic", "--modes", "ef-lru"),
    ("bench --modes ,", "--modes", "ef-lru"),
    ("bench --modes ef-path", "--predictor-path", "ef-path"),
    ("bench --modes ef-oracle --predictor-path {missing}", "--predictor-path", "does not exist"),
    ("bench --modes ef-lru --predictor-path {garbage}", "--predictor-path", "ef-path"),
    ("bench --new-tokens 0", "--new-tokens", ">= 1"),
    ("bench --out {garbage}", "--out", "is a file"),
    ("bench --model {llama}", "--model", "not a Mixture-of-Experts model"),
    ("bench --model {missing}", "--model", "not a directory"),
    # simulate
    ("simulate --tokens 0", "--tokens", ">= 1"),
    ("simulate --batch 0", "--batch", ">= 1"),
    ("simulate --budgets 0%,-5%,150%", "--budgets", "(0%, 100%]"),
    ("simulate --budgets 25%,150%", "--budgets", "'150%'"),
    ("simulate --budgets 25", "--budgets", "'12.5%,25%,50%'"),
    ("simulate --budgets 2GiB", "--budgets", "(0%, 100%]"),
    ("simulate --budgets 25%,0.5%", "--budgets", "0.5% is below what one MoE layer of mixtral-8x7b needs"),
    ("simulate --hardware abacus", "--hardware", "rtx4090-pcie4"),
    ("simulate --model nosuch", "--model", "mixtral-8x7b"),
    ("simulate --model {garbage}", "--model", "config.json"),
    ("simulate --model {llama_config}", "--model", "not a Mixture-of-Experts config"),
    ("simulate --trace {missing}", "--trace", "does not exist"),
    ("simulate --trace {garbage}", "--trace", "not a usable routing trace"),
    ("simulate --trace {dir}", "--trace", "is a directory"),
    ("simulate --json {dir}", "--json", "is a directory"),
    # graph
    ("graph --seq-len 0", "--seq-len", ">= 1"),
    ("graph --seq-len -1", "--seq-len", ">= 1"),
    ("graph --seq-len 100000", "--seq-len", "context of 256"),
    ("graph --family nosuch", "--family", "mixtral"),
    ("graph --impl loop", "--impl", "'grouped_mm'"),
    ("graph --model {missing}", "--model", "not a directory"),
    ("graph --model {truncated}", "--model", "cannot load the checkpoint"),
    # trace
    ("trace {missing} --out {dir}/t", "TEXT", "does not exist"),
    ("trace {dir} --out {dir}/t", "TEXT", "is a directory"),
    ("trace {binary} --out {dir}/t", "TEXT", "UTF-8"),
    ("trace {text}", "--out", "required"),
    ("trace {text} --out {dir}", "--out", "is a directory"),
    ("trace {text} --out {dir}/t --seq-len 0", "--seq-len", ">= 1"),
    ("trace {text} --out {dir}/t --batch-size 0", "--batch-size", ">= 1"),
    ("trace {text} --out {dir}/t --max-tokens 0", "--max-tokens", ">= 1"),
    ("trace {short} --out {dir}/t --seq-len 64", "--seq-len 64", "fewer than one sequence"),
    ("trace {text} --out {dir}/t --seq-len 100000", "--seq-len", "context of 512"),
    ("trace {text} --out {dir}/t --model {llama}", "--model", "not a Mixture-of-Experts model"),
    # train-predictor
    ("train-predictor {missing} --out {dir}/p", "TRACE", "does not exist"),
    ("train-predictor {garbage} --out {dir}/p", "TRACE", "not a usable routing trace"),
    ("train-predictor {other_trace} --out {dir}/p", "TRACE", "fingerprint"),
    ("train-predictor {trace}", "--out", "required"),
    ("train-predictor {trace} --out {dir}/p --epochs 0", "--epochs", ">= 1"),
    ("train-predictor {trace} --out {dir}/p --context -1", "--context", ">= 0"),
    ("train-predictor {trace} --out {dir}/p --width 0", "--width", ">= 1"),
    ("train-predictor {trace} --out {dir}/p --lr 0", "--lr", "> 0"),
    ("train-predictor {trace} --out {dir}/p --lr nan", "--lr", "> 0"),
    ("train-predictor {trace} --out {dir}/p --lr fast", "--lr", "not a number"),
    # eval
    ("eval", "--trace", "--text"),
    ("eval --trace {trace} --text {text}", "--trace", "exactly one"),
    ("eval --trace {missing}", "--trace", "does not exist"),
    ("eval --trace {garbage}", "--trace", "not a usable routing trace"),
    ("eval --trace {other_trace}", "--trace", "fingerprint"),
    ("eval --text {missing}", "--text", "does not exist"),
    ("eval --text {short} --seq-len 64", "--seq-len 64", "fewer than one sequence"),
    ("eval --trace {trace} --predictor {missing}", "--predictor", "does not exist"),
    ("eval --trace {trace} --predictor {garbage}", "--predictor", "not a usable path predictor"),
    ("eval --trace {trace} --predictor {trace}", "--predictor", "not a usable path predictor"),
    ("eval --trace {trace} --extra -1", "--extra", ">= 0"),
    ("eval --trace {trace} --extra 5", "--extra", "give 0..2"),
    ("eval --trace {trace} --max-tokens 0", "--max-tokens", ">= 1"),
    ("eval --trace {trace} --seq-len 0", "--seq-len", ">= 1"),
    ("eval --trace {trace} --json {dir}", "--json", "is a directory"),
    # no command at all
    ("", "command", "required"),
    ("frobnicate", "frobnicate", "invalid choice"),
]


@pytest.mark.parametrize("argv, names, valid", CASES, ids=[c[0] or "(none)" for c in CASES])
def test_bad_argument_is_one_line_exit_2(argv, names, valid, files, capsys):
    args = [a.format(**files) for a in argv.split()]
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("expertflow") and "error:" in line, line
    assert names in line and valid in line, line


def test_real_process_exit_code_and_stderr(files):
    """The console entry point: exit status 2 and one stderr line, in a real process."""
    for argv in (["simulate", "--tokens", "0"], ["eval", "--trace", files["garbage"]]):
        proc = subprocess.run([sys.executable, "-m", "expertflow_compile.cli", *argv],
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert argv[1] in lines[0]


def test_simulate_names_the_routing_it_replays(files, capsys):
    """--trace of another model is not footnoted as the shipped model's routing."""
    assert main(["simulate", "--trace", files["other_trace"], "--tokens", "16", "--budgets", "50%"]) == 0
    out = capsys.readouterr().out
    routing = [ln for ln in out.splitlines() if "routing:" in ln]
    assert len(routing) == 1, out
    assert "qwen3_moe model" in routing[0] and "not the shipped model's" in routing[0]
    assert files["other_trace"] in routing[0]
    assert main(["simulate", "--trace", files["trace"], "--tokens", "16", "--budgets", "50%"]) == 0
    routing = [ln for ln in capsys.readouterr().out.splitlines() if "routing:" in ln]
    assert len(routing) == 1 and "routing: the shipped model's routing, from --trace" in routing[0], routing
