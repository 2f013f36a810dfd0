import pytest
import torch
from hypothesis import given, settings, strategies as st

from expertflow_compile.compiler import ops  # noqa: F401
from expertflow_compile.config import ExpertFlowConfig
from expertflow_compile.kernels.reference import grouped_experts_reference
from expertflow_compile.layer import ExpertList, ExpertMath, LayerPlan
from expertflow_compile.runtime.engine import ExpertEngine


def _silu_gate(h):
    g, u = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def _engine(E, H, I, K, transposed=False, bias=False, prescale=False):
    eng = ExpertEngine(ExpertFlowConfig())
    math = ExpertMath(up_transposed=transposed, down_transposed=transposed, gate_fn=_silu_gate,
                      prescale=prescale)
    up = torch.randn(E, H, 2 * I) if transposed else torch.randn(E, 2 * I, H)
    down = torch.randn(E, I, H) if transposed else torch.randn(E, H, I)
    bu, bd = (torch.randn(E, 2 * I), torch.randn(E, H)) if bias else (None, None)
    eng.register_layer(LayerPlan(0, E, K, H, math, torch.float32, H, bias, bias), [up, down, bu, bd])
    return eng, up, down, bu, bd


def _routing(T, E, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return ids, w


@given(T=st.integers(1, 12), E=st.integers(1, 16), K=st.integers(1, 4), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_permute_groups_pairs_by_expert(T, E, K, seed):
    K = min(K, E)
    ids, _ = _routing(T, E, K, seed)
    order, offsets = torch.ops.expertflow.permute(ids, E)
    flat = ids.reshape(-1)
    assert sorted(order.tolist()) == list(range(T * K))
    assert offsets[0] == 0 and offsets[-1] == T * K
    for e in range(E):
        chunk = order[offsets[e]:offsets[e + 1]]
        assert (flat[chunk] == e).all()
        assert chunk.tolist() == sorted(chunk.tolist())  # stable within an expert


@pytest.mark.parametrize("transposed,bias,prescale", [(False, False, False), (True, True, False),
                                                      (True, False, True)])
def test_grouped_gemm_equals_per_token_loop(transposed, bias, prescale):
    """sum_k w_k * expert(x), or sum_k expert(w_k * x) for a pre-scaling family (Llama-4)."""
    T, E, H, I, K = 6, 5, 8, 4, 2
    eng, up, down, bu, bd = _engine(E, H, I, K, transposed, bias, prescale)
    ids, w = _routing(T, E, K)
    x = torch.randn(T, H)
    order, offsets = torch.ops.expertflow.permute(ids, E)
    token = torch.ops.expertflow.prefetch(torch.ops.expertflow.predict(x, eng.id, 0, 3), eng.id, 0)
    out = torch.ops.expertflow.grouped_gemm(x, w, order, offsets, token, up, down, bu, bd, eng.id, 0)
    expected = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            Wu = up[e] if transposed else up[e].T
            Wd = down[e] if transposed else down[e].T
            h = (w[t, k] * x[t] if prescale else x[t]) @ Wu + (bu[e] if bias else 0)
            y = _silu_gate(h) @ Wd + (bd[e] if bias else 0)
            expected[t] += y if prescale else w[t, k] * y
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    ref = grouped_experts_reference(x, w, order, offsets.tolist(),
                                    lambda e: {"up": up[e], "down": down[e],
                                               "up_bias": bu[e] if bias else None,
                                               "down_bias": bd[e] if bias else None},
                                    eng.layers[0].math, H, torch.float32)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    eng.close()


def test_opcheck_every_op():
    T, E, H, I, K = 5, 4, 8, 4, 2
    eng, up, down, bu, bd = _engine(E, H, I, K)
    ids, w = _routing(T, E, K)
    x = torch.randn(T, H)
    order, offsets = torch.ops.expertflow.permute(ids, E)
    pred = torch.ops.expertflow.predict(x, eng.id, 0, 3)
    token = torch.ops.expertflow.prefetch(pred, eng.id, 0)
    checks = [
        (torch.ops.expertflow.permute.default, (ids, E)),
        (torch.ops.expertflow.predict.default, (x, eng.id, 0, 3)),
        (torch.ops.expertflow.prefetch.default, (pred, eng.id, 0)),
        (torch.ops.expertflow.grouped_gemm.default, (x, w, order, offsets, token, up, down, None, None, eng.id, 0)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    eng.close()


def test_modules_op_equals_the_stacked_op_and_opchecks():
    """grouped_gemm_modules (one tensor per expert, ModuleDict experts) gives what
    grouped_gemm gives on the same weights stacked."""
    T, E, H, I, K = 5, 4, 8, 4, 2
    eng, up, down, _, _ = _engine(E, H, I, K)
    ups, downs = [up[e].clone() for e in range(E)], [down[e].clone() for e in range(E)]
    eng2, _, _, _, _ = _engine(E, H, I, K)
    eng2.register_layer(eng2.layers[0], [ExpertList(ups), ExpertList(downs)])
    ids, w = _routing(T, E, K)
    x = torch.randn(T, H)
    order, offsets = torch.ops.expertflow.permute(ids, E)
    token = torch.ops.expertflow.prefetch(torch.ops.expertflow.predict(x, eng.id, 0, 3), eng.id, 0)
    ref = torch.ops.expertflow.grouped_gemm(x, w, order, offsets, token, up, down, None, None, eng.id, 0)
    args = (x, w, order, offsets, token, ups, downs, eng2.id, 0)
    torch.testing.assert_close(torch.ops.expertflow.grouped_gemm_modules(*args), ref)
    torch.library.opcheck(torch.ops.expertflow.grouped_gemm_modules.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    eng.close()
    eng2.close()


def test_reference_skips_empty_experts():
    E, H, I = 4, 6, 3
    math = ExpertMath(False, False, _silu_gate)
    up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    ids = torch.tensor([[1], [1], [3]])
    order, offsets = torch.ops.expertflow.permute(ids, E)
    used = []

    def weights(e):
        used.append(e)
        return {"up": up[e], "down": down[e]}

    grouped_experts_reference(torch.randn(3, H), torch.ones(3, 1), order, offsets.tolist(), weights, math, H,
                              torch.float32)
    assert used == [1, 3]


def test_deleted_engine_gives_clear_error():
    eng, *_ = _engine(2, 4, 2, 1)
    eid = eng.id
    eng.close()
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.expertflow.predict(torch.zeros(1, 4), eid, 0, 2)


def test_expert_ops_refuse_autograd_at_forward():
    """Inference-only: with autograd recording, the op refuses at once (not at backward())."""
    from expertflow_compile.errors import InferenceOnlyError

    T, E, H, I, K = 4, 4, 8, 4, 2
    eng, up, down, _, _ = _engine(E, H, I, K)
    ids, w = _routing(T, E, K)
    x = torch.randn(T, H)
    order, offsets = torch.ops.expertflow.permute(ids, E)
    token = torch.ops.expertflow.prefetch(torch.ops.expertflow.predict(x, eng.id, 0, 3), eng.id, 0)
    args = (x, w, order, offsets, token, up, down, None, None, eng.id, 0)
    plain = torch.ops.expertflow.grouped_gemm(*args)          # nothing requires grad: runs
    for needs_grad in (x, up):
        needs_grad.requires_grad_(True)
        with pytest.raises(InferenceOnlyError, match=r"MoE layer 0 .* torch.no_grad\(\)"):
            torch.ops.expertflow.grouped_gemm(*args)
        with torch.no_grad():
            torch.testing.assert_close(torch.ops.expertflow.grouped_gemm(*args), plain)
        needs_grad.requires_grad_(False)
    ups, downs = [up[e].clone().requires_grad_(True) for e in range(E)], [down[e].clone() for e in range(E)]
    eng2, _, _, _, _ = _engine(E, H, I, K)
    eng2.register_layer(eng2.layers[0], [ExpertList(ups), ExpertList(downs)])
    with pytest.raises(InferenceOnlyError, match="MoE layer 0"):
        torch.ops.expertflow.grouped_gemm_modules(x, w, order, offsets, token, ups, downs, eng2.id, 0)
    eng.close()
    eng2.close()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_compiled_forward_with_grad_refuses_with_our_message(inner):
    """A compiled model's forward with grad enabled (HF parameters require grad) stops at the
    first rewritten block with InferenceOnlyError, unwrapped by Dynamo; under no_grad it is exact."""
    from expertflow_compile.errors import InferenceOnlyError
    from expertflow_compile.testing.tiny_models import build_tiny_model

    model = build_tiny_model("mixtral", num_layers=2)
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    model.compile(backend="expertflow", options={"inner_backend": inner})
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        model(x)
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
