"""Shared by the examples: the shipped model, its tokenizer and a prompt (one thread)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertflow_compile.assets import shipped_model_path

PROMPT = "The function returns a list of the keys"


def load(name: str = "tiny_mixtral"):
    """The shipped model ``name`` (eval mode) and its tokenizer."""
    torch.set_num_threads(1)
    path = shipped_model_path(name)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path
