import subprocess
import sys
import textwrap

import pytest
import torch

from expertflow_compile.config import ExpertFlowConfig
from expertflow_compile.errors import OptionError


def test_defaults_parse():
    cfg = ExpertFlowConfig.from_options(None)
    assert cfg.expert_budget is None and cfg.policy == "lru" and not cfg.offloads


@pytest.mark.parametrize("options, needle", [
    ({"budget": "25%"}, "valid options are"),
    ({"policy": "fifo"}, "['lru', 'lfu', 'predictive']"),
    ({"predictor": "magic"}, "'lookahead'"),
    ({"expert_budget": "lots"}, "25%"),
    ({"expert_budget": "0%"}, "> 0% and <= 100%"),
    ({"expert_budget": "-5%"}, "'25%'"),
    ({"expert_budget": 0}, "must be >= 1"),
    ({"expert_budget": True}, "invalid expert_budget True"),
    ({"expert_budget": 1.5}, "shared by all layers"),
    ({"predictor_path": "/x"}, "predictor='path'"),
    ({"lookahead_depth": 0}, "int >= 1"),
    ({"verify": "yes"}, "True or False"),
    ({"lookahead_ranking": 1}, "True or False"),
    ({"inner_backend": "tvm"}, "'inductor'"),
    ({"predictor": "path"}, "predictor_path"),
])
def test_bad_options_name_what_is_valid(options, needle):
    with pytest.raises(OptionError) as exc:
        ExpertFlowConfig.from_options(options)
    assert isinstance(exc.value, ValueError)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_one_budget_grammar():
    """config accepts exactly what runtime.budget.parse_budget accepts (one parser)."""
    from expertflow_compile.runtime.budget import parse_budget

    for value in ["25%", "2GiB", "512 MB", "1024", " 3 mib ", ".5GiB", 3, None, "100%", "lots", "0", "0B",
                  "150%", "2G", "-1GB", 0, -1, True, 1.5, "1.5.2GB", "25 percent", "0.5 %"]:
        try:
            parse_budget(value)
            ok = True
        except ValueError:
            ok = False
        try:
            ExpertFlowConfig.from_options({"expert_budget": value})
            assert ok, value
        except OptionError:
            assert not ok, value


def test_predictor_path_is_checked_at_option_validation(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(OptionError, match=f"predictor_path='{missing}' does not exist"):
        ExpertFlowConfig.from_options({"predictor": "path", "predictor_path": missing})
    with pytest.raises(OptionError, match=f"predictor_path='{tmp_path}' is a directory"):
        ExpertFlowConfig.from_options({"predictor": "oracle", "predictor_path": str(tmp_path)})
    f = tmp_path / "trace.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(OptionError, match="read only by predictor='path'.*but predictor='none'"):
        ExpertFlowConfig.from_options({"predictor_path": str(f)})
    with pytest.raises(OptionError, match="but predictor='lookahead'"):
        ExpertFlowConfig.from_options({"predictor": "lookahead", "predictor_path": str(f)})
    cfg = ExpertFlowConfig.from_options({"predictor": "oracle", "predictor_path": f})   # a pathlib.Path
    assert cfg.predictor_path == str(f)


@pytest.mark.parametrize("budget", ["25%", "2GiB", "512 MB", "1.5GB", 3, "100%", None])
def test_good_budgets(budget):
    assert ExpertFlowConfig.from_options({"expert_budget": budget}).expert_budget is not False


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_bad_option_reaches_the_caller_unwrapped(how):
    """Dynamo wraps backend exceptions in BackendCompilerFailed; ours pass through as they are,
    so `except ValueError` around the first call catches them (README: Options)."""
    from expertflow_compile.testing.tiny_models import build_tiny_model

    model = build_tiny_model("mixtral", num_layers=1)
    options = {"expert_budgt": "25%"}
    if how == "torch.compile":
        run = torch.compile(model, backend="expertflow", options=options)
    else:
        model.compile(backend="expertflow", options=options)
        run = model
    for _ in range(2):    # and again at the next call: Dynamo retries the compile
        with pytest.raises(ValueError) as exc, torch.no_grad():
            run(torch.zeros(1, 3, dtype=torch.long))
        assert type(exc.value) is OptionError
        assert str(exc.value) == ("unknown expertflow option(s) ['expert_budgt']; valid options are "
                                  f"{ExpertFlowConfig.valid_keys()}")


def test_int_budget_is_pooled_over_layers():
    """expert_budget=n buys n x layers slots in one shared pool; the minimum is one layer's top-k."""
    import expertflow_compile as ef
    from expertflow_compile.testing.tiny_models import build_tiny_model

    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    model = build_tiny_model("mixtral", num_layers=2)           # top-2, 2 MoE layers
    with torch.no_grad():
        ref = model(x).logits
        model.compile(backend="expertflow", options={"expert_budget": 1})
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    s = ef.stats(model)
    experts = [p for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n]
    per_expert = sum(p[0].numel() * p.element_size() for p in experts) // 2   # one expert, both layers alike
    assert s["budget_bytes"] == 2 * per_expert and 0 < s["peak_cache_bytes"] <= s["budget_bytes"]
    torch._dynamo.reset()
    one = build_tiny_model("mixtral", num_layers=1)             # 1 slot < top-2: refused, unwrapped
    one.compile(backend="expertflow", options={"expert_budget": 1})
    with pytest.raises(OptionError) as exc, torch.no_grad():
        one(x)
    msg = str(exc.value)
    assert "gives 1 expert slot" in msg and "shared by 1 MoE layer" in msg and "an int >= 2 (n x 1 slots)" in msg


def test_backend_registered_by_entry_point_without_import():
    """After pip install, backend="expertflow" resolves without importing the package."""
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.backends.registry import lookup_backend
        assert "expertflow_compile" not in sys.modules
        fn = lookup_backend("expertflow")
        print(fn.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "expertflow_compile.compiler.backend" in out.stdout
