"""Expert stores: in-memory tensors and safetensors checkpoints read on demand."""

import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from expertflow_compile.runtime import store as store_mod
from expertflow_compile.runtime.store import (
    ExpertSpec,
    FaultInjectingStore,
    SafetensorsExpertStore,
    TensorExpertStore,
    TensorSource,
    safetensors_index,
)

E, H, I = 4, 6, 5
P = "model.layers.{}.mlp.experts."


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _fused_layer(dtype, seed):
    return {
        "up": _rand(E, 2 * I, H, dtype=dtype, seed=seed),
        "down": _rand(E, H, I, dtype=dtype, seed=seed + 1),
        "up_bias": _rand(E, 2 * I, dtype=dtype, seed=seed + 2),
        "down_bias": _rand(E, H, dtype=dtype, seed=seed + 3),
    }


def _assert_reads(store, layer, ref: dict[str, torch.Tensor]):
    for e in range(store.specs[layer].num_experts):
        got = store.read(layer, e)
        assert set(got) == set(ref)
        for name, t in ref.items():
            assert got[name].dtype == store.specs[layer].dtype
            torch.testing.assert_close(got[name], t[e].to(got[name].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_roundtrip(tmp_path, dtype):
    f = str(tmp_path / "model.safetensors")
    layers = {0: _fused_layer(dtype, 0), 2: _fused_layer(dtype, 10)}
    tensors = {P.format(l) + n: t for l, d in layers.items() for n, t in d.items()}
    tensors["model.embed_tokens.weight"] = _rand(7, H)      # unrelated tensors are fine
    save_file(tensors, f)
    sources = {l: {n: TensorSource(fused=(f, P.format(l) + n)) for n in d} for l, d in layers.items()}
    with SafetensorsExpertStore(sources) as store:
        assert store.specs[0] == ExpertSpec(E, {"up": (2 * I, H), "down": (H, I), "up_bias": (2 * I,),
                                                "down_bias": (H,)}, dtype)
        assert store.total_expert_bytes() == sum(t.numel() * t.element_size() for d in layers.values()
                                                 for t in d.values())
        for l, d in layers.items():
            _assert_reads(store, l, d)


def test_reads_only_the_experts_bytes(tmp_path, monkeypatch):
    f = str(tmp_path / "m.safetensors")
    layer = _fused_layer(torch.bfloat16, 3)
    save_file({P.format(0) + n: t for n, t in layer.items()}, f)
    store = SafetensorsExpertStore({0: {n: TensorSource(fused=(f, P.format(0) + n)) for n in layer}})
    read = []
    real = os.preadv

    def counting(fd, bufs, offset):
        n = real(fd, bufs, offset)
        read.append(n)
        return n

    monkeypatch.setattr(store_mod.os, "preadv", counting)
    out = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in store.specs[0].shapes.items()}
    store.read_into(0, 2, out)
    assert sum(read) == store.specs[0].expert_nbytes()      # straight into `out`, nothing else
    assert len(read) == len(layer)
    for n, t in layer.items():
        assert torch.equal(out[n], t[2])
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.read(0, 0)


def test_per_expert_concat_transpose_and_sharded_index(tmp_path):
    # Mixtral layout: per expert w1 [I, H] (gate), w3 [I, H] (up), w2 [H, I] (down), in two shards
    w1, w3, w2 = _rand(E, I, H, seed=1), _rand(E, I, H, seed=2), _rand(E, H, I, seed=3)
    name = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    shard_of = lambda e: "model-00001-of-00002.safetensors" if e < 2 else "model-00002-of-00002.safetensors"
    shards: dict[str, dict] = {}
    for e in range(E):
        # down stored transposed ([I, H]) to exercise transpose on per-expert pieces
        for w, t in (("w1", w1[e]), ("w3", w3[e]), ("w2", w2[e].t().contiguous())):
            shards.setdefault(shard_of(e), {})[name.format(e, w)] = t
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(tmp_path / shard))
        weight_map |= {k: shard for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    index = safetensors_index(str(tmp_path))
    assert set(index) == set(weight_map)
    entry = index[name.format(3, "w3")]
    assert entry.file.endswith("model-00002-of-00002.safetensors")
    assert entry.dtype == torch.float32 and entry.shape == (I, H)
    with open(entry.file, "rb") as fh:                       # absolute offsets
        fh.seek(entry.begin)
        raw = fh.read(entry.end - entry.begin)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(I, H), w3[3])
    assert safetensors_index(str(tmp_path / "model.safetensors.index.json")) == index

    src = lambda e, w: (index[name.format(e, w)].file, name.format(e, w))
    store = SafetensorsExpertStore({0: {
        "gate_up": TensorSource(per_expert=tuple((src(e, "w1"), src(e, "w3")) for e in range(E))),
        "down": TensorSource(per_expert=tuple((src(e, "w2"),) for e in range(E)), transpose=True),
    }})
    assert store.specs[0].shapes == {"gate_up": (2 * I, H), "down": (H, I)}
    _assert_reads(store, 0, {"gate_up": torch.cat([w1, w3], dim=1), "down": w2})
    store.close()


def test_fused_transpose_and_dtype_conversion(tmp_path):
    # gpt-oss style: checkpoint gate_up [E, H, 2I], the model wants [E, 2I, H]
    up = _rand(E, 2 * I, H, dtype=torch.bfloat16, seed=5)
    bias = _rand(E, 2 * I, dtype=torch.bfloat16, seed=6)
    f = str(tmp_path / "m.safetensors")
    save_file({"up_t": up.transpose(1, 2).contiguous(), "b": bias}, f)
    sources = {1: {"up": TensorSource(fused=(f, "up_t"), transpose=True), "bias": TensorSource(fused=(f, "b"))}}
    store = SafetensorsExpertStore(sources, dtype=torch.float32)
    assert store.specs[1].dtype == torch.float32 and store.specs[1].shapes["up"] == (2 * I, H)
    _assert_reads(store, 1, {"up": up, "bias": bias})
    # expected specs: the model's dtype wins when dtype= is not given
    exp = {1: ExpertSpec(E, {"up": (2 * I, H), "bias": (2 * I,)}, torch.float64)}
    store64 = SafetensorsExpertStore(sources, expected=exp)
    assert store64.specs == exp
    _assert_reads(store64, 1, {"up": up, "bias": bias})
    # a non-contiguous destination goes through a temp copy
    out = {"up": torch.empty(H, 2 * I, dtype=torch.bfloat16).t(), "bias": torch.empty(2 * I, dtype=torch.bfloat16)}
    SafetensorsExpertStore(sources).read_into(1, 3, out)
    assert torch.equal(out["up"], up[3]) and torch.equal(out["bias"], bias[3])


def test_expected_mismatch_and_mixed_dtypes(tmp_path):
    f = str(tmp_path / "m.safetensors")
    save_file({"a": _rand(E, 3, 2), "b": _rand(E, 3, dtype=torch.bfloat16)}, f)
    src = {0: {"a": TensorSource(fused=(f, "a")), "b": TensorSource(fused=(f, "b"))}}
    with pytest.raises(ValueError, match="mixed dtypes"):
        SafetensorsExpertStore(src)
    assert SafetensorsExpertStore(src, dtype=torch.float32).specs[0].dtype == torch.float32
    bad = {0: ExpertSpec(E, {"a": (2, 3), "b": (3,)}, torch.float32)}
    with pytest.raises(ValueError, match=r"the model expects 4 experts with shapes"):
        SafetensorsExpertStore(src, expected=bad)
    save_file({"a": _rand(E, 3), "c": _rand(E + 1, 3)}, f)
    with pytest.raises(ValueError, match="has 5 experts"):
        SafetensorsExpertStore({0: {"a": TensorSource(fused=(f, "a")), "c": TensorSource(fused=(f, "c"))}})


def test_truncated_file(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({P.format(0) + "up": _rand(E, 2 * I, H), P.format(0) + "down": _rand(E, H, I)}, str(f))
    size = f.stat().st_size
    os.truncate(f, size - 16)
    with pytest.raises(ValueError) as info:
        SafetensorsExpertStore({0: {n: TensorSource(fused=(str(f), P.format(0) + n)) for n in ("up", "down")}})
    msg = str(info.value)
    assert f"checkpoint {f} is truncated" in msg
    assert "tensor 'model.layers.0.mlp.experts." in msg
    assert f"needs bytes up to {size} but the file has {size - 16}" in msg


def test_missing_tensor_file_and_bad_header(tmp_path):
    f = str(tmp_path / "m.safetensors")
    save_file({"x": _rand(E, 2)}, f)
    with pytest.raises(ValueError, match=r"tensor 'y' missing from .*m\.safetensors"):
        SafetensorsExpertStore({0: {"w": TensorSource(fused=(f, "y"))}})
    with pytest.raises(ValueError, match=r"nope\.safetensors does not exist"):
        SafetensorsExpertStore({0: {"w": TensorSource(fused=(str(tmp_path / "nope.safetensors"), "x"))}})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a valid safetensors file"):
        SafetensorsExpertStore({0: {"w": TensorSource(fused=(str(junk), "x"))}})
    junk.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(ValueError, match="not valid JSON"):
        safetensors_index(str(junk))
    with pytest.raises(ValueError, match="cannot transpose"):
        SafetensorsExpertStore({0: {"w": TensorSource(fused=(f, "x"), transpose=True)}})
    with pytest.raises(ValueError, match="exactly one of"):
        TensorSource()


def test_index_listing_a_missing_tensor(tmp_path):
    save_file({"a": _rand(2, 2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(ValueError, match=r"tensor 'b' listed in .*index\.json is missing from .*s1\.safetensors"):
        safetensors_index(str(tmp_path))


def test_concurrent_reads(tmp_path):
    f = str(tmp_path / "m.safetensors")
    layer = _fused_layer(torch.bfloat16, 7)
    save_file({n: t for n, t in layer.items()}, f)
    store = SafetensorsExpertStore({0: {n: TensorSource(fused=(f, n)) for n in layer}})
    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(50):
                e = int(torch.randint(E, (1,), generator=g))
                got = store.read(0, e)
                assert all(torch.equal(got[n], layer[n][e]) for n in layer)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_tensor_store_keeps_references_and_validates():
    layer = _fused_layer(torch.float32, 1)
    store = TensorExpertStore({3: layer})
    assert store.specs[3].shapes["down"] == (H, I)
    assert store._tensors[3]["up"].data_ptr() == layer["up"].data_ptr()     # no copy
    _assert_reads(store, 3, layer)
    # non-contiguous source (a transposed parameter) reads right too
    t = _rand(E, H, 2 * I, seed=9)
    s2 = TensorExpertStore({0: {"up": t.transpose(1, 2)}})
    assert torch.equal(s2.read(0, 1)["up"], t[1].t())
    with pytest.raises(ValueError, match="has 3 experts on dim 0, expected 4"):
        TensorExpertStore({0: {"up": _rand(E, 2), "down": _rand(3, 2)}})
    with pytest.raises(ValueError, match="the layer's other tensors are torch.float32"):
        TensorExpertStore({0: {"up": _rand(E, 2), "down": _rand(E, 2, dtype=torch.float16)}})
    with pytest.raises(ValueError, match="meta device"):
        TensorExpertStore({0: {"up": torch.empty(E, 2, device="meta")}})
    with pytest.raises(ValueError, match="'up' must be"):
        store.read_into(3, 0, {n: torch.empty(1) for n in layer})
    with pytest.raises(IndexError):
        store.read(3, E)
    with pytest.raises(KeyError):
        store.read(0, 0)


def test_fault_injecting_store():
    inner = TensorExpertStore({0: {"w": _rand(E, 3)}})
    s = FaultInjectingStore(inner, {(0, 1): 2})
    for _ in range(2):
        with pytest.raises(OSError, match="injected fault"):
            s.read(0, 1)
    assert torch.equal(s.read(0, 1)["w"], inner.read(0, 1)["w"])
    assert s.reads[(0, 1)] == 3 and s.failures == 2
    only_worker = FaultInjectingStore(inner, [(0, 2)], thread_prefix="some-other-thread")
    only_worker.read(0, 2)                                    # main thread: no fault


def _rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header with ``edit(header)``; the data section stays."""
    import struct

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_overlapping_data_offsets_are_refused(tmp_path):
    """One expert reading another's bytes: refused when the header is parsed, naming both
    tensors and the file (the safetensors library refuses such a file too)."""
    f = str(tmp_path / "model.safetensors")
    save_file({P.format(0) + "up": _rand(E, 2 * I, H), P.format(0) + "down": _rand(E, H, I),
               "w.a": _rand(3, 4), "w.b": _rand(3, 4)}, f)
    before = safetensors_index(f)          # a healthy file parses

    def overlap(h):
        a = h["w.a"]["data_offsets"]
        h["w.b"]["data_offsets"] = [a[0] + 8, a[1] + 8]

    _rewrite_header(f, overlap)
    with pytest.raises(ValueError, match="overlap") as info:
        safetensors_index(f)
    assert f in str(info.value) and "'w.a'" in str(info.value) and "'w.b'" in str(info.value)
    with pytest.raises(ValueError, match="overlap"):
        SafetensorsExpertStore({0: {"up": TensorSource(fused=(f, P.format(0) + "up"))}})
    assert len(before) == 4


def test_data_offsets_past_the_file_are_refused(tmp_path):
    f = str(tmp_path / "model.safetensors")
    save_file({"a": _rand(3, 4), "b": _rand(2, 2)}, f)
    size = os.path.getsize(f)

    def beyond(h):
        b = h["b"]["data_offsets"]
        h["b"]["data_offsets"] = [b[0] + size, b[1] + size]

    _rewrite_header(f, beyond)
    with pytest.raises(ValueError, match=r"truncated: tensor 'b' needs bytes up to") as info:
        safetensors_index(f)
    assert f in str(info.value)


def test_spec_per_tensor_dtypes():
    """A quantized layer: FP8 values and float32 scales in one slot; bytes counted as held."""
    fp8 = torch.float8_e4m3fn
    spec = ExpertSpec(8, {"up": (96, 32), "up_scale_inv": (6, 2), "down": (32, 48), "down_scale_inv": (2, 3)},
                      torch.bfloat16, dtypes={"up": fp8, "down": fp8, "up_scale_inv": torch.float32,
                                              "down_scale_inv": torch.float32})
    assert spec.quantized
    assert spec.expert_nbytes() == 96 * 32 + 6 * 2 * 4 + 32 * 48 + 2 * 3 * 4
    lay = {name: (off, dt) for name, off, _, dt in spec.layout()}
    assert lay["up"] == (0, fp8) and lay["up_scale_inv"][1] == torch.float32
    assert all(off % 64 == 0 for off, _ in lay.values())
    assert spec.slot_nbytes() >= spec.expert_nbytes()
    plain = ExpertSpec(8, {"up": (4, 2)}, torch.float32, dtypes={"up": torch.float32})
    assert plain == ExpertSpec(8, {"up": (4, 2)}, torch.float32) and not plain.quantized and plain.dtypes == {}
    with pytest.raises(ValueError, match="names 'gate'"):
        ExpertSpec(8, {"up": (4, 2)}, torch.float32, dtypes={"gate": torch.float32})
    # a store hands out tensors of each one's own dtype
    f = torch.zeros(8, 4, 2, dtype=fp8)
    st = TensorExpertStore({0: {"up": f}})
    assert st.read(0, 3)["up"].dtype == fp8
