"""The pass pipeline (compiler/pipeline.py) and the units the matcher is carved into
(passes/region.py, expert_gemms.py, routing.py, match.py).

The pipeline runs on graphs captured from the small hand-written MoE modules of
``test_passes.py``: each pass must log its name, block count and time, the dump switch
must write every pass's graph before and after, the bind pass must number layers once,
and each carved unit of the matcher must report the fields it is for.
"""

from __future__ import annotations

import logging

import torch
from hypothesis import HealthCheck, given, settings

from expertflow_compile.compiler.backend import compile_graph
from expertflow_compile.compiler.passes import expert_gemms, region, routing
from expertflow_compile.compiler.passes import match as m
from expertflow_compile.compiler.pipeline import DUMP_ENV, LOGGER_NAME, PASSES
from expertflow_compile.config import ExpertFlowConfig
from expertflow_compile.layer import LayerPlan
from helpers import count

from .test_passes import MoE, TwoLayers, _build, capture, configs

NAMES = [p.name for p in PASSES]


def _compile(module, x, **options):
    gm, example, values = capture(module, x)
    gm, report, engine = compile_graph(gm, example, ExpertFlowConfig.from_options(options))
    return gm, report, engine, values


def test_the_passes_are_one_ordered_list():
    assert NAMES == ["match", "verify", "bind", "lookahead", "rewrite", "recompile"]


def test_each_pass_logs_its_name_blocks_and_time(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    gm, report, engine, _ = _compile(TwoLayers().eval(), torch.randn(4, 16))
    try:
        records = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
        logged = [next(n for n in NAMES if f"pass {n}:" in msg) for msg in records]
        assert logged == NAMES, records
        assert all(msg.endswith(" ms") for msg in records)
        assert [t.name for t in report.passes] == NAMES
        assert all(t.ms >= 0 for t in report.passes)
        blocks = {t.name: t.blocks for t in report.passes}
        assert blocks["match"] == blocks["verify"] == blocks["bind"] == blocks["rewrite"] == 2
        assert count(gm, "grouped_gemm") == 2
    finally:
        engine.close()


def test_a_pass_switched_off_is_logged_and_skipped(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    gm, report, engine, _ = _compile(MoE().eval(), torch.randn(4, 16), verify=False)
    try:
        assert [t.name for t in report.passes] == [n for n in NAMES if n != "verify"]
        assert any("pass verify off" in r.getMessage() for r in caplog.records if r.name == LOGGER_NAME)
        assert report.blocks[0].check == "not checked (verify=False)" and report.blocks[0].rewritten
    finally:
        engine.close()


def test_the_dump_switch_writes_each_pass_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    gm, report, engine, _ = _compile(MoE().eval(), torch.randn(5, 16))
    try:
        g = report.index
        want = {f"graph{g}_{n}_{name}_{when}.py" for n, name in enumerate(NAMES) for when in ("before", "after")}
        assert {p.name for p in tmp_path.iterdir()} == want
        i = NAMES.index("rewrite")
        before = (tmp_path / f"graph{g}_{i}_rewrite_before.py").read_text()
        after = (tmp_path / f"graph{g}_{i}_rewrite_after.py").read_text()
        assert "torch.bmm" in before and "expertflow.grouped_gemm" not in before
        assert "expertflow.grouped_gemm" in after and "torch.bmm" not in after
        j = NAMES.index("match")   # the matcher never edits the graph
        assert (tmp_path / f"graph{g}_{j}_match_before.py").read_text() == \
            (tmp_path / f"graph{g}_{j}_match_after.py").read_text()
    finally:
        engine.close()


def test_no_dump_without_the_switch(tmp_path, monkeypatch):
    monkeypatch.delenv(DUMP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    _, _, engine, _ = _compile(MoE().eval(), torch.randn(3, 16))
    engine.close()
    assert not list(tmp_path.iterdir())


def test_bind_numbers_each_layer_once_and_registers_its_plan():
    two = TwoLayers().eval()
    gm, report, engine, values = _compile(two, torch.randn(4, 16))
    try:
        assert sorted(engine.layers) == [0, 1] and report.blocks[0].layer == 0
        for layer, plan in engine.layers.items():
            assert isinstance(plan, LayerPlan) and plan.num_experts == 6 and plan.top_k == 2
        # the same experts compiled again (another graph of the model) keep their numbers
        gm2, example2, _ = capture(two, torch.randn(7, 16))
        _, report2, engine2 = compile_graph(gm2, example2, ExpertFlowConfig.from_options({}))
        assert engine2 is engine and [b.layer for b in report2.blocks] == [0, 1]
    finally:
        engine.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_the_carved_matcher_units(cfg):
    module, x = _build(cfg)
    gm, _, values = capture(module, x)
    region._number(gm.graph)
    up, down = expert_gemms._find_gemms(gm.graph)
    scope, nodes, output = region._bound_region(up.node, down.node)
    assert scope.endswith("experts") and output in nodes
    assert up.node in nodes and down.node in nodes
    assert not any(n.op == "placeholder" for n in nodes)
    experts = expert_gemms._expert_gemms(up, down, nodes, [up, down])
    assert experts.num_experts == cfg["E"] and experts.up2 is None and not experts.lists
    assert (experts.up_bias is None, experts.down_bias is None) == (not cfg["bias"],) * 2
    assert len(experts.bias_nodes) == (4 if cfg["bias"] else 0)   # an add_ and a gather per bias
    hidden, ids, weights, consts = routing._routed_inputs(nodes, output, experts, scope)
    assert hidden.op == "placeholder" and tuple(values[hidden].shape) == (cfg["T"], cfg["H"])
    assert tuple(ids.meta["example_value"].shape) == (cfg["T"], cfg["K"]) and not consts
    assert tuple(weights.meta["example_value"].shape) == (cfg["T"], cfg["K"])
    found = routing._routing(ids, weights, experts.num_experts)
    assert values[found.router_weight] is module.router.weight and found.router is not None
    prescale, post_fn = m._weighting(experts, hidden, weights, output, nodes, consts)
    assert not prescale and post_fn is None
    up_t, down_t, dispatch = expert_gemms._dispatch_kind(experts, prescale)
    assert (up_t, down_t) == (False, False) and dispatch.startswith("batched_mm")
    block = m._match_pair(up, down, [up, down])
    plan = block.plan()
    assert (plan.num_experts, plan.top_k, plan.hidden_size, plan.has_up_bias) == (
        cfg["E"], cfg["K"], cfg["H"], cfg["bias"])
    assert plan.math is block.math and plan.out_features == cfg["H"]

