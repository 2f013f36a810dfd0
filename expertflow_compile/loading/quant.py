"""Which quantized checkpoints the loader serves, decided from ``config.json`` before anything loads.

Served (experts kept compressed, dequantized when they compute; dense weights
dequantized by transformers at load, as it does on CPU):

* ``quant_method: "fp8"`` - transformers' fine-grained FP8: ``float8_e4m3fn`` weights with
  ``weight_scale_inv`` block scales (DeepSeek-V3/R1 and the other block-FP8 releases);
* ``quant_method: "mxfp4"`` - GPT-OSS's ``*_blocks`` / ``*_scales`` experts.

Every other ``quant_method`` is refused by name. The served configs are loaded with
``dequantize=True`` on every device: the model keeps transformers' plain modules (the
backend matches those), whose dense weights transformers dequantizes at load.
"""

from __future__ import annotations

__all__ = ["SERVED_METHODS", "quantization_of", "check_quantization", "force_dequantize"]

SERVED_METHODS = {
    "fp8": "block FP8 (float8_e4m3fn + weight_scale_inv)",
    "mxfp4": "MXFP4 (*_blocks + *_scales)",
}


def quantization_of(config_dict: dict) -> dict | None:
    """The ``quantization_config`` of a raw ``config.json`` (top level or a text sub-config)."""
    qc = config_dict.get("quantization_config")
    if qc is None:
        for sub in ("text_config", "language_config", "llm_config"):
            s = config_dict.get(sub)
            if isinstance(s, dict) and s.get("quantization_config") is not None:
                qc = s["quantization_config"]
                break
    return qc if isinstance(qc, dict) else None


def check_quantization(config_dict: dict, config_path: str) -> str | None:
    """The served quantization method of the checkpoint (None: not quantized); raises a
    one-line ValueError for any other."""
    qc = quantization_of(config_dict)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in SERVED_METHODS:
        served = "; ".join(f"{k!r}: {v}" for k, v in SERVED_METHODS.items())
        raise ValueError(f"{config_path}: the checkpoint is quantized with quant_method={method or None!r} "
                         f"(quantization_config): expertflow_compile.from_pretrained serves unquantized checkpoints "
                         f"and {served}")
    if method == "fp8" and str(qc.get("expert_dtype", "fp8")).lower() not in ("fp8", "none"):
        raise ValueError(f"{config_path}: block-FP8 checkpoint with expert_dtype={qc.get('expert_dtype')!r} "
                         "(quantization_config): expertflow serves FP8 experts only")
    return method


def force_dequantize(config) -> None:
    """Make transformers load a served quantized checkpoint into its plain modules."""
    for c in (config, getattr(config, "get_text_config", lambda: None)()):
        qc = getattr(c, "quantization_config", None) if c is not None else None
        if isinstance(qc, dict):
            qc["dequantize"] = True
        elif qc is not None and hasattr(qc, "dequantize"):
            qc.dequantize = True
