"""The per-expert read programs against the torch ops they stand for, and the dequantization
against transformers' own.

Property: for any chain of transformers' structural conversion steps over checkpoint
tensors (stack per-expert tensors, concatenate, transpose, chunk, interleave), expert e's
program (row e pushed down to the leaves) reads exactly expert e's slice of the tensor
the ops produce on the whole data, and only that expert's bytes.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from expertflow_compile.kernels.dequant import dequant_fp8_block, dequant_mxfp4
from expertflow_compile.loading.convert import ConversionRefused, Dequant, hoist, rows, select, whole
from expertflow_compile.runtime.read_plan import Cat, Interleave, Stack, Transpose, materialize, narrow, slices_of
from expertflow_compile.runtime.store import safetensors_index
from expertflow_compile.testing.checkpoints import fp8_quantize, mxfp4_quantize


def _reader(path_reads):
    def read(file, buf, offset):
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(len(buf))
        buf[:] = data
        path_reads.append((offset, len(buf)))
    return read


def _files(tmp_path, tensors):
    f = str(tmp_path / "m.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, f)
    return safetensors_index(f)


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 5), a=st.integers(1, 4), b=st.integers(1, 3), steps=st.lists(
    st.sampled_from(["transpose", "chunk0", "chunk1", "interleave"]), max_size=2), fused=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_per_expert_programs_equal_the_ops(tmp_path_factory, E, a, b, steps, fused, dtype):
    tmp = tmp_path_factory.mktemp("rp")
    g = torch.Generator().manual_seed(E * 100 + a * 10 + b)
    gate = torch.randn(E, 2 * a, b, generator=g).to(dtype)
    up = torch.randn(E, 2 * a, b, generator=g).to(dtype)
    if fused:   # [E, ...] tensors in the checkpoint
        index = _files(tmp, {"gate": gate, "up": up})
        g_node, u_node = whole(index["gate"], "gate"), whole(index["up"], "up")
    else:       # one tensor per expert, merged like MergeModulelist
        index = _files(tmp, {f"e.{e}.{n}": t[e] for e in range(E) for n, t in (("gate", gate), ("up", up))})
        g_node = Stack(tuple(whole(index[f"e.{e}.gate"], f"e.{e}.gate") for e in range(E)))
        u_node = Stack(tuple(whole(index[f"e.{e}.up"], f"e.{e}.up") for e in range(E)))
    node, ref = Cat(1, (g_node, u_node)), torch.cat([gate, up], dim=1)     # Concatenate(dim=1)
    for s in steps:
        if s == "transpose":
            node, ref = Transpose(1, 2, node), ref.transpose(1, 2)
        elif s.startswith("chunk"):
            d = 1 + int(s[-1])
            half = ref.shape[d] // 2 or 1
            node, ref = narrow(node, d, 0, half), ref.narrow(d, 0, half)
        elif ref.shape[1] % 2 == 0:
            node = Interleave(1, False, node)
            shape = list(ref.shape)
            shape[1:2] = [shape[1] // 2, 2]
            ref = ref.reshape(shape).transpose(1, 2).reshape(ref.shape[0], -1, *ref.shape[2:])
    assert node.shape == tuple(ref.shape)
    for e in range(E):
        reads = []
        prog = select(node, e)
        got = materialize(prog, _reader(reads), dtype)
        assert torch.equal(got, ref[e])
        # only expert e's bytes were read
        own = {(s.offset, s.nbytes) for s in slices_of(prog)}
        assert sum(n for _, n in reads) <= sum(n for _, n in own)
        for s in slices_of(prog):
            assert f".{e}." in s.key or fused


def test_rows_of_a_2d_expert_parameter(tmp_path):
    """DBRX: [E * I, H] parameters, each expert a block of I rows."""
    E, I, H = 4, 3, 5
    w = torch.randn(E * I, H)
    index = _files(tmp_path, {"w1": w})
    node = whole(index["w1"], "w1")
    for e in range(E):
        prog = rows(node, e * I, I)
        assert torch.equal(materialize(prog, _reader([])), w[e * I:(e + 1) * I])


def test_the_expert_axis_cannot_move(tmp_path):
    index = _files(tmp_path, {"w": torch.randn(4, 2, 3)})
    with pytest.raises(ConversionRefused, match="transposes the expert axis"):
        select(Transpose(0, 1, whole(index["w"], "w")), 0)


def test_dequant_matches_transformers_fp8():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    for shape, block in (((48, 32), (16, 16)), ((2, 48, 32), (16, 8)), ((40, 24), (128, 128))):
        w = torch.randn(*shape, generator=g)
        flat = w.reshape(-1, *shape[-2:])
        pairs = [fp8_quantize(x, block) for x in flat]
        q = torch.stack([p[0] for p in pairs]).reshape(shape)
        s = torch.stack([p[1] for p in pairs]).reshape(*shape[:-2], *pairs[0][1].shape)
        for dt in (torch.float32, torch.bfloat16):
            want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dt)
            assert torch.equal(dequant_fp8_block(q, s, dt), want)
        ue8m0 = torch.randint(120, 130, s.shape, dtype=torch.uint8, generator=g)
        assert torch.equal(dequant_fp8_block(q, ue8m0, torch.float32),
                           Fp8Dequantize(None)._dequantize_one(q, ue8m0, output_dtype=torch.float32))


def test_dequant_matches_transformers_mxfp4():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 40, 64, generator=g)
    blocks, scales = mxfp4_quantize(w)
    for dt in (torch.float32, torch.bfloat16):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dt)       # [E, 64, 40]
        for e in range(3):
            assert torch.equal(dequant_mxfp4(blocks[e], scales[e], dt), want[e])
    # the quantizer really is MXFP4: values within one rounding step of the weights
    deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert (deq - w).abs().max() <= w.abs().max() / 4


def test_hoisting_fp8_through_concat_keeps_blocks(tmp_path):
    """gate_up = cat(dequant(gate), dequant(up)) == dequant(cat(gate), cat(scales))."""
    wg, wu = torch.randn(32, 16), torch.randn(32, 16)
    (qg, sg), (qu, su) = fp8_quantize(wg, (16, 8)), fp8_quantize(wu, (16, 8))
    index = _files(tmp_path, {"g": qg, "gs": sg, "u": qu, "us": su})
    n = lambda k: whole(index[k], k)
    node = Cat(0, (Dequant("fp8", n("g"), n("gs"), torch.float32), Dequant("fp8", n("u"), n("us"), torch.float32)))
    h = hoist(node)
    assert isinstance(h, Dequant)
    got = dequant_fp8_block(materialize(h.data, _reader([])), materialize(h.scale, _reader([])), torch.float32)
    want = torch.cat([dequant_fp8_block(qg, sg, torch.float32), dequant_fp8_block(qu, su, torch.float32)])
    assert torch.equal(got, want)
    with pytest.raises(ConversionRefused, match="cuts FP8 blocks"):
        hoist(narrow(Dequant("fp8", n("g"), n("gs"), torch.float32), 0, 0, 8))
    assert os.path.isfile(index["g"].file)
