"""Every MoE family of the installed ``transformers``, discovered and built tiny.

``discover_moe_families()`` scans the installed transformers for model types whose
modeling code defines routed experts, so a new transformers release adds rows by
itself. ``build_tiny_family(model_type)`` builds a tiny random causal-LM of any of
them generically from its config class (common size attributes shrunk, MoE switched
on for every layer), with a small per-family override table for the ones that need
it. The seven hand-written core families live in ``tiny_models.py``; this module is
for breadth (``scripts/coverage.py``), not for the exactness suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from functools import lru_cache

import torch

__all__ = ["discover_moe_families", "discover_all_moe_families", "skipped_moe_families", "build_tiny_family",
           "count_moe_layers", "expert_groups", "expert_groups_per_layer", "family_head", "family_inputs",
           "FAMILY_OVERRIDES", "HEAD_OVERRIDES", "NOT_MOE", "is_encoder_decoder", "lm_inputs"]

# class names in a modeling module that mean "this model routes tokens to experts"
_MOE_CLASS = re.compile(r"^class (\w+(?:Experts|SparseMoeBlock|MoE|Router))\b", re.M)
# config attributes that mean the same
_MOE_CONFIG_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "moe_intermediate_size", "num_experts_per_tok", "moe_topk")


def _modeling_sources(model_type: str) -> list[str]:
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    d = os.path.join(os.path.dirname(transformers.__file__), "models", model_type_to_module_name(model_type))
    if not os.path.isdir(d):
        return []
    out = []
    for f in sorted(os.listdir(d)):
        if f.startswith("modeling_") and f.endswith(".py"):
            with open(os.path.join(d, f), encoding="utf-8") as fh:
                out.append(fh.read())
    return out


def _config_has_moe_attrs(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[model_type]()
    except Exception:
        return False
    return any(getattr(cfg, a, None) not in (None, 0) for a in _MOE_CONFIG_ATTRS)


# the head a family is built with, best first: (kind, name of transformers' auto mapping)
HEADS = (("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
         ("seq2seq-lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
         ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
         ("multimodal-lm", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"),
         ("token-classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
         ("model", "MODEL_MAPPING_NAMES"))
_LM_HEADS = ("causal-lm", "seq2seq-lm")
# model types whose modeling code matches the MoE scan but that route nothing to experts
NOT_MOE = {"granite_docling": "its DensityRouter chooses a vision connector path per sample; no experts"}
# families built through a sub-model (model_type -> (head class, config attribute, why))
HEAD_OVERRIDES = {
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerForConditionalGeneration", "thinker_config",
                       "the top-level class only has generate(); its thinker (image/audio/text -> text, MoE) is "
                       "the model with a forward; the talker (speech codes, MoE) is driven by generate() from the "
                       "thinker's hidden states and is not run here"),
}


def _head_of(model_type: str) -> tuple[str, str] | None:
    import transformers.models.auto.modeling_auto as ma

    if model_type in HEAD_OVERRIDES:
        return "multimodal-lm", HEAD_OVERRIDES[model_type][0]
    for kind, mapping in HEADS:
        names = getattr(ma, mapping, {})
        if model_type in names:
            return kind, names[model_type]
    return None


@lru_cache(maxsize=1)
def _scan() -> tuple[dict, tuple[tuple[str, str], ...]]:
    """``({family: (head kind, head class)}, ((model type, why not a family), ...))``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    moe = []
    for mt in CONFIG_MAPPING_NAMES:
        srcs = _modeling_sources(mt)
        has_moe = any(_MOE_CLASS.search(s) for s in srcs)
        if not has_moe and srcs and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            has_moe = _config_has_moe_attrs(mt)
        if has_moe:
            moe.append(mt)
    parent: dict[str, str] = {}
    for mt in moe:
        for sub in (getattr(CONFIG_MAPPING[mt], "sub_configs", None) or {}).values():
            t = getattr(sub, "model_type", None)
            if t and t != mt:
                parent.setdefault(t, mt)
    found, skipped = {}, []
    for mt in moe:
        head = _head_of(mt)
        if mt in NOT_MOE:
            skipped.append((mt, NOT_MOE[mt]))
        elif head is None:
            skipped.append((mt, f"no model class of its own: part of {parent.get(mt, 'a composite model')}"))
        elif head[0] not in _LM_HEADS and mt in parent:
            skipped.append((mt, f"a sub-model of {parent[mt]} (run through it)"))
        else:
            found[mt] = head
    return found, tuple(skipped)


def family_head(model_type: str) -> tuple[str, str]:
    """``(kind, class name)`` of the head a family is built with (see ``HEADS``)."""
    return _scan()[0][model_type]


def is_encoder_decoder(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def lm_inputs(model, input_ids: torch.Tensor) -> dict:
    """Keyword inputs for one forward of a tiny family model: ``input_ids``, plus
    ``decoder_input_ids`` (the same ids) for an encoder-decoder."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": input_ids, "decoder_input_ids": input_ids}
    return {"input_ids": input_ids}


def family_inputs(model, model_type: str, *, seed: int = 0, seq: int = 6, images: bool = True) -> dict:
    """Keyword inputs for one forward of a tiny family model: token ids (kept clear of the
    special and image-placeholder ids) and, for the families in ``IMAGE_INPUTS`` when
    ``images``, an image: pixel values in the family's layout and its placeholder tokens
    in the ids, so the vision tower (and any expert group that only image tokens reach)
    runs."""
    text = model.config.get_text_config()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(_FIRST_TEXT_ID, text.vocab_size, (1, seq), generator=g)
    if images and model_type in IMAGE_INPUTS:
        out = IMAGE_INPUTS[model_type](model, ids, g)
    else:
        out = lm_inputs(model, ids)
    canvas = getattr(model.config, "canvas_length", None)
    if isinstance(canvas, int):   # block diffusion: the canvas to refine (else forward draws it at random)
        out["decoder_input_ids"] = torch.randint(_FIRST_TEXT_ID, text.vocab_size, (1, canvas), generator=g)
    return out


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _patch_grid_image(model, ids: torch.Tensor, g: torch.Generator, grid: int = 4) -> dict:
    """One image for a Qwen-VL-style tower (flattened patches + ``image_grid_thw``): a
    ``grid x grid`` patch grid, merged ``spatial_merge_size``^2 to one placeholder token each,
    the placeholders in the middle of the ids, ``mm_token_type_ids`` (and ERNIE's
    ``moe_mm_token_type_ids``, which routes those tokens to the vision experts) marking them."""
    cfg = model.config
    vis = cfg.vision_config
    merge = getattr(vis, "spatial_merge_size", 2)
    patch = vis.patch_size
    tp = getattr(vis, "temporal_patch_size", 1) or 1
    ch = getattr(vis, "in_channels", None) or getattr(vis, "num_channels", 3)
    n_img = (grid // merge) ** 2
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = cfg.image_token_index
    pixels = torch.randn(grid * grid, ch * tp * patch * patch, generator=g)
    half = ids.shape[1] // 2
    ids = torch.cat([ids[:, :half], torch.full((1, n_img), image_token), ids[:, half:]], dim=1)
    types = (ids == image_token).int()
    out = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]])}
    for name in ("mm_token_type_ids", "moe_mm_token_type_ids"):
        if _accepts(model, name):
            out[name] = types
    return out


# model_type -> fn(model, ids, generator) -> inputs with an image
IMAGE_INPUTS: dict = {mt: _patch_grid_image for mt in ("qwen3_vl_moe", "ernie4_5_vl_moe", "glm4v_moe",
                                                        "qwen3_omni_moe")}


def discover_moe_families() -> list[str]:
    """Model types of the installed transformers that have a language-model head (causal
    or encoder-decoder) and routed experts (the ones ``from_pretrained`` loads)."""
    return [mt for mt, (kind, _) in _scan()[0].items() if kind in _LM_HEADS]


def discover_all_moe_families() -> list[str]:
    """Every MoE family of the installed transformers whatever its head: the language
    models of :func:`discover_moe_families` plus every top-level model (image-text-to-text,
    multimodal, token classification, bare) whose modeling code routes to experts. Sub-models
    (a composite's vision tower or text model without a head of its own) are run through
    their composite and not listed."""
    return list(_scan()[0])


def skipped_moe_families() -> list[tuple[str, str]]:
    """MoE model types that are not families of their own, with the reason."""
    return list(_scan()[1])


# --------------------------------------------------------------------------- sizes

_SIZES = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=48, expert_intermediate_size=48,
    shared_expert_intermediate_size=40, ffn_hidden_size=64, moe_ffn_hidden_size=48, ffn_dim=64,
    intermediate_size_mlp=64, dense_intermediate_size=64,
    num_hidden_layers=2, num_layers=2, n_layer=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    vocab_size=128, max_position_embeddings=256,
    num_local_experts=8, num_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_topk=2, top_k=2, num_selected_experts=2,
    n_shared_experts=1, num_shared_experts=1,
    first_k_dense_replace=0, first_k_dense=0, num_dense_layers=0, decoder_sparse_step=1, moe_layer_freq=1,
    interleave_moe_layer_step=1, mlp_only_layers=[], moe_layer_start_index=0,
    n_group=2, topk_group=2, num_expert_group=2,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    sliding_window=8, attention_chunk_size=8, tie_word_embeddings=False,
    # hybrid (mamba / linear attention) sizes
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_head_dim=8,
    ssm_state_size=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=8, linear_conv_kernel_dim=4, conv_kernel=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# values that only make sense when the config already has them (never added)
_LIST_LAYER_ATTRS = ("layer_types", "mlp_layer_types", "moe_layer_types", "layers_block_type",
                     "hybrid_override_pattern", "block_types")


# Per-family workarounds: model_type -> (kwargs merged over the generic sizes, why).
FAMILY_OVERRIDES: dict[str, tuple[dict, str]] = {
    "dbrx": (dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=128,
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2)),
             "DBRX names its sizes d_model/n_heads/n_layers and nests attention/FFN sizes in sub-configs"),
    "dots3_note_text": (dict(num_key_value_heads=4, head_dim=16),
                        "validators want num_key_value_heads == num_attention_heads and "
                        "head_dim == qk_nope_head_dim + qk_rope_head_dim"),
    "dots3_note": (dict(text_config=dict(num_key_value_heads=4, head_dim=16),
                        vision_config=dict(adapter_out_dim=_SIZES["hidden_size"]),
                        audio_config=dict(adapter_out_dim=_SIZES["hidden_size"])),
                   "as dots3_note_text; the vision/audio adapters' output width must equal the text hidden size"),
    "granitemoehybrid": (dict(mamba_d_head=16, mamba_expand=2, layer_types=["linear_attention", "full_attention"]),
                         "validator wants mamba_n_heads * mamba_d_head == mamba_expand * hidden_size; default "
                         "layer_types is all-mamba, which the 2-layer model cannot run (no attention cache layer)"),
    "jamba": (dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
              "layer kinds come from periods/offsets: one mamba + one attention layer, experts in both"),
    "qwen4_exp_text": (dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                            indexer_compress_ratio=2, ngram_vocab_size_base=256, ple_embed_dim=32,
                            hc_lowrank=16),
                       "indexed attention needs its indexer sizes (None by default); n-gram vocab shrunk"),
    "zaya": (dict(num_experts_per_tok=1), "ZAYA supports top-1 routing only"),
    "gemma4_text": (dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=48,
                         vocab_size_per_layer_input=128, hidden_size_per_layer_input=8),
                    "MoE is off by default (enable_moe_block=False, num_experts=None); per-layer-input "
                    "embeddings have their own vocab size"),
    "gemma4": (dict(text_config=dict(enable_moe_block=True, num_experts=8, top_k_experts=2,
                                     moe_intermediate_size=48, vocab_size_per_layer_input=128,
                                     hidden_size_per_layer_input=8)),
               "as gemma4_text, on the text sub-config"),
    "qwen4_exp": (dict(text_config=dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                                        indexer_compress_ratio=2, ngram_vocab_size_base=256, ple_embed_dim=32,
                                        hc_lowrank=16)), "as qwen4_exp_text"),
    "doge": (dict(num_experts=16, num_experts_per_tok=2),
             "cross-domain MoE: experts are rows of an embedding table, num_experts must be a perfect square "
             "(product-key retrieval); default 16384"),
    "longcat_flash": (dict(zero_expert_num=2, expert_ffn_hidden_size=48),
                      "default zero_expert_num=256 identity experts next to 8 real ones: a short prompt's "
                      "top-2 never reaches a real expert; 2 identity experts here"),
    "switch_transformers": (dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                 num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8,
                                 expert_capacity=64, vocab_size=128, relative_attention_num_buckets=8),
                            "encoder-decoder; T5 names (d_model/d_ff/num_layers); every other layer sparse "
                            "(2 of 2 per stack counts as one MoE layer each)"),
    "nllb-moe": (dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, num_experts=8, expert_capacity=64,
                      encoder_sparse_step=1, decoder_sparse_step=1, vocab_size=128, max_position_embeddings=64),
                 "encoder-decoder; fairseq names (d_model/encoder_ffn_dim/encoder_layers)"),
    "inkling2_text": (dict(unpadded_vocab_size=128),
                      "the LM head has unpadded_vocab_size rows (default 200058, more than the tiny vocab_size: "
                      "save_pretrained's re-padding to vocab_size would fail)"),
    "inkling2_loop_text": (dict(unpadded_vocab_size=128), "as inkling2_text"),
    "deepseek_ocr2": (dict(text_config=dict(mlp_layer_types=["sparse", "sparse"])),
                      "the text config's mlp_layer_types defaults to None and the decoder indexes it"),
    "unlimited_ocr": (dict(text_config=dict(mlp_layer_types=["sparse", "sparse"])), "as deepseek_ocr2"),
    "diffusion_gemma": (dict(canvas_length=8, text_config=dict(per_layer_config={}, enable_moe_block=True, num_experts=8, top_k_experts=2,
                                              moe_intermediate_size=48)),
                        "as gemma4_text (MoE off by default); per-layer table keyed by the 30 default layers; "
                        "a canvas of 8 tokens (256 by default)"),
    "ernie4_5_vl_moe": (dict(text_config=dict(moe_intermediate_size=[48, 40], moe_num_experts=8, moe_k=2, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))),
                        "two expert groups per layer (text and vision experts): moe_intermediate_size is one "
                        "size per group"),
    "glm4v_moe": (dict(text_config=dict(head_dim=16, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]))),
                  "multimodal RoPE: mrope_section must sum to half the rotary width"),
    "glm5_next": (dict(text_config=dict(qk_rope_head_dim=0)), "DSA attention layers are NoPE (qk_rope_head_dim=0)"),
    "hy_v4_vl": (dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            mrope_section=[2, 1, 1]))),
                 "mrope_section must sum to qk_rope_head_dim // 2"),
    "mistral4": (dict(head_dim=16), "the rotary width is head_dim * partial factor = qk_rope_head_dim"),
    "mistral_large4": (dict(text_config=dict(kv_source_layers=[0, 1])), "one KV source per layer"),
    "muse_spark": (dict(audio_config=dict(num_hidden_layers=4, hidden_sizes=[16, 16, 32, 32]),
                        text_config=dict(moe_hidden_size=32)),
                   "the audio pyramid has one stage per layer (patch_sizes/hidden_sizes/depths of 4); the experts "
                   "work in their own width moe_hidden_size (4096 by default)"),
    "inkling_mm_model": (dict(vision_config=dict(n_layers=4, num_hidden_layers=4, patch_size=4)),
                         "the vision tower's channel plan grows with patch_size^2 (40: a 23 GB layer); "
                         "fewer vision layers than output scales would need scipy's linear_sum_assignment"),
    "qwen3_omni_moe": (dict(talker_config=dict(text_config=dict(shared_expert_intermediate_size=40))),
                       "the talker's MoE reads shared_expert_intermediate_size, which its config class lacks"),
    "lfm2_moe": (dict(layer_types=["conv", "full_attention"]),
                 "layer_types defaults to None and is required to place conv vs attention layers"),
}


def _sparse_tokens(values) -> list:
    """The entries of a per-layer list that mean 'MoE layer' (several kinds, e.g. hash
    and top-k MoE, are all kept so the tiny model has one layer of each)."""
    out = []
    for v in values:
        if (isinstance(v, str) and any(t in v.lower() for t in ("moe", "sparse", "expert"))) or v is True:
            if v not in out:
                out.append(v)
    return out


def _tiny_kwargs(defaults: dict, extra: dict) -> tuple[dict, list[str]]:
    notes = []
    kw = {k: v for k, v in _SIZES.items() if k in defaults}
    kw |= extra
    # drop None sentinels (only used to wipe values when asked)
    kw = {k: v for k, v in kw.items() if not (v is None and defaults.get(k) is None)}
    n = kw.get("num_hidden_layers", defaults.get("num_hidden_layers"))
    for attr in _LIST_LAYER_ATTRS:
        val = defaults.get(attr)
        if attr in extra or not isinstance(val, (list, tuple)) or not val or not isinstance(n, int):
            continue
        if attr == "layer_types":
            # keep the family's attention pattern, cut to n layers
            # keep one of each kind the family mixes (hybrids need an attention layer), full last
            kinds = list(dict.fromkeys(val))
            kinds.sort(key=lambda t: "full" in str(t))
            kw[attr] = (kinds * n)[:n] if len(kinds) <= n else kinds[-n:]
            if len(kinds) > 1:
                notes.append(f"{attr} = {kw[attr]}")
        else:
            toks = _sparse_tokens(val)
            kw[attr] = (toks * n)[:n] if toks else [val[i % len(val)] for i in range(n)]
            if toks:
                notes.append(f"{attr} = {kw[attr]} (MoE in every layer)")
    if isinstance(defaults.get("hybrid_override_pattern"), str) and "hybrid_override_pattern" not in extra:
        pat = defaults["hybrid_override_pattern"]
        # nemotron-style: keep one mixer and one MoE ('E') layer
        kw["hybrid_override_pattern"] = ("M" if "M" in pat else pat[0]) + ("E" if "E" in pat else pat[-1])
        kw["num_hidden_layers"] = 2
    if isinstance(defaults.get("per_layer_config"), dict) and isinstance(n, int) and "per_layer_config" not in extra:
        kw["per_layer_config"] = {k: v for k, v in defaults["per_layer_config"].items()
                                  if isinstance(k, int) and k < n or str(k).isdigit() and int(k) < n}
    if defaults.get("kv_lora_rank") and "num_key_value_heads" in defaults and "num_key_value_heads" not in extra:
        kw["num_key_value_heads"] = kw.get("num_attention_heads", defaults.get("num_attention_heads"))
        notes.append("MLA: num_key_value_heads = num_attention_heads")
    if isinstance(defaults.get("moe_layer_freq"), (list, tuple)) and isinstance(n, int):
        kw["moe_layer_freq"] = [1] * n
    return kw, notes


@contextlib.contextmanager
def _time_box(seconds: float):
    if seconds is None or seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"tiny build took longer than {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_FIRST_TEXT_ID = 24   # random text ids are drawn from [_FIRST_TEXT_ID, vocab): clear of special tokens

# sizes of vision / audio towers and other sub-models (applied to every nested config)
_TOWER_SIZES = dict(
    depth=2, n_layers=2, encoder_layers=2, num_heads=4, encoder_attention_heads=4, d_model=32,
    encoder_ffn_dim=64, mlp_dim=64, projection_hidden_dim=64, projector_hidden_size=64,
    projection_intermediate_size=64, downsample_hidden_size=16, output_channels=16,
    num_position_embeddings=256, position_embedding_size=256, num_mel_bins=16, n_mel_bins=16,
)
# widths that must equal the sub-model's own hidden size
_OWN_WIDTH_ATTRS = ("adapter_in_dim", "adapter_input_size")
# widths that must equal the language model's hidden size (a tower's output projection)
_TEXT_WIDTH_ATTRS = ("out_hidden_size", "text_hidden_size", "output_dim", "thinker_hidden_size",
                     "adapter_out_dim", "projector_out_dim")


def _is_sub_config(key: str, val) -> bool:
    # per-layer tables (``per_layer_config``: {layer index: ...}) are attributes, not sub-configs
    return isinstance(val, dict) and ("model_type" in val or key.endswith("_config") and not any(
        isinstance(k, int) or str(k).isdigit() for k in val) and bool(val))


def _shrink(defaults: dict, extra: dict, text_width: int, notes: list[str], path: str = "") -> dict:
    """Tiny kwargs for one (possibly composite) config dict: the generic sizes on its own
    attributes where it has any, and recursively on every nested sub-config."""
    own = {k: v for k, v in defaults.items() if not _is_sub_config(k, v)}
    plain = {k: v for k, v in extra.items() if not _is_sub_config(k, defaults.get(k))}
    if any(k in own for k in ("hidden_size", "d_model", "num_hidden_layers", "depth", "n_layers")):
        sizes = dict(_SIZES) | _TOWER_SIZES
        kw = {k: v for k, v in sizes.items() if k in own and k not in extra}
        base, tnotes = _tiny_kwargs(own, plain)
        kw |= base
        notes += [f"{path}{n}" for n in tnotes]
    else:
        kw = dict(plain)
    for attr in _TEXT_WIDTH_ATTRS:
        if isinstance(own.get(attr), int) and attr not in extra:
            kw[attr] = text_width
    for attr in _OWN_WIDTH_ATTRS:   # a tower's adapter reads the tower's own width
        if isinstance(own.get(attr), int) and attr not in extra and "hidden_size" in kw:
            kw[attr] = kw["hidden_size"]
    # multimodal placeholder / marker tokens (image, video, audio, vision start, ...) sit far past
    # the tiny vocabulary: distinct small ids (random text ids start at _FIRST_TEXT_ID)
    special = [k for k, v in own.items() if (k.endswith("_token_id") or k.endswith("_token_index"))
               and k not in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
               and isinstance(v, int) and not isinstance(v, bool) and v >= _FIRST_TEXT_ID and k not in extra]
    for i, k in enumerate(special[:_FIRST_TEXT_ID - 3]):
        kw[k] = 3 + i
    for k, v in defaults.items():
        if _is_sub_config(k, v):
            kw[k] = v | _shrink(v, extra.get(k, {}), text_width, notes, f"{path}{k}.")
    return kw


def tiny_family_config(model_type: str):
    """The tiny config of ``model_type`` and the notes on what was forced: the generic
    sizes on the config and on every nested sub-config (text, vision, audio, ...), the
    towers' output widths set to the text hidden size, then the family's override."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    extra, why = FAMILY_OVERRIDES.get(model_type, ({}, ""))
    notes = [f"override: {why}"] if why else []
    defaults = cls().to_dict()
    kw = _shrink(defaults, extra, _SIZES["hidden_size"], notes)
    if any(_is_sub_config(k, v) for k, v in defaults.items()):
        notes.append("sizes applied to every sub-config")
    return cls(**kw), notes


def build_tiny_family(model_type: str, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                      time_limit_s: float = 120.0):
    """Build a tiny random model of ``model_type`` with its head (``family_head``) in eval
    mode: ``(model, notes)``.

    Raises on failure (``TimeoutError`` past ``time_limit_s``); callers record the reason.
    Router weights get a larger scale than HF's init so that routing is decisive.
    """
    import transformers

    with _time_box(time_limit_s):
        cfg, notes = tiny_family_config(model_type)
        kind, cls_name = family_head(model_type)
        if model_type in HEAD_OVERRIDES:
            _, attr, why = HEAD_OVERRIDES[model_type]
            cfg = getattr(cfg, attr)
            notes.append(f"built as {cls_name}: {why}")
        elif kind not in _LM_HEADS:
            notes.append(f"built as {cls_name} ({kind})")
        torch.manual_seed(seed)
        if kind in _LM_HEADS:   # the auto class picks the model class from the config's own class
            auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq-lm" else transformers.AutoModelForCausalLM
            model = auto.from_config(cfg)
        else:
            model = getattr(transformers, cls_name)._from_config(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    router = ("gate" in name or "router" in name) and p.dim() == 2 and p.shape[0] <= 64
                    p.normal_(0.0, 0.2 if router else 0.08)
                elif "bias" in name:
                    p.normal_(0.0, 0.02)
                elif "norm" in name or "weight" in name.rsplit(".", 1)[-1]:
                    # norms: keep near 1 (some families init them to 0 and add 1 in forward)
                    pass
        model = model.to(dtype).eval()
    return model, notes


def count_moe_layers(model: torch.nn.Module) -> int:
    """Layers (decoder, or encoder and decoder) holding routed experts: a module whose class or name says experts
    (``*Experts`` class, ``experts`` attribute) or that owns a 3-D expert weight
    (convolutions and other 3-D weights are not experts)."""
    layers = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        cls = type(mod).__name__
        leaf = name.rsplit(".", 1)[-1]
        if "shared" in leaf.lower():
            continue
        is_experts = leaf == "experts" or cls.endswith("Experts")
        has3d = any(p.dim() == 3 for p in mod.parameters(recurse=False)) and (
            "expert" in name.lower() or "expert" in cls.lower() or "moe" in cls.lower())
        if not (has3d or is_experts):
            continue
        # the stack and index of the layer (encoder and decoder layers apart)
        m = re.search(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer)\.\d+)\.", name + ".")
        layers.add(m.group(1) if m else name)
    return len(layers)


def _layer_prefix(name: str) -> str:
    m = re.search(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer)\.\d+)\.", name + ".")
    return m.group(1) if m else name


def expert_groups(model: torch.nn.Module) -> list[str]:
    """Module paths of the routed expert groups of ``model``: one per set of experts with
    its own routing (a layer with text and vision experts has two; shared experts, run on
    every token, are not routed and not counted). A group is the outermost module that is
    an experts module (``*Experts`` class or an ``experts`` attribute) or owns a 3-D expert
    weight; convolutions are never experts."""
    groups: list[str] = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        cls = type(mod).__name__
        leaf = name.rsplit(".", 1)[-1]
        if "shared" in leaf.lower():   # shared_expert(s), shared_mlp: run on every token, not routed
            continue
        is_experts = leaf == "experts" or cls.endswith("Experts")
        has3d = any(p.dim() == 3 for p in mod.parameters(recurse=False)) and (
            "expert" in name.lower() or "expert" in cls.lower() or "moe" in cls.lower())
        if not (is_experts or has3d):
            continue
        if leaf != "experts" and "." in name:
            # one projection of a group (JetMoE/Granite's ParallelExperts input_linear and
            # output_linear): the group is the module holding them
            name = name.rsplit(".", 1)[0]
        if name not in groups and not any(name.startswith(g + ".") for g in groups):
            groups.append(name)
    return groups


def expert_groups_per_layer(model: torch.nn.Module) -> dict[str, list[str]]:
    """:func:`expert_groups` by layer (``model.layers.0`` -> its groups)."""
    out: dict[str, list[str]] = {}
    for g in expert_groups(model):
        out.setdefault(_layer_prefix(g), []).append(g)
    return out
