"""Dequantization of compressed expert weights, as transformers does it.

Quantized experts stay compressed in the host tier, in the cache slots and on the link;
an expert's weights are dequantized here, when it computes. An expert's tensors (the
views of one cache slot) name their format by transformers' own tensor names:

* **block FP8** (fine-grained FP8: DeepSeek-V3/R1 and the other block-FP8 releases):
  ``<name>`` holds ``float8_e4m3fn`` values ``[N, K]`` and ``<name>_scale_inv`` the
  per-block scales ``[N / bn, K / bk]`` (float32, bfloat16, or ``uint8`` UE8M0
  exponents). The block size follows from the two shapes, as in transformers'
  ``Fp8Dequantize``; the weight is ``fp32(values) * fp32(scale)`` per block, cast to the
  compute dtype.
* **MXFP4** (GPT-OSS): ``<name>_blocks`` ``uint8 [N, G, 16]`` (two E2M1 values per byte,
  low nibble first) and ``<name>_scales`` ``uint8 [N, G]`` (E8M0 exponents, bias 127);
  the weight is ``lut[nibble] * 2 ** (scale - 127)``, ``[N, 32 G]``, then transposed to
  ``[32 G, N]`` - transformers' GPT-OSS conversion (``convert_moe_packed_tensors``)
  transposes the same way, so the result is in the model's parameter layout.

Both functions reproduce transformers' arithmetic step by step (same dtypes, same
order), so a dequantized expert is bitwise equal to the same expert's slice of the
parameter transformers builds when it dequantizes the checkpoint at load time (what it
does on CPU).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["FP8_SCALE", "MXFP4_BLOCKS", "MXFP4_SCALES", "QUANT_SUFFIXES", "dequant_fp8_block", "dequant_mxfp4",
           "expert_weight", "is_quantized_name"]

FP8_SCALE = "_scale_inv"
MXFP4_BLOCKS = "_blocks"
MXFP4_SCALES = "_scales"
#: suffixes of the companion tensors that mark a quantized expert tensor
QUANT_SUFFIXES = (FP8_SCALE, MXFP4_BLOCKS, MXFP4_SCALES)

_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_quantized_name(name: str) -> bool:
    return name.endswith(QUANT_SUFFIXES)


def dequant_fp8_block(values: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (FP8, ``[..., N, K]``) times their per-block ``scale_inv``, in ``dtype``."""
    rows, cols = values.shape[-2:]
    srows, scols = scale_inv.shape[-2:] if scale_inv.dim() >= 2 else (1, 1)
    if rows % srows or cols % scols:
        raise ValueError(f"FP8 weight {list(values.shape)} is not divisible into the scale grid "
                         f"{list(scale_inv.shape)}")
    bm, bn = rows // srows, cols // scols
    q = values.to(torch.float32).reshape(-1, srows, bm, scols, bn)
    if scale_inv.dtype == torch.uint8:   # UE8M0 exponents
        s = (scale_inv.to(torch.float32) - 127.0).exp2()
    else:
        s = scale_inv.to(torch.float32)
    s = s.reshape(-1, srows, scols).unsqueeze(-1).unsqueeze(2)
    return (q * s).to(dtype).reshape(values.shape)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 ``blocks`` ``[N, G, B]`` / ``scales`` ``[N, G]`` -> ``[G * B * 2, N]`` in ``dtype``
    (transposed, the model's layout)."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    blocks = blocks.to(torch.uint8)
    exp = scales.to(torch.int32) - 127
    lut = torch.tensor(_FP4_VALUES, dtype=dtype, device=blocks.device)
    *prefix, g, b = blocks.shape
    rows = blocks.reshape(-1, b)
    out = torch.empty(rows.shape[0], b * 2, dtype=dtype, device=blocks.device)
    out[:, 0::2] = lut[(rows & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(rows >> 4).to(torch.int)]
    torch.ldexp(out, exp.reshape(-1, 1), out=out)
    return out.reshape(*prefix, g * b * 2).transpose(-1, -2)


def expert_weight(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Expert tensor ``name`` of one expert's ``weights``, dequantized to ``dtype`` when the
    views carry it compressed (see the module docstring); None when absent."""
    scale = weights.get(name + FP8_SCALE)
    if scale is not None:
        return dequant_fp8_block(weights[name], scale, dtype)
    blocks = weights.get(name + MXFP4_BLOCKS)
    if blocks is not None:
        return dequant_mxfp4(blocks, weights[name + MXFP4_SCALES], dtype)
    return weights.get(name)
