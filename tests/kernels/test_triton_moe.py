"""Triton MoE kernels vs the torch reference, under the Triton interpreter (CPU).

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set at
the very top of this module. Shapes are tiny (the interpreter runs every program
instance in numpy); the larger sweep is ``@pytest.mark.slow``.

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_moe.py -q
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import expertflow_compile.compiler.ops  # noqa: E402, F401  (registers expertflow::permute)
from expertflow_compile.kernels import triton_moe as tm  # noqa: E402
from expertflow_compile.kernels.activations import (  # noqa: E402
    GLU_KINDS, KIND_NAMES, PLAIN_KINDS, ActivationKind, apply_activation, classify_gate_fn,
)
from expertflow_compile.kernels.reference import grouped_experts_reference  # noqa: E402
from expertflow_compile.layer import ExpertMath  # noqa: E402
from expertflow_compile.kernels.triton_moe import (  # noqa: E402
    KernelConfig, MoEConfig, SlotTable, moe_align_block_size, slot_tables_from_views, triton_grouped_experts,
)

if not tm._triton_imported_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# small tiles so that tiny H/I still span several tiles and leave ragged edges
SMALL = MoEConfig(BLOCK_M=16, up=KernelConfig(BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1),
                  down=KernelConfig(BLOCK_N=16, BLOCK_K=16, GROUP_M=3, num_warps=1, num_stages=1))
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
FAST = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----- helpers ---------------------------------------------------------------------------

def _kind(name, alpha=None, limit=None):
    return ActivationKind.of(name, alpha, limit)


def _routing(g, T, E, K, num_used):
    """[T, K] distinct expert ids per token drawn from ``num_used`` experts (the rest get none)."""
    used = torch.randperm(E, generator=g)[:max(K, num_used)]
    ids = torch.stack([used[torch.randperm(used.numel(), generator=g)[:K]] for _ in range(T)])
    return ids, used


def _case(*, seed, T, E, K, H, I, dtype, kind, bias, up_t, down_t, pool_extra=None, num_used=None,
          drop_unused=False):
    """Random layer + routing. Weights live in a pool of ``E + pool_extra`` slots (None: plain [E, ...])."""
    g = torch.Generator().manual_seed(seed)
    n_up = 2 * I if kind.is_glu else I
    S = E if pool_extra is None else E + pool_extra
    up_scale = 3.0 if kind.name == "swiglu_oai" else 1.0     # reach GPT-OSS's clamps
    up = torch.randn(S, n_up, H, generator=g) * (up_scale / math.sqrt(H))
    down = torch.randn(S, H, I, generator=g) / math.sqrt(I)
    bu = torch.randn(S, n_up, generator=g) * 0.5 if bias else None
    bd = torch.randn(S, H, generator=g) * 0.5 if bias else None
    up_s = up.transpose(1, 2).contiguous() if up_t else up          # stored layouts
    down_s = down.transpose(1, 2).contiguous() if down_t else down
    up_s, down_s = up_s.to(dtype), down_s.to(dtype)
    bu = bu.to(dtype) if bu is not None else None
    bd = bd.to(dtype) if bd is not None else None
    x = torch.randn(T, H, generator=g).to(dtype)
    ids, used = _routing(g, T, E, K, num_used if num_used is not None else E)
    w = torch.softmax(torch.randn(T, K, generator=g), -1).to(dtype)
    if pool_extra is None:
        slot = None
        slot_of = list(range(E))
    else:
        slot = torch.randperm(S, generator=g)[:E]
        if drop_unused:
            unused = [e for e in range(E) if e not in set(used.tolist())]
            slot[unused] = -1
        slot_of = slot.tolist()
    return dict(x=x, ids=ids, w=w, up=up_s, down=down_s, bu=bu, bd=bd, slot=slot, slot_of=slot_of,
                kind=kind, up_t=up_t, down_t=down_t, H=H)


def _reference(c, gate_fn=None):
    order, offsets = torch.ops.expertflow.permute(c["ids"], len(c["slot_of"]))
    s = c["slot_of"]

    def weights(e):
        return {"up": c["up"][s[e]], "down": c["down"][s[e]],
                "up_bias": c["bu"][s[e]] if c["bu"] is not None else None,
                "down_bias": c["bd"][s[e]] if c["bd"] is not None else None}

    math_ = ExpertMath(c["up_t"], c["down_t"], gate_fn or c["kind"].gate_fn())
    return grouped_experts_reference(c["x"], c["w"], order, offsets.tolist(), weights, math_,
                                     c["H"], c["x"].dtype)


def _triton(c, config=SMALL, **kw):
    return triton_grouped_experts(c["x"], c["ids"], c["w"], c["up"], c["down"], c["bu"], c["bd"],
                                  kind=c["kind"], up_transposed=c["up_t"], down_transposed=c["down_t"],
                                  slot_of_expert=c["slot"], config=config, **kw)


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = TOL[dtype]
    scale = max(1.0, float(ref.float().abs().max()))
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)


# ----- moe_align_block_size ----------------------------------------------------------------

def _align_brute(ids, E, bm):
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, blocks = [], []
    for e in range(E):
        rows = [p for p, x in enumerate(flat) if x == e]
        if not rows:
            continue
        padded = -(-len(rows) // bm) * bm
        sorted_ids += rows + [n] * (padded - len(rows))
        blocks += [e] * (padded // bm)
    return sorted_ids, blocks


@given(T=st.integers(1, 9), E=st.integers(1, 9), K=st.integers(1, 4), bm=st.sampled_from([1, 2, 4, 16]),
       seed=st.integers(0, 10_000), invalid=st.booleans())
@settings(max_examples=60, deadline=None, derandomize=True)
def test_align_matches_brute_force(T, E, K, bm, seed, invalid):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    if invalid:                        # ids outside [0, E) belong to no expert
        ids[0, 0] = -1
        ids[-1, -1] = E + 3
    sorted_ids, blocks, ntpp = moe_align_block_size(ids, E, bm)
    want_ids, want_blocks = _align_brute(ids, E, bm)
    n = T * K
    static = n + E * (bm - 1)
    assert sorted_ids.shape == (static,) and sorted_ids.dtype == torch.int64
    assert blocks.shape == (static // bm,)
    assert int(ntpp) == len(want_ids)
    assert sorted_ids[: len(want_ids)].tolist() == want_ids
    assert (sorted_ids[len(want_ids):] == n).all()          # the tail is all sentinels
    assert blocks[: len(want_blocks)].tolist() == want_blocks
    assert (blocks[len(want_blocks):] == -1).all()


def test_align_padding_static_size_and_zero_token_experts():
    ids = torch.tensor([[0, 3], [3, 0], [3, 5]])             # experts 1, 2, 4 get nothing
    sorted_ids, blocks, ntpp = moe_align_block_size(ids, 6, 4)
    assert sorted_ids.numel() == 6 + 6 * 3                    # T*K + E*(block_m-1), whatever the routing
    assert int(ntpp) == 12                                    # three experts, one block of 4 each
    assert sorted_ids[:12].tolist() == [0, 3, 6, 6, 1, 2, 4, 6, 5, 6, 6, 6]
    assert blocks.tolist() == [0, 3, 5, -1, -1, -1]
    assert not {1, 2, 4} & set(blocks.tolist())               # zero-token experts own no block
    # the same shapes for any routing of the same size
    other = moe_align_block_size(torch.zeros(3, 2, dtype=torch.int64), 6, 4)
    assert [t.shape for t in other] == [sorted_ids.shape, blocks.shape, ntpp.shape]


def test_align_traces_without_host_sync():
    """fullgraph=True fails on any .item()/.tolist()/data-dependent shape: none in align."""
    torch._dynamo.reset()
    compiled = torch.compile(moe_align_block_size, fullgraph=True, backend="eager", dynamic=False)
    ids = torch.tensor([[0, 2], [2, 3], [0, 2]])
    for got, want in zip(compiled(ids, 5, 4), moe_align_block_size(ids, 5, 4)):
        assert torch.equal(got, want)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        shapes = [t.shape for t in moe_align_block_size(torch.empty(7, 3, dtype=torch.int64), 8, 16)]
    assert shapes == [(21 + 8 * 15,), ((21 + 8 * 15) // 16,), (1,)]


# ----- kernels vs reference ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", KIND_NAMES)
def test_every_kind_and_dtype(name, dtype):
    kind = _kind(name, 1.5, 2.5) if name == "swiglu_oai" else _kind(name)
    c = _case(seed=KIND_NAMES.index(name), T=5, E=4, K=2, H=20, I=18, dtype=dtype, kind=kind, bias=True,
              up_t=name in ("swiglu_oai", "gelu"), down_t=name == "swiglu_oai", num_used=3)
    _assert_close(_triton(c), _reference(c), dtype)


@st.composite
def _cases(draw, max_t=8, max_hi=40):
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, min(4, E)))
    name = draw(st.sampled_from(KIND_NAMES))
    if name == "swiglu_oai":
        kind = _kind(name, draw(st.sampled_from([1.702, 1.0])), draw(st.sampled_from([7.0, 1.5])))
    else:
        kind = _kind(name)
    pooled = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**16)), T=draw(st.sampled_from([1, 2, 3, 5, max_t])), E=E, K=K,
        H=draw(st.integers(8, max_hi)), I=draw(st.integers(8, max_hi)),
        dtype=draw(st.sampled_from(DTYPES)), kind=kind, bias=draw(st.booleans()),
        up_t=draw(st.booleans()), down_t=draw(st.booleans()),
        pool_extra=draw(st.integers(0, 3)) if pooled else None,
        num_used=draw(st.integers(K, E)), drop_unused=pooled and draw(st.booleans()),
    )


@given(params=_cases())
@FAST
def test_property_matches_reference(params):
    c = _case(**params)
    _assert_close(_triton(c), _reference(c), params["dtype"])


@pytest.mark.slow
@given(params=_cases(max_t=33, max_hi=100))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_matches_reference_sweep(params):
    c = _case(**params)
    cfg = tm.default_moe_config(c["H"], params["I"], params["E"], params["dtype"])
    cfg = MoEConfig(BLOCK_M=min(cfg.BLOCK_M, 32), up=KernelConfig(BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
                    down=KernelConfig(BLOCK_N=32, BLOCK_K=16, GROUP_M=8))
    _assert_close(_triton(c, config=cfg), _reference(c), params["dtype"])


def test_one_token_one_expert_and_3d_hidden():
    c = _case(seed=1, T=1, E=1, K=1, H=9, I=11, dtype=torch.float32, kind=_kind("silu_glu"),
              bias=False, up_t=False, down_t=False)
    _assert_close(_triton(c), _reference(c), torch.float32)
    c = _case(seed=2, T=6, E=3, K=2, H=16, I=16, dtype=torch.float32, kind=_kind("gelu_glu"),
              bias=True, up_t=False, down_t=True)
    out = triton_grouped_experts(c["x"].view(2, 3, 16), c["ids"].view(2, 3, 2), c["w"].view(2, 3, 2),
                                 c["up"], c["down"], c["bu"], c["bd"], kind="gelu_glu",
                                 up_transposed=False, down_transposed=True, config=SMALL)
    assert out.shape == (2, 3, 16)
    _assert_close(out.view(6, 16), _reference(c), torch.float32)


def test_default_config_runs():
    c = _case(seed=3, T=3, E=2, K=2, H=24, I=20, dtype=torch.bfloat16, kind=_kind("silu_glu"),
              bias=False, up_t=False, down_t=False)
    _assert_close(_triton(c, config=None), _reference(c), torch.bfloat16)


def test_non_resident_expert_contributes_zero():
    """slot -1 for an expert that has tokens: its pairs add nothing (vLLM expert_map semantics)."""
    c = _case(seed=4, T=6, E=3, K=2, H=16, I=12, dtype=torch.float32, kind=_kind("silu_glu"),
              bias=True, up_t=False, down_t=False, pool_extra=1)
    absent = int(c["ids"][0, 0])
    c["slot"] = c["slot"].clone()
    c["slot"][absent] = -1
    out = _triton(c)
    # reference: the absent expert's weight rows read as zero -> zero contribution
    zero = dict(c)
    S = c["up"].shape[0]
    zero["up"], zero["down"] = c["up"].clone(), c["down"].clone()
    zero["bu"], zero["bd"] = c["bu"].clone(), c["bd"].clone()
    spare = (set(range(S)) - set(c["slot"].tolist())).pop()   # a slot no expert uses
    for t in (zero["up"], zero["down"], zero["bu"], zero["bd"]):
        t[spare] = 0
    zero["slot_of"] = [spare if e == absent else s for e, s in enumerate(c["slot"].tolist())]
    _assert_close(out, _reference(zero), torch.float32)


def test_slot_tables_from_cache_like_views():
    """Experts in separately allocated flat byte buffers (the expert cache's slots)."""
    E, H, I, dtype = 5, 24, 20, torch.bfloat16
    c = _case(seed=5, T=7, E=E, K=2, H=H, I=I, dtype=dtype, kind=_kind("swiglu_oai"), bias=True,
              up_t=True, down_t=True, num_used=4)
    parts = [("up", c["up"]), ("down", c["down"]), ("up_bias", c["bu"]), ("down_bias", c["bd"])]
    used = sorted(set(c["ids"].reshape(-1).tolist()))
    views = {}
    for e in used:
        sizes = [t[e].numel() * t.element_size() for _, t in parts]
        buf = torch.zeros(sum(-(-n // 48) * 48 for n in sizes) + 64, dtype=torch.uint8)
        off, d = 48 * (e % 2), {}                       # 48-byte packing: slots only 8-element aligned
        for (name, t), n in zip(parts, sizes):
            v = buf[off:off + n].view(dtype).view(t[e].shape)
            v.copy_(t[e])
            d[name] = v
            off += -(-n // 48) * 48
        views[e] = d
    kw = slot_tables_from_views(views, E, up_transposed=True, down_transposed=True)
    assert kw["slot_of_expert"].tolist().count(-1) == E - len(used)
    assert isinstance(kw["up_weights"], SlotTable) and kw["up_weights"].unit < 16   # 48-byte packing
    out = triton_grouped_experts(c["x"], c["ids"], c["w"], kind="swiglu_oai", up_transposed=True,
                                 down_transposed=True, config=SMALL, **kw)
    _assert_close(out, _reference(c), dtype)


def test_slot_table_strides_and_units():
    w = torch.zeros(4, 6, 32)
    t = SlotTable.from_stacked(w)
    assert (t.n, t.k, t.stride_n, t.stride_k, t.unit) == (6, 32, 32, 1, 16)
    assert t.offsets.tolist() == [0, 12, 24, 36]                # 192-element slots in 16-element units
    tt = SlotTable.from_stacked(torch.zeros(3, 5, 7), transposed=True)
    assert (tt.n, tt.k, tt.stride_n, tt.stride_k, tt.unit) == (7, 5, 1, 7, 1)
    b = SlotTable.from_stacked(torch.zeros(3, 10))
    assert (b.n, b.stride_n, b.unit) == (10, 1, 2)


# ----- configs -----------------------------------------------------------------------------

def test_config_is_a_function_of_shape_only(tmp_path, monkeypatch):
    a = tm.get_moe_config(4096, 14336, 8, torch.bfloat16)
    assert a == tm.get_moe_config(4096, 14336, 8, torch.bfloat16)
    assert tm.get_moe_config(2048, 768, 128, torch.bfloat16).BLOCK_M <= a.BLOCK_M   # many small experts
    tuned = {tm.config_key(64, 32, 4, torch.float16): {
        "BLOCK_M": 32, "up": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 8}, "down": {"BLOCK_N": 256}}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned))
    monkeypatch.setenv(tm.CONFIG_ENV, str(path))
    tm.load_tuned_configs.cache_clear()
    try:
        cfg = tm.get_moe_config(64, 32, 4, torch.float16)
        assert (cfg.BLOCK_M, cfg.up.BLOCK_N, cfg.up.BLOCK_K, cfg.up.num_warps, cfg.down.BLOCK_N) == (32, 32, 128, 8, 256)
        assert tm.get_moe_config(64, 32, 4, torch.bfloat16) == tm.default_moe_config(64, 32, 4, torch.bfloat16)
        path.write_text(json.dumps({tm.config_key(1, 1, 1, torch.float16): {"BLOCK_MM": 16}}))
        tm.load_tuned_configs.cache_clear()
        with pytest.raises(ValueError, match="unknown MoE config keys"):
            tm.get_moe_config(1, 1, 1, torch.float16)
    finally:
        tm.load_tuned_configs.cache_clear()
    with pytest.raises(ValueError, match="powers of two"):
        MoEConfig(BLOCK_M=24)


def test_kernels_compile_for_sm90_without_a_gpu():
    """The compiled (non-interpreted) path: Triton -> PTX -> cubin for sm_90 via ptxas.

    Runs in a subprocess without TRITON_INTERPRET (which replaces Triton's own helpers
    process-wide). Checks the K loop is software-pipelined when the shapes are aligned.
    """
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    script = textwrap.dedent("""
        import json, torch
        from expertflow_compile.kernels.triton_moe import compile_for_target as c
        r = [c("up", torch.bfloat16, kind="swiglu_oai", has_bias=True),
             c("up", torch.bfloat16, kind="gelu_tanh_glu"),
             c("up", torch.float32, kind="relu", has_bias=True),
             c("down", torch.bfloat16, has_bias=True),
             c("down", torch.float16)]
        print(json.dumps(r))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("ptxas unavailable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["async_copies"] > 0 for r in results), results


# ----- classify_gate_fn --------------------------------------------------------------------

def _halves(h):
    return h.chunk(2, dim=-1)


HF_STYLE = {   # how the families write it (act(gate) * up on the two halves; plain activations)
    "silu_glu": lambda h: F.silu(_halves(h)[0]) * _halves(h)[1],
    "gelu_glu": lambda h: F.gelu(_halves(h)[0]) * _halves(h)[1],
    "gelu_tanh_glu": lambda h: F.gelu(_halves(h)[0], approximate="tanh") * _halves(h)[1],
    "silu": lambda h: h * torch.sigmoid(h),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": torch.relu,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(HF_STYLE))
def test_classify_recognises_each_kind(name, dtype):
    n_up = 24 if name in GLU_KINDS else 13
    assert classify_gate_fn(HF_STYLE[name], n_up, dtype) == ActivationKind(name)
    assert classify_gate_fn(ActivationKind(name).gate_fn(), n_up, dtype) == ActivationKind(name)


def test_classify_gpt_oss_with_alpha_and_limit():
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    experts = gpt_oss.GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=12, num_local_experts=2))
    kind = classify_gate_fn(experts._apply_gate, 24, torch.bfloat16)
    assert kind == ActivationKind("swiglu_oai", 1.702, 7.0)
    experts.alpha, experts.limit = 1.25, 3.5                  # not the defaults: fitted
    assert classify_gate_fn(experts._apply_gate, 24, torch.float32) == ActivationKind("swiglu_oai", 1.25, 3.5)
    # and the classified kind drives the kernel to the model's own function's result
    c = _case(seed=6, T=4, E=3, K=2, H=16, I=12, dtype=torch.float32, kind=kind, bias=True,
              up_t=True, down_t=True)
    c["kind"] = classify_gate_fn(experts._apply_gate, 24, torch.float32)
    _assert_close(_triton(c), _reference(c, gate_fn=experts._apply_gate), torch.float32)


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 2.0), (2.3, 10.0)])
def test_classify_fits_swiglu_parameters(alpha, limit):
    fn = ActivationKind("swiglu_oai", alpha, limit).gate_fn()
    assert classify_gate_fn(fn, 16, torch.float16) == ActivationKind("swiglu_oai", alpha, limit)


@pytest.mark.parametrize("fn", [
    lambda x: x.chunk(2)[0] * 3 + torch.sin(x.chunk(2)[0]),            # chunks rows, not features
    lambda x: x.chunk(2, -1)[0] * 3 + torch.sin(x.chunk(2, -1)[0]),
    lambda x: F.silu(x.chunk(2, -1)[1]) * x.chunk(2, -1)[0],            # gate/up swapped
    lambda x: F.silu(x[..., ::2]) * x[..., 1::2],                       # interleaved, unclamped SiLU
    lambda x: torch.tanh(x),
    lambda x: F.silu(x) * 2,
    lambda x: 1 / 0,                                                    # raises
    lambda x: x.sum(),
], ids=["rows", "sin", "swapped", "interleaved-silu", "tanh", "scaled", "raises", "scalar"])
def test_classify_unknown_returns_none(fn):
    assert classify_gate_fn(fn, 24, torch.float32) is None


def test_classify_distinguishes_exact_and_tanh_gelu():
    assert classify_gate_fn(lambda h: F.gelu(h), 10) == ActivationKind("gelu")
    assert classify_gate_fn(lambda h: F.gelu(h, approximate="tanh"), 10) == ActivationKind("gelu_tanh")


def test_apply_activation_formulas():
    h = torch.linspace(-9, 9, 40).reshape(2, 20)
    g, u = h[:, :10], h[:, 10:]
    torch.testing.assert_close(apply_activation(h, "silu_glu"), F.silu(g) * u)
    oai = apply_activation(h, ActivationKind("swiglu_oai", 1.702, 7.0))
    gi, ui = h[:, ::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
    torch.testing.assert_close(oai, (ui + 1) * gi * torch.sigmoid(1.702 * gi))
    for name in PLAIN_KINDS:
        assert apply_activation(h, name).shape == h.shape
    with pytest.raises(ValueError):
        ActivationKind("swish")
