"""Tiny Hugging Face MoE models built from real ``transformers`` configs.

Used by the tests, the ``expertflow graph`` CLI and the benchmarks. Every model is
the real HF modeling code (``AutoModelForCausalLM.from_config``) with shrunken
sizes, so what the backend sees in Dynamo's graph is exactly what it sees for the
full-size checkpoints, only smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["FAMILIES", "TinyFamily", "build_tiny_model", "tiny_config"]


@dataclass(frozen=True)
class TinyFamily:
    """One MoE family: how to build its config and what its MoE layers are."""

    name: str
    make_config: Callable[..., object]
    moe_layers: Callable[[object], list[int]]


def _common(num_layers: int) -> dict:
    return dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def _mixtral(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import MixtralConfig

    c = _common(num_layers) | dict(hidden_size=hidden, intermediate_size=inter,
                                   num_local_experts=num_experts, num_experts_per_tok=top_k)
    return MixtralConfig(**(c | kw))


def _qwen2_moe(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import Qwen2MoeConfig

    c = _common(num_layers) | dict(
        hidden_size=hidden, intermediate_size=64, moe_intermediate_size=inter,
        shared_expert_intermediate_size=40, num_experts=num_experts, num_experts_per_tok=top_k,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
    )
    return Qwen2MoeConfig(**(c | kw))


def _qwen3_moe(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import Qwen3MoeConfig

    c = _common(num_layers) | dict(
        hidden_size=hidden, intermediate_size=64, moe_intermediate_size=inter, head_dim=8,
        num_experts=num_experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True,
    )
    return Qwen3MoeConfig(**(c | kw))


def _olmoe(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import OlmoeConfig

    c = _common(num_layers) | dict(hidden_size=hidden, intermediate_size=inter,
                                   num_experts=num_experts, num_experts_per_tok=top_k)
    return OlmoeConfig(**(c | kw))


def _deepseek_v3(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import DeepseekV3Config

    groups = 2 if num_experts % 2 == 0 and num_experts >= 4 else 1
    c = _common(num_layers) | dict(
        hidden_size=hidden, intermediate_size=64, moe_intermediate_size=inter,
        n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1,
        n_group=groups, topk_group=groups, first_k_dense_replace=0,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, head_dim=8, num_key_value_heads=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_interleave=True,
    )
    return DeepseekV3Config(**(c | kw))


def _gpt_oss(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import GptOssConfig

    c = _common(num_layers) | dict(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
        num_experts_per_tok=top_k, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
    )
    return GptOssConfig(**(c | kw))


def _phimoe(num_layers=2, num_experts=8, top_k=2, hidden=32, inter=48, **kw):
    from transformers import PhimoeConfig

    c = _common(num_layers) | dict(hidden_size=hidden, intermediate_size=inter,
                                   num_local_experts=num_experts, num_experts_per_tok=top_k)
    return PhimoeConfig(**(c | kw))


def _all_layers(cfg) -> list[int]:
    return list(range(cfg.num_hidden_layers))


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in [
        TinyFamily("mixtral", _mixtral, _all_layers),
        TinyFamily("qwen2_moe", _qwen2_moe, _all_layers),
        TinyFamily("qwen3_moe", _qwen3_moe, _all_layers),
        TinyFamily("olmoe", _olmoe, _all_layers),
        TinyFamily("deepseek_v3", _deepseek_v3, _all_layers),
        TinyFamily("gpt_oss", _gpt_oss, _all_layers),
        TinyFamily("phimoe", _phimoe, _all_layers),
    ]
}


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny model of ``family`` (sizes overridable)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].make_config(**overrides)


def build_tiny_model(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **overrides,
):
    """Build a randomly initialised tiny causal-LM of ``family`` in eval mode.

    Router weights get a larger scale than HF's init so that routing is decisive
    (top-k ties at init would make every comparison fragile, for eager and compiled
    alike).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    kwargs = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2 if "gate" in name and p.dim() == 2 and p.shape[0] <= 64 else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    model = model.to(dtype).eval()
    return model
