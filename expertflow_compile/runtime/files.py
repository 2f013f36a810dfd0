"""Opening the safetensors files the runtime reads (routing traces, predictors).

Every failure to open one is a ``ValueError`` that names the file and what it was meant to
be, instead of the reader's bare message ("header too large", "No such device").
"""

from __future__ import annotations

import os

__all__ = ["open_safetensors"]


def open_safetensors(path, what: str):
    """``safetensors.safe_open(path)`` (PyTorch tensors), or ``ValueError`` naming ``path`` as
    ``what`` ("routing trace", "path-predictor file")."""
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"the {what} path must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"the {what} {path!r} is a directory, not a file")
    if not os.path.exists(path):
        raise ValueError(f"the {what} {path!r} does not exist")
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - the reader's errors are not one type (OSError, SafetensorError)
        raise ValueError(f"the {what} {path!r} is not a readable safetensors file ({exc})") from None
