"""Routing traces, the path / oracle predictors and the trace-driven cache replay."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertflow_compile import record_routing
from expertflow_compile.runtime.engine import engines_for_module
from expertflow_compile.runtime.prediction import (PathPredictor, make_predictor, path_features, prediction_metrics,
                                                   train_path_predictor)
from expertflow_compile.runtime.prediction.path import _embeddings
from expertflow_compile.tools.replay import (belady_min, bypass_bound, candidate_sets, layer_calls, replay,
                                             slots_for_share)
from expertflow_compile.runtime.trace import RoutingTrace, fingerprint
from expertflow_compile.testing.tiny_models import build_tiny_model


def _random_trace(num_layers, num_experts, top_k, seq_lens, seed) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    n = sum(seq_lens)
    # skewed routing (some locality), like trained models
    probs = torch.rand(num_layers, num_experts, generator=g) ** 3 + 0.05
    ids = {l: torch.stack([torch.multinomial(probs[l], top_k, generator=g) for _ in range(n)]) for l in range(num_layers)}
    offs = torch.tensor([0] + list(seq_lens)).cumsum(0)
    return RoutingTrace(
        layers=list(range(num_layers)), num_experts=dict.fromkeys(range(num_layers), num_experts),
        top_k=dict.fromkeys(range(num_layers), top_k), ids=ids, weights={l: torch.ones(n, top_k) for l in ids},
        token_ids=torch.zeros(n, dtype=torch.long), seq_offsets=offs, batch_offsets=offs.clone(),
        lookahead_ids={l: torch.cat([ids[l][:, :1], torch.randint(0, num_experts, (n, top_k + 1), generator=g)], 1)
                       for l in ids},
        lookahead_scores={l: torch.zeros(n, top_k + 2) for l in ids})


def _check_min_properties(trace, batch, slots):
    calls = layer_calls(trace, batch)
    mn = belady_min(calls, slots)
    assert bypass_bound(calls, slots) <= mn.loads
    oracle = replay(trace, calls, slots, "predictive", "oracle-distance")
    assert oracle.loads == mn.loads, "predictive policy with the true next-use distances must make MIN's loads"
    # prefetching the true experts (each waits for the slot Belady would free): MIN's loads, every use ready
    future = replay(trace, calls, slots, "predictive", "oracle")
    assert future.loads == mn.loads and future.ready == future.uses and future.wasted_loads == 0
    # without streaming a prefetch takes what it finds before the call: never below MIN
    assert replay(trace, calls, slots, "predictive", "oracle", stream=False).loads >= mn.loads
    lru = replay(trace, calls, slots, "lru")
    assert lru.resident <= mn.resident
    others = [lru, replay(trace, calls, slots, "lfu"), replay(trace, calls, slots, "predictive")]
    for source in ("lookahead", "oracle"):
        cands = candidate_sets(trace, source)
        others.append(replay(trace, calls, slots, "predictive", source, candidates=cands))
        others.append(replay(trace, calls, slots, "lru", source, candidates=cands, issue="first"))
    for r in others:
        assert r.loads >= mn.loads, f"{r.policy}+{r.predictor} made {r.loads} loads < MIN's {mn.loads}"
        assert r.uses == mn.uses and r.min_loads == mn.loads
        # the figures add up: every use is resident, ready after a prefetch, or a demand load
        assert r.resident <= r.ready <= r.uses and r.loads == r.demand_loads + r.prefetch_loads
        assert r.uses - r.ready <= r.demand_loads and r.wasted_loads <= r.prefetch_loads
        if r.predictor == "none":
            assert r.prefetch_loads == 0 and r.ready == r.resident
    return mn, others


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_layers=st.integers(2, 4), num_experts=st.integers(2, 8), top_k=st.integers(1, 3),
       seq_lens=st.lists(st.integers(1, 12), min_size=1, max_size=4), batch=st.sampled_from([1, 2, 3]),
       slot_share=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_min_is_a_lower_bound_on_random_traces(num_layers, num_experts, top_k, seq_lens, batch, slot_share, seed):
    top_k = min(top_k, num_experts)
    trace = _random_trace(num_layers, num_experts, top_k, seq_lens, seed)
    slots = max(1, round(slot_share * num_layers * num_experts))
    _check_min_properties(trace, batch, slots)


@pytest.fixture(scope="module")
def tiny():
    torch._dynamo.reset()
    model = build_tiny_model("mixtral", num_layers=3, seed=4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(6)]
    trace = record_routing(model, batches, progress=False)
    torch._dynamo.reset()
    return model, batches, trace


def test_recorded_trace_matches_eager_routing_and_round_trips(tiny, tmp_path):
    model, batches, trace = tiny
    assert trace.layers == [0, 1, 2] and trace.num_tokens == 6 * 4 * 32 and trace.num_sequences == 24
    assert torch.equal(trace.token_ids, torch.cat([b.reshape(-1) for b in batches]))
    with torch.no_grad():
        logits = model(batches[0], output_router_logits=True).router_logits
    for l in trace.layers:
        want = logits[l].topk(2, dim=-1).indices.sort(-1).values
        assert torch.equal(trace.ids[l][:128].sort(-1).values, want)
        assert trace.lookahead_ids[l].shape == (trace.num_tokens, 4)
    path = str(tmp_path / "trace.safetensors")
    trace.save(path)
    back = RoutingTrace.load(path, model=model)
    assert back.fingerprint == trace.fingerprint == fingerprint(model)
    for l in trace.layers:
        assert torch.equal(back.ids[l], trace.ids[l]) and torch.equal(back.weights[l], trace.weights[l])
        assert torch.equal(back.lookahead_ids[l], trace.lookahead_ids[l])
    assert torch.equal(back.seq_offsets, trace.seq_offsets) and torch.equal(back.batch_offsets, trace.batch_offsets)
    other = build_tiny_model("mixtral", num_layers=3, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        RoutingTrace.load(path, model=other)
    assert not any(e.recorder for e in engines_for_module(model))


def test_min_properties_on_a_recorded_trace(tiny):
    _, _, trace = tiny
    total = sum(trace.num_experts.values())
    trace = trace.select_sequences(list(range(8)))
    for batch in (1, 4):
        for share in (0.125, 0.25, 0.5):
            _check_min_properties(trace, batch, slots_for_share(trace, share))
    assert total == 24


@pytest.fixture(scope="module")
def trained(tiny):
    model, _, trace = tiny
    return train_path_predictor(trace, model, epochs=40, context=2, width=64, progress=False, log=None)


def test_path_predictor_beats_random_and_refuses_other_models(tiny, trained, tmp_path):
    model, _, trace = tiny
    pred = trained
    n_val = round(trace.num_sequences * 0.1)       # train_path_predictor's validation split
    val = trace.select_sequences(list(range(trace.num_sequences - n_val, trace.num_sequences)))
    feats = path_features(_embeddings(model, val.token_ids), val.seq_offsets, pred.context)
    cand = pred.candidates(feats)
    recalls = [prediction_metrics(cand[:, i], val.ids[l])[1] for i, l in enumerate(pred.layers)]
    random_recall = cand.shape[-1] / 8             # a random set of k+1 of 8 experts
    assert recalls[0] > random_recall + 0.2, (recalls, random_recall)
    assert sum(recalls) / len(recalls) > random_recall + 0.05, (recalls, random_recall)
    assert pred.metrics["per_layer"]["0"]["recall"] == pytest.approx(recalls[0])
    path = str(tmp_path / "pred.safetensors")
    pred.save(path)
    back = PathPredictor.load(path, model=model)
    assert torch.equal(back.scores(feats), pred.scores(feats))
    other = build_tiny_model("mixtral", num_layers=3, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        PathPredictor.load(path, model=other)
    # compiled with another model's routers: refused when the engine builds the predictor
    other.compile(backend="expertflow")
    with torch.no_grad():
        other(torch.zeros(1, 4, dtype=torch.long))
    (engine,) = engines_for_module(other)
    from expertflow_compile.config import ExpertFlowConfig
    cfg = ExpertFlowConfig.from_options({"predictor": "path", "predictor_path": path})
    with pytest.raises(ValueError, match="router digest"):
        make_predictor(cfg, engine.view())


def test_live_path_predictor_generates_the_same_tokens(trained, tmp_path):
    path = str(tmp_path / "pred.safetensors")
    trained.save(path)
    torch._dynamo.reset()
    live = build_tiny_model("mixtral", num_layers=3, seed=4)
    x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = live.generate(x, max_new_tokens=12, do_sample=False)
    live.compile(backend="expertflow", options={"expert_budget": "50%", "predictor": "path", "predictor_path": path,
                                                "policy": "predictive"})
    out = live.generate(x, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    (engine,) = engines_for_module(live)
    assert isinstance(engine.predictor, PathPredictor)
    assert engine.prediction["predicted"] > 0 and engine.stats_dict()["predictor_recall"] > 0


def _view_of(model):
    model.compile(backend="expertflow")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    (engine,) = engines_for_module(model)
    return engine.view()


def test_oracle_refuses_a_trace_of_another_model(tiny, tmp_path):
    from expertflow_compile.config import ExpertFlowConfig
    from expertflow_compile.runtime.prediction import OraclePredictor

    _, _, trace = tiny
    assert trace.meta["router_digest"]
    path = str(tmp_path / "trace.safetensors")
    trace.save(path)
    cfg = ExpertFlowConfig.from_options({"predictor": "oracle", "predictor_path": path})
    torch._dynamo.reset()
    same = _view_of(build_tiny_model("mixtral", num_layers=3, seed=4))     # the traced model, rebuilt
    assert isinstance(make_predictor(cfg, same), OraclePredictor)
    torch._dynamo.reset()
    other = build_tiny_model("mixtral", num_layers=3, seed=5)    # same family and layers, other weights
    with pytest.raises(ValueError, match="router digest"):
        make_predictor(cfg, _view_of(other))
    # an old trace without a router digest cannot be checked: refused, naming the file
    trace.meta.pop("router_digest")
    trace.save(path)
    with pytest.raises(ValueError, match=f"{path}.*no router digest"):
        make_predictor(cfg, same)


def test_file_errors_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 8)
    for load, what in ((RoutingTrace.load, "routing trace"), (PathPredictor.load, "path-predictor file")):
        for bad in (garbage, tmp_path, tmp_path / "missing.safetensors"):
            with pytest.raises(ValueError, match=f"{what} '{bad}'"):
                load(str(bad))


def test_a_crafted_predictor_file_is_refused_before_allocating(trained, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "pred.safetensors")
    trained.save(path)
    with safe_open(path, framework="pt") as f:
        md = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(md["expertflow"])
    for field, value in (("width", 2 ** 24), ("in_dim", 2 ** 24), ("num_experts", 2 ** 20), ("width", -3),
                         ("layers", "all")):
        crafted = dict(info, **{field: value})
        bad = str(tmp_path / f"crafted_{field}.safetensors")
        save_file(state, bad, metadata={"expertflow": json.dumps(crafted), "fingerprint": md["fingerprint"]})
        # a net of these sizes would take terabytes: the sizes are checked against the
        # file's own tensors (and the model) before anything is built
        with pytest.raises(ValueError, match="path predictor") as exc:
            PathPredictor.load(bad)
        assert bad in str(exc.value)


def test_a_predictor_for_other_layers_is_refused_before_reading_its_tensors(trained, tmp_path):
    from expertflow_compile.runtime.prediction import ModelView

    path = str(tmp_path / "pred.safetensors")
    trained.save(path)
    view = ModelView(order=(0, 1), num_experts={0: 8, 1: 8}, top_k={0: 2, 1: 2})
    with pytest.raises(ValueError, match="MoE layers"):
        PathPredictor.load(path, view=view)
