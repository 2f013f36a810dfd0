"""The trained models shipped in this folder, by short name.

Each shipped model is a Hugging Face checkpoint directory beside this file
(``config.json``, bf16 ``model.safetensors`` in the release's per-expert layout,
tokenizer, ``training_report.json``), trained by ``scripts/train_tiny_moe.py`` on the
same corpus and split; ``README.md`` here describes each one.

Invariants:
* a name is the checkpoint's directory name; ``SHIPPED_MODELS`` lists every one;
* ``DEFAULT_MODEL`` (``tiny_mixtral``) is the model ``expertflow run`` uses when none is named;
* an unknown name is a ``ValueError`` naming the valid ones, never a fallback;
* importing this module loads nothing (no torch, no files read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
HELDOUT_TEXT = os.path.join(ASSETS_DIR, "heldout.txt")


@dataclass(frozen=True)
class ShippedModel:
    """One shipped checkpoint: its short name, its directory and what it is, in one line."""

    name: str
    description: str

    @property
    def path(self) -> str:
        return os.path.join(ASSETS_DIR, self.name)


SHIPPED_MODELS: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            "tiny_mixtral",
            "Mixtral, 6 layers x 8 experts, top-2, hidden 128, 7.2M params; held-out perplexity 40.44",
        ),
        ShippedModel(
            "tiny_qwen2_moe",
            "Qwen2-MoE with Qwen1.5-MoE-A2.7B's routing: 8 layers x 60 experts, top-4, one gated shared "
            "expert, hidden 128, 14.2M params; held-out perplexity 34.12",
        ),
    )
}
DEFAULT_MODEL = "tiny_mixtral"


def shipped_model_names() -> tuple[str, ...]:
    """The valid short names, default first."""
    return (DEFAULT_MODEL,) + tuple(n for n in SHIPPED_MODELS if n != DEFAULT_MODEL)


def shipped_model(name: str = DEFAULT_MODEL) -> ShippedModel:
    """The registry entry for `name`; ValueError naming the valid names if there is none."""
    try:
        return SHIPPED_MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown shipped model {name!r}; valid names: {', '.join(shipped_model_names())}"
        ) from None


def shipped_model_path(name: str = DEFAULT_MODEL) -> str:
    """The checkpoint directory of shipped model `name` (loadable with from_pretrained)."""
    model = shipped_model(name)
    if not os.path.isfile(os.path.join(model.path, "config.json")):
        raise FileNotFoundError(f"shipped model {name!r}: {model.path} has no config.json (incomplete install?)")
    return model.path


__all__ = [
    "ASSETS_DIR",
    "DEFAULT_MODEL",
    "HELDOUT_TEXT",
    "SHIPPED_MODELS",
    "ShippedModel",
    "shipped_model",
    "shipped_model_names",
    "shipped_model_path",
]
