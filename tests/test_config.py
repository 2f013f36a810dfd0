import subprocess
import sys
import textwrap

import pytest

from expertflow_compile.config import ExpertFlowConfig


def test_defaults_parse():
    cfg = ExpertFlowConfig.from_options(None)
    assert cfg.expert_budget is None and cfg.policy == "lru" and not cfg.offloads


@pytest.mark.parametrize("options, needle", [
    ({"budget": "25%"}, "valid options are"),
    ({"policy": "fifo"}, "['lru', 'lfu', 'predictive']"),
    ({"predictor": "magic"}, "'lookahead'"),
    ({"expert_budget": "lots"}, "25%"),
    ({"expert_budget": "0%"}, "(0%, 100%]"),
    ({"expert_budget": 0}, "int (experts per MoE layer"),
    ({"expert_budget": True}, "not valid"),
    ({"lookahead_depth": 0}, "int >= 1"),
    ({"verify": "yes"}, "True or False"),
    ({"inner_backend": "tvm"}, "'inductor'"),
    ({"predictor": "path"}, "predictor_path"),
])
def test_bad_options_name_what_is_valid(options, needle):
    with pytest.raises(ValueError) as exc:
        ExpertFlowConfig.from_options(options)
    assert needle in str(exc.value)


@pytest.mark.parametrize("budget", ["25%", "2GiB", "512 MB", "1.5GB", 3, "100%", None])
def test_good_budgets(budget):
    assert ExpertFlowConfig.from_options({"expert_budget": budget}).expert_budget is not False


def test_unknown_option_fails_through_torch_compile():
    import torch

    from expertflow_compile.testing.tiny_models import build_tiny_model

    model = build_tiny_model("mixtral", num_layers=1)
    compiled = torch.compile(model, backend="expertflow", options={"not_an_option": 1})
    with pytest.raises(Exception) as exc:
        compiled(torch.zeros(1, 3, dtype=torch.long))
    assert "valid options are" in str(exc.value)


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
    assert "expertflow_compile.backend" in out.stdout
