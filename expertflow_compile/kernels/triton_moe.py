"""Triton kernels for one MoE layer's routed experts (fused, slot-addressed grouped GEMM).

Pipeline (all on device, no host sync, every buffer sized by a static upper bound)::

    sorted_pair_ids, expert_of_block, ntpp = moe_align_block_size(topk_ids, E, BLOCK_M)
    inter = fused_moe_up(hidden, ...)    # gather rows in-kernel, x @ W_up[e] (+b), activation
    pairs = fused_moe_down(inter, ...)   # inter @ W_down[e] (+b), * routing weight, per-pair rows
    out   = pairs.view(T, K, H).sum(1)   # combine over top-k in torch (deterministic)

* ``moe_align_block_size`` sorts the flattened (token, k) pairs by expert and pads each
  expert's run to a multiple of ``BLOCK_M`` (pad entries = ``T*K``, a sentinel), so a
  block of ``BLOCK_M`` rows always belongs to one expert. Experts with no tokens get
  no blocks. Buffers have the static size ``T*K + E*(BLOCK_M-1)``.
* The kernels never touch a ``[E, ...]`` weight tensor as a whole: each weight is
  addressed through a **slot table** (:class:`SlotTable`): a base pointer, one int64
  element offset per slot, and the per-slot matrix strides; ``slot_of_expert[E]``
  maps experts to slots (``-1`` = not resident: that expert's pairs contribute zero,
  like vLLM's ``expert_map``). Slots may sit anywhere in memory (the expert cache's
  separately allocated slot buffers), in a pool ``[S, ...]``, or be the plain
  ``[E, ...]`` parameters (``slot_of_expert = arange(E)``).
* The up kernel gathers the hidden rows in-kernel (``token = pair // top_k``), so no
  permuted copy of the activations is made (ScatterMoE), and applies the activation
  (:mod:`.activations`) in its epilogue: for the gated kinds each program keeps two
  accumulators, the gate columns and the matching up columns (``n`` and ``n + I``,
  or ``2n`` and ``2n + 1`` for GPT-OSS's interleaved layout).
* The down kernel multiplies the routing weight in its epilogue and writes one row per
  (token, k) pair in pair order; torch sums over k. This choice (instead of an atomic
  add into a fp32 ``[T, H]`` accumulator) keeps results deterministic and bitwise
  reproducible, at the cost of a ``[T*K, H]`` buffer in the hidden dtype.

Configs (``BLOCK_M/N/K``, ``GROUP_M``, ``num_warps``, ``num_stages``) come from
:func:`get_moe_config`, a function of ``(H, I, E, dtype)`` and the device only, never of
the token count (no ``tl.constexpr`` depends on it, and the token-dependent integer
arguments are excluded from specialisation), so a new batch size never recompiles.
Tuned configs are read from ``kernels/configs/<device>.json`` (none ship with the
package: ``benchmarks/kernels.py --tune`` writes the file for the device it runs on) and
the file named by ``$EXPERTFLOW_MOE_CONFIG``, which wins; with neither, the heuristic
:func:`default_moe_config`. See the README next to this file.

CPU tensors run through the Triton interpreter (used by the tests with
``TRITON_INTERPRET=1``); CUDA tensors through the compiled kernels.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .activations import ActivationKind

try:  # the package must import without triton; only the kernels need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "MoEConfig",
    "SlotTable",
    "config_key",
    "fused_moe_down",
    "fused_moe_up",
    "get_moe_config",
    "load_tuned_configs",
    "moe_align_block_size",
    "slot_tables_from_views",
    "triton_grouped_experts",
]

HAS_TRITON = triton is not None
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_ENV = "EXPERTFLOW_MOE_CONFIG"


# =========================================================================================
# align: sort (token, k) pairs by expert, pad each expert to a multiple of BLOCK_M
# =========================================================================================

def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded pair count: every expert pads at most ``block_m - 1``."""
    return num_pairs + num_experts * (block_m - 1)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, k) pairs by expert, padded per expert to ``block_m``.

    Returns, all on ``topk_ids``'s device and computed with device ops only (no host
    sync, shapes depend only on ``topk_ids.numel()``, ``num_experts`` and ``block_m``):

    * ``sorted_pair_ids`` int64 ``[T*K + E*(block_m-1)]``: pair indices (``t*K + k``)
      grouped by expert, ascending within an expert, each expert's run starting at a
      multiple of ``block_m``; padding and the unused tail hold the sentinel ``T*K``.
    * ``expert_of_block`` int64 ``[(T*K + E*(block_m-1)) // block_m]``: the expert of
      each ``block_m`` block, ``-1`` past the used blocks. Experts with zero pairs
      own no block.
    * ``num_tokens_post_padded`` int64 ``[1]``: the used length of ``sorted_pair_ids``.

    Ids outside ``[0, num_experts)`` (e.g. ``-1``) belong to no expert and are dropped.
    """
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    flat = topk_ids.reshape(-1).to(torch.int64)
    n, dev, E = flat.numel(), flat.device, int(num_experts)
    max_padded = max_padded_pairs(n, E, block_m)
    max_blocks = max_padded // block_m

    ids = torch.where((flat >= 0) & (flat < E), flat, E)                 # invalid -> bucket E
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, ids, torch.ones_like(ids))                     # bincount without a sync
    padded = (counts + (block_m - 1)) // block_m * block_m
    padded[E] = 0                                                         # the invalid bucket gets no room
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts

    order = torch.argsort(ids, stable=True)                               # pair ids by expert
    sorted_e = ids[order]
    rank = torch.arange(n, device=dev) - cnt_start[sorted_e]              # position within its expert
    dest = torch.where(sorted_e < E, pad_start[sorted_e] + rank, max_padded)
    sorted_pair_ids = torch.full((max_padded + 1,), n, dtype=torch.int64, device=dev)
    sorted_pair_ids.scatter_(0, dest, order)                              # invalid pairs land past the end
    sorted_pair_ids = sorted_pair_ids[:max_padded]

    ends = pad_end[:E]
    block_start = torch.arange(max_blocks, device=dev, dtype=torch.int64) * block_m
    owner = torch.searchsorted(ends, block_start, right=True)             # first expert ending past the block
    expert_of_block = torch.where(owner < E, owner, torch.full_like(owner, -1))
    num_tokens_post_padded = pad_end[E:E + 1].clone()
    return sorted_pair_ids, expert_of_block, num_tokens_post_padded


# =========================================================================================
# slot tables: how the kernels find an expert's weights
# =========================================================================================

@dataclass(frozen=True)
class SlotTable:
    """Where each slot's copy of one weight (an ``[N, K]`` matrix or an ``[N]`` bias) lives.

    Element ``(n, k)`` of slot ``s`` is at ``base + offsets[s] * unit + n*stride_n +
    k*stride_k`` (elements of ``base``'s dtype). ``N`` is the output width, ``K`` the
    reduction width, whatever the stored layout (a transposed ``[K, N]`` weight is
    just swapped strides). ``unit`` is the largest power of two <= 16 dividing every
    offset: passed as a kernel integer, Triton specialises it when it is 16 and then
    knows each slot starts 16-element aligned (vectorised loads).
    """

    base: torch.Tensor            # a tensor whose data pointer the offsets are relative to
    offsets: torch.Tensor         # int64 [S], in units of ``unit`` elements
    unit: int
    n: int
    k: int
    stride_n: int
    stride_k: int

    @property
    def num_slots(self) -> int:
        return self.offsets.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @classmethod
    def from_stacked(cls, w: torch.Tensor, transposed: bool = False) -> SlotTable:
        """A ``[S, N, K]`` weight (``[S, K, N]`` if ``transposed``) or a ``[S, N]`` bias.

        Works for the model's ``[E, ...]`` parameters (``S = E``) and for slot pools.
        """
        if w.dim() == 2:
            S, n, k = w.shape[0], w.shape[1], 1
            stride_n, stride_k = w.stride(1), 0
        elif w.dim() == 3:
            S = w.shape[0]
            if transposed:
                k, n = w.shape[1], w.shape[2]
                stride_k, stride_n = w.stride(1), w.stride(2)
            else:
                n, k = w.shape[1], w.shape[2]
                stride_n, stride_k = w.stride(1), w.stride(2)
        else:
            raise ValueError(f"expected a [S, N, K] weight or a [S, N] bias, got shape {tuple(w.shape)}")
        unit = _pow2_divisor(w.stride(0)) if S > 1 else 16
        offsets = torch.arange(S, device=w.device, dtype=torch.int64) * (w.stride(0) // unit)
        return cls(w, offsets, unit, n, k, stride_n, stride_k)

    @classmethod
    def from_views(cls, views: Sequence[torch.Tensor | None], transposed: bool = False) -> SlotTable:
        """One tensor per slot (``[N, K]``, ``[K, N]`` if ``transposed``, or ``[N]``), anywhere in
        memory (e.g. views into the expert cache's slot buffers); ``None`` = an unused slot.

        All views must share dtype, device, shape and strides. Builds the int64 offset
        table on the host (pointer arithmetic only, no device sync) and copies it over.
        """
        present = [v for v in views if v is not None]
        if not present:
            raise ValueError("from_views needs at least one tensor")
        ref = present[0]
        for v in present[1:]:
            if (v.dtype, v.device, v.shape, v.stride()) != (ref.dtype, ref.device, ref.shape, ref.stride()):
                raise ValueError("slot views differ in dtype, device, shape or strides")
        item = ref.element_size()
        deltas = []
        for v in views:
            d = 0 if v is None else v.data_ptr() - ref.data_ptr()
            if d % item:
                raise ValueError("slot views are not aligned to their element size")
            deltas.append(d // item)
        unit = 16
        for d in deltas:
            unit = min(unit, _pow2_divisor(d)) if d else unit
        offsets = torch.tensor([d // unit for d in deltas], dtype=torch.int64)
        if ref.device.type == "cuda":
            offsets = offsets.pin_memory().to(ref.device, non_blocking=True)
        else:
            offsets = offsets.to(ref.device)
        t = cls.from_stacked(ref.unsqueeze(0), transposed)
        return replace(t, offsets=offsets, unit=unit)


def _pow2_divisor(x: int, cap: int = 16) -> int:
    x = abs(int(x))
    if x == 0:
        return cap
    return min(cap, x & -x)


def slot_tables_from_views(views_by_expert: Mapping[int, Mapping[str, torch.Tensor | None]],
                           num_experts: int, *, up_transposed: bool, down_transposed: bool,
                           device: torch.device | None = None) -> dict:
    """Slot tables for experts whose weights are views (e.g. ``ExpertCache.acquire`` dicts).

    ``views_by_expert`` maps expert id -> ``{"up", "down", "up_bias", "down_bias"}``;
    experts missing from it get slot ``-1``. Returns keyword arguments for
    :func:`triton_grouped_experts`: ``up_weights``, ``down_weights``, ``up_bias``,
    ``down_bias`` (slot tables or None) and ``slot_of_expert``.
    """
    experts = sorted(views_by_expert)
    if not experts:
        raise ValueError("no expert views given")
    slot_of_expert = torch.full((num_experts,), -1, dtype=torch.int64)
    for s, e in enumerate(experts):
        slot_of_expert[e] = s

    def table(name, transposed):
        vs = [views_by_expert[e].get(name) for e in experts]
        if all(v is None for v in vs):
            return None
        if any(v is None for v in vs):
            raise ValueError(f"{name!r} is missing for some experts")
        return SlotTable.from_views(vs, transposed)

    up = table("up", up_transposed)
    dev = device if device is not None else up.device
    return dict(up_weights=up, down_weights=table("down", down_transposed),
                up_bias=table("up_bias", False), down_bias=table("down_bias", False),
                slot_of_expert=slot_of_expert.to(dev))


# =========================================================================================
# configs: a function of (H, I, E, dtype) and the device, never of the token count
# =========================================================================================

@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (all powers of two, tiles >= 16)."""

    BLOCK_N: int = 64
    BLOCK_K: int = 64
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """``BLOCK_M`` is shared (the alignment pads to it); the two kernels tile N/K separately."""

    BLOCK_M: int = 64
    up: KernelConfig = field(default_factory=KernelConfig)
    down: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self):
        sizes = [self.BLOCK_M] + [getattr(c, a) for c in (self.up, self.down)
                                  for a in ("BLOCK_N", "BLOCK_K")]
        if any(s < 16 or s & (s - 1) for s in sizes):
            raise ValueError(f"BLOCK_M/N/K must be powers of two >= 16, got {self}")

    @classmethod
    def from_dict(cls, d: Mapping) -> MoEConfig:
        known = {"BLOCK_M", "up", "down"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MoE config keys {sorted(unknown)}; valid: {sorted(known)}")
        base = cls()
        return cls(BLOCK_M=int(d.get("BLOCK_M", base.BLOCK_M)),
                   up=KernelConfig(**d.get("up", {})), down=KernelConfig(**d.get("down", {})))

    def as_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_key(hidden_size: int, intermediate_size: int, num_experts: int, dtype: torch.dtype) -> str:
    """The JSON key of a tuned config: ``"E=8,H=4096,I=14336,dtype=bfloat16"``."""
    return f"E={num_experts},H={hidden_size},I={intermediate_size},dtype={_dtype_name(dtype)}"


def _device_file_name(device_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in device_name) + ".json"


@functools.lru_cache(maxsize=None)
def load_tuned_configs(device_name: str | None = None) -> dict[str, MoEConfig]:
    """Tuned configs: ``configs/<device>.json`` overlaid by ``$EXPERTFLOW_MOE_CONFIG``."""
    paths = []
    if device_name:
        paths.append(CONFIG_DIR / _device_file_name(device_name))
    env = os.environ.get(CONFIG_ENV)
    if env:
        paths.append(Path(env))
    out: dict[str, MoEConfig] = {}
    for p in paths:
        if p.is_file():
            with open(p) as f:
                data = json.load(f)
            out.update({k: MoEConfig.from_dict(v) for k, v in data.items() if not k.startswith("_")})
    return out


def default_moe_config(hidden_size: int, intermediate_size: int, num_experts: int,
                       dtype: torch.dtype) -> MoEConfig:
    """Heuristic config when nothing tuned matches.

    ``BLOCK_M`` follows the expected rows per expert, which falls with the expert count
    (few large experts: Mixtral; many small ones: Qwen3/DeepSeek). fp32 halves
    ``BLOCK_K`` (twice the bytes per element, same shared memory).
    """
    block_m = 64 if num_experts <= 16 else 32 if num_experts <= 64 else 16
    bk = 32 if dtype == torch.float32 else 64
    up = KernelConfig(BLOCK_N=64, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=3)
    down = KernelConfig(BLOCK_N=128 if hidden_size >= 2048 else 64, BLOCK_K=bk, GROUP_M=8,
                        num_warps=8 if hidden_size >= 2048 else 4, num_stages=3)
    return MoEConfig(BLOCK_M=block_m, up=up, down=down)


def get_moe_config(hidden_size: int, intermediate_size: int, num_experts: int, dtype: torch.dtype,
                   device: torch.device | str | None = None) -> MoEConfig:
    """The kernel config for a layer shape: a tuned one if listed, else the heuristic.

    Depends on ``(H, I, E, dtype)`` and the device only; never on the token count.
    """
    name = None
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    tuned = load_tuned_configs(name)
    key = config_key(hidden_size, intermediate_size, num_experts, dtype)
    if key in tuned:
        return tuned[key]
    return default_moe_config(hidden_size, intermediate_size, num_experts, dtype)


# =========================================================================================
# kernels (plain functions, jitted lazily: interpreted for CPU tensors)
# =========================================================================================

# Token-dependent integer arguments: excluded from Triton's value specialisation
# (== 1 / % 16), so a new batch size reuses the compiled kernel.
_UP_NO_SPEC = ["num_pairs", "num_m_blocks"]
_DOWN_NO_SPEC = ["num_pairs", "num_m_blocks"]


def _moe_up_kernel(
    x_ptr, out_ptr, sorted_ids_ptr, expert_of_block_ptr, ntpp_ptr, slot_of_expert_ptr,
    w_ptr, w_off_ptr, w_unit, b_ptr, b_off_ptr, b_unit,
    N, K, num_pairs, top_k, num_m_blocks,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_om, stride_on,
    gate_col_mul, up_col_off, alpha, limit,
    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of act(x[rows] @ W_up[e]^T (+ b)) for one expert block.

    N is the activation's output width (I for the gated kinds); for those the program
    accumulates the gate columns (n * gate_col_mul) and the up columns (+ up_col_off).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    expert = tl.load(expert_of_block_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(slot_of_expert_ptr + expert)
    if slot < 0:  # not resident: contributes nothing (the pair buffer is zero-filled)
        return
    w_base = w_ptr + tl.load(w_off_ptr + slot) * w_unit

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    gate_cols = offs_n * gate_col_mul
    up_cols = gate_cols + up_col_off

    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = w_base + offs_k[:, None] * stride_wk + gate_cols[None, :] * stride_wn
    wu_ptrs = w_base + offs_k[:, None] * stride_wk + up_cols[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(W_DTYPE)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            acc_g = tl.dot(a.to(tl.float32), wg.to(tl.float32), acc_g, input_precision="ieee")
        else:
            acc_g = tl.dot(a, wg, acc_g)
        if GLU:
            wu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_F32:
                acc_u = tl.dot(a.to(tl.float32), wu.to(tl.float32), acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b_base = b_ptr + tl.load(b_off_ptr + slot) * b_unit
        acc_g += tl.load(b_base + gate_cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(b_base + up_cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    # epilogue: the activation (codes = activations.KIND_NAMES order)
    if ACT == 0:    # silu_glu
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    elif ACT == 1:  # gelu_glu (exact erf)
        h = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)) * acc_u
    elif ACT == 2:  # gelu_tanh_glu: 0.5*(1+tanh(z)) == sigmoid(2z)
        z = 1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = acc_g * tl.sigmoid(z) * acc_u
    elif ACT == 3:  # swiglu_oai
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    elif ACT == 4:  # silu
        h = acc_g * tl.sigmoid(acc_g)
    elif ACT == 5:  # gelu
        h = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
    elif ACT == 6:  # gelu_tanh
        z = 1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = acc_g * tl.sigmoid(z)
    else:           # relu
        h = tl.maximum(acc_g, 0.0)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _moe_down_kernel(
    a_ptr, out_ptr, sorted_ids_ptr, expert_of_block_ptr, ntpp_ptr, slot_of_expert_ptr,
    w_ptr, w_off_ptr, w_unit, b_ptr, b_off_ptr, b_unit, rw_ptr,
    N, K, num_pairs, num_m_blocks,
    stride_am, stride_ak, stride_wn, stride_wk, stride_bn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of (inter[rows] @ W_down[e]^T (+ b)) * routing_weight,
    stored at the rows' pair indices (out is [T*K, H] in pair order)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    expert = tl.load(expert_of_block_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(slot_of_expert_ptr + expert)
    if slot < 0:
        return
    w_base = w_ptr + tl.load(w_off_ptr + slot) * w_unit

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(W_DTYPE)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b_base = b_ptr + tl.load(b_off_ptr + slot) * b_unit
        acc += tl.load(b_base + offs_n * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _jitted(name: str, interpret: bool):
    """``triton.jit`` of a kernel; ``interpret`` picks the interpreter (CPU tensors)."""
    fn, no_spec = {"up": (_moe_up_kernel, _UP_NO_SPEC), "down": (_moe_down_kernel, _DOWN_NO_SPEC)}[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn, do_not_specialize=no_spec)
    return triton.jit(fn, do_not_specialize=no_spec)


def _triton_imported_interpreted() -> bool:
    """Triton's own ``@jit`` helpers (``tl.zeros``, ``tl.cdiv``, ...) are interpreted only
    when ``TRITON_INTERPRET`` was set before ``triton`` was first imported."""
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.zeros, JITFunction)


def _kernel(name: str, device: torch.device):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if device.type == "cpu":
        if not _triton_imported_interpreted():
            raise RuntimeError("the Triton MoE kernels run on CPU tensors only under the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before triton is first imported")
        return _jitted(name, True)
    return _jitted(name, _interpret_env())


def _dot_f32(dtype: torch.dtype, device: torch.device) -> bool:
    """Multiply in fp32 (IEEE, no TF32): for fp32 weights, so results match torch's fp32
    matmul; and for bf16 under the interpreter, whose ``tl.dot`` cannot multiply bf16
    (exact either way: bf16 products are exact in fp32)."""
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and (device.type == "cpu" or _interpret_env())


def _tl_dtype(dtype: torch.dtype):
    try:
        return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    except KeyError:
        raise TypeError(f"unsupported weight dtype {dtype}; expected float32, bfloat16 or float16") from None


def _bias_args(bias: SlotTable | None, like: SlotTable):
    if bias is None:   # dummies, never read (HAS_BIAS=False)
        return like.base, like.offsets, 1, 0
    return bias.base, bias.offsets, bias.unit, bias.stride_n


def fused_moe_up(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_of_block: torch.Tensor,
                 num_tokens_post_padded: torch.Tensor, slot_of_expert: torch.Tensor, top_k: int,
                 up: SlotTable, up_bias: SlotTable | None, kind: ActivationKind, config: MoEConfig,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``act(hidden[pair // top_k] @ W_up[e]^T (+ b_up[e]))`` for every sorted (padded) row.

    Returns ``[len(sorted_pair_ids), I]`` in ``out_dtype`` (default: the up weights' dtype);
    rows of padding and of non-resident experts are left unwritten.
    """
    num_pairs = hidden.shape[0] * top_k
    n_out = kind.out_features(up.n)
    if kind.is_glu and up.n % 2:
        raise ValueError(f"{kind.name} needs an even up-projection width, got {up.n}")
    if up.k != hidden.shape[1]:
        raise ValueError(f"up weights reduce over {up.k}, hidden has {hidden.shape[1]} features")
    out = torch.empty(sorted_pair_ids.numel(), n_out, dtype=out_dtype or up.dtype, device=hidden.device)
    cfg = config.up
    num_m_blocks = expert_of_block.numel()
    if num_m_blocks == 0 or n_out == 0:
        return out
    gate_col_mul, up_col_off = (2, 1) if kind.interleaved else (1, n_out)
    b_base, b_off, b_unit, b_stride = _bias_args(up_bias, up)
    grid = (num_m_blocks * triton.cdiv(n_out, cfg.BLOCK_N),)
    _kernel("up", hidden.device)[grid](
        hidden, out, sorted_pair_ids, expert_of_block, num_tokens_post_padded, slot_of_expert,
        up.base, up.offsets, up.unit, b_base, b_off, b_unit,
        n_out, up.k, num_pairs, top_k, num_m_blocks,
        hidden.stride(0), hidden.stride(1), up.stride_n, up.stride_k, b_stride, out.stride(0), out.stride(1),
        gate_col_mul, up_col_off,
        float(kind.alpha if kind.alpha is not None else 0.0), float(kind.limit if kind.limit is not None else 0.0),
        ACT=kind.code, GLU=kind.is_glu, HAS_BIAS=up_bias is not None, W_DTYPE=_tl_dtype(up.dtype),
        DOT_F32=_dot_f32(up.dtype, hidden.device), BLOCK_M=config.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def fused_moe_down(intermediate: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_of_block: torch.Tensor,
                   num_tokens_post_padded: torch.Tensor, slot_of_expert: torch.Tensor,
                   topk_weights: torch.Tensor, down: SlotTable, down_bias: SlotTable | None,
                   config: MoEConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """``(inter @ W_down[e]^T (+ b_down[e])) * routing_weight`` written per (token, k) pair.

    Returns ``[T*K, H]`` in pair order (``t*K + k``) in ``out_dtype``, zero for pairs that
    belong to no resident expert. Sum over k to combine.
    """
    rw = topk_weights.reshape(-1)
    num_pairs = rw.numel()
    if down.k != intermediate.shape[1]:
        raise ValueError(f"down weights reduce over {down.k}, the activation has {intermediate.shape[1]} features")
    out = torch.zeros(num_pairs, down.n, dtype=out_dtype, device=intermediate.device)
    cfg = config.down
    num_m_blocks = expert_of_block.numel()
    if num_m_blocks == 0 or down.n == 0:
        return out
    b_base, b_off, b_unit, b_stride = _bias_args(down_bias, down)
    grid = (num_m_blocks * triton.cdiv(down.n, cfg.BLOCK_N),)
    _kernel("down", intermediate.device)[grid](
        intermediate, out, sorted_pair_ids, expert_of_block, num_tokens_post_padded, slot_of_expert,
        down.base, down.offsets, down.unit, b_base, b_off, b_unit, rw,
        down.n, down.k, num_pairs, num_m_blocks,
        intermediate.stride(0), intermediate.stride(1), down.stride_n, down.stride_k, b_stride,
        out.stride(0), out.stride(1),
        HAS_BIAS=down_bias is not None, W_DTYPE=_tl_dtype(down.dtype), DOT_F32=_dot_f32(down.dtype, intermediate.device),
        BLOCK_M=config.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def compile_for_target(which: str, dtype: torch.dtype, *, kind: ActivationKind | str = "silu_glu",
                       has_bias: bool = False, config: MoEConfig | None = None, arch: int = 90,
                       aligned: bool = True) -> dict:
    """Compile one kernel ahead of time for ``sm_<arch>`` with no GPU present (a CI check).

    Runs Triton's whole CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas
    included) with the argument specialisation a real launch on a big layer gets
    (unit strides, 16-divisible pointers/strides/widths when ``aligned``). Returns
    ``{"shared": bytes, "async_copies": n, "num_warps": w}``; ``async_copies > 0`` means
    the K loop is software-pipelined. Raises if the kernel does not compile.
    """
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kind = ActivationKind.of(kind)
    cfg = (config or MoEConfig()).up if which == "up" else (config or MoEConfig()).down
    block_m = (config or MoEConfig()).BLOCK_M
    ty = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    fn, no_spec = {"up": (_moe_up_kernel, _UP_NO_SPEC), "down": (_moe_down_kernel, _DOWN_NO_SPEC)}[which]
    jit_fn = JITFunction(fn, do_not_specialize=no_spec)
    names = list(jit_fn.arg_names)
    ptrs = {"x_ptr": ty, "a_ptr": ty, "out_ptr": ty, "w_ptr": ty, "b_ptr": ty, "rw_ptr": "fp32",
            "sorted_ids_ptr": "i64", "expert_of_block_ptr": "i64", "ntpp_ptr": "i64",
            "slot_of_expert_ptr": "i64", "w_off_ptr": "i64", "b_off_ptr": "i64"}
    unit_strides = {"stride_xk", "stride_ak", "stride_wk", "stride_on", "stride_bn"}
    common = dict(HAS_BIAS=has_bias, W_DTYPE=_tl_dtype(dtype), DOT_F32=dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
    if which == "up":
        common.update(ACT=kind.code, GLU=kind.is_glu)
    sig, constexprs = {}, {}
    for n in names:
        if n in common:
            sig[n], constexprs[(names.index(n),)] = "constexpr", common[n]
        elif n in unit_strides:
            sig[n], constexprs[(names.index(n),)] = "constexpr", 1
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        elif n in ("alpha", "limit"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    div16 = {"x_ptr", "a_ptr", "out_ptr", "w_ptr", "b_ptr", "w_unit", "b_unit", "N", "K",
             "stride_xm", "stride_am", "stride_wn", "stride_om"} if aligned else set()
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in div16 and n not in constexprs}
    src = ASTSource(jit_fn, sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return {"shared": kernel.metadata.shared, "num_warps": cfg.num_warps,
            "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy", kernel.asm["ttgir"]))}


# =========================================================================================
# entry point
# =========================================================================================

def _as_table(w, transposed: bool, what: str) -> SlotTable | None:
    if w is None or isinstance(w, SlotTable):
        return w
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a tensor or a SlotTable, got {type(w).__name__}")
    return SlotTable.from_stacked(w, transposed)


def triton_grouped_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    up_weights: torch.Tensor | SlotTable,
    down_weights: torch.Tensor | SlotTable,
    up_bias: torch.Tensor | SlotTable | None = None,
    down_bias: torch.Tensor | SlotTable | None = None,
    *,
    kind: ActivationKind | str,
    up_transposed: bool,
    down_transposed: bool,
    alpha: float | None = None,
    limit: float | None = None,
    slot_of_expert: torch.Tensor | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """One MoE layer's routed experts with the fused Triton kernels; returns ``[T, H]``.

    ``hidden`` [T, H]; ``topk_ids``/``topk_weights`` [T, K] (ids outside ``[0, E)``
    contribute nothing). Weights are either per-expert stacks ``[E, 2I|I, H]`` /
    ``[E, H, I]`` (``[E, H, 2I|I]`` / ``[E, I, H]`` when transposed), a slot pool
    ``[S, ...]`` of that layout indexed by ``slot_of_expert`` [E] (``-1`` = not
    resident: contributes zero), or :class:`SlotTable` s (e.g. from
    :func:`slot_tables_from_views`). Biases ``[E|S, N]`` likewise. ``kind`` is an
    :class:`~.activations.ActivationKind` or its name; ``alpha``/``limit`` override
    its ``swiglu_oai`` parameters. ``config`` defaults to :func:`get_moe_config`.
    The result is in ``hidden``'s dtype.
    """
    kind = ActivationKind.of(kind, alpha, limit)
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[-1]
    topk_ids = topk_ids.reshape(num_tokens, top_k)
    topk_weights = topk_weights.reshape(num_tokens, top_k)
    if not topk_weights.is_contiguous():
        topk_weights = topk_weights.contiguous()

    up = _as_table(up_weights, up_transposed, "up_weights")
    down = _as_table(down_weights, down_transposed, "down_weights")
    b_up = _as_table(up_bias, False, "up_bias")
    b_down = _as_table(down_bias, False, "down_bias")
    if slot_of_expert is None:
        if up.num_slots != down.num_slots:
            raise ValueError("up and down weights hold different expert counts; pass slot_of_expert")
        slot_of_expert = torch.arange(up.num_slots, device=hidden.device, dtype=torch.int64)
    num_experts = slot_of_expert.numel()
    inter_size = kind.out_features(up.n)
    if down.n != hidden_size or down.k != inter_size:
        raise ValueError(f"down weights are [N={down.n}, K={down.k}]; expected N={hidden_size}, K={inter_size}")

    out_shape = (*lead, hidden_size)
    if num_tokens == 0 or top_k == 0:
        return hidden.new_zeros(out_shape)
    cfg = config or get_moe_config(hidden_size, inter_size, num_experts, up.dtype, hidden.device)
    sorted_ids, expert_of_block, ntpp = moe_align_block_size(topk_ids, num_experts, cfg.BLOCK_M)
    inter = fused_moe_up(hidden, sorted_ids, expert_of_block, ntpp, slot_of_expert, top_k,
                         up, b_up, kind, cfg, out_dtype=down.dtype)
    pairs = fused_moe_down(inter, sorted_ids, expert_of_block, ntpp, slot_of_expert, topk_weights,
                           down, b_down, cfg, out_dtype=hidden.dtype)
    if top_k == 1:
        return pairs.view(out_shape)
    out = pairs.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32)
    return out.to(hidden.dtype).view(out_shape)

