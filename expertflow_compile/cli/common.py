"""What the ``expertflow`` subcommands share: the one-line error (:class:`CLIError`), argument
types, file checks, and loading a shipped model or a checkpoint. ``main.py`` (the commands
and the parser) and ``predict.py`` (trace / train-predictor / eval) both import it; it
imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from ..assets import shipped_model_path


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``expertflow run: error: argument ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int; give an int >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not valid; give an int >= {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a number > 0") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not valid; give a finite number > 0")
    return value


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _existing_file(arg: str, path: str, what: str) -> str:
    """``path`` must be a readable file: else a CLIError naming ``arg``."""
    if os.path.isdir(path):
        raise CLIError(f"{arg} {path!r} is a directory; give {what}")
    if not os.path.isfile(path):
        raise CLIError(f"{arg} {path!r} does not exist; give {what}")
    return path


def _output_file(arg: str, path: str) -> str:
    """A file to write: not a directory; its folder is created."""
    if os.path.isdir(path):
        raise CLIError(f"{arg} {path!r} is a directory; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{arg} {path!r}: cannot create its folder ({_first_line(exc)})") from None
    return path


def _read_text(arg: str, path: str) -> str:
    _existing_file(arg, path, "a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"{arg} {path!r} is not readable UTF-8 text ({_first_line(exc)})") from None


def _load_trace(arg: str, path: str, model=None):
    """A routing trace file (refused when recorded on another model, with ``model``)."""
    from ..runtime.trace import RoutingTrace

    _existing_file(arg, path, "a routing trace (expertflow trace --out FILE)")
    try:
        trace = RoutingTrace.load(path, model=model)
    except Exception as exc:  # noqa: BLE001  (whatever the file holds, it is the user's file)
        raise CLIError(f"{arg} {path!r} is not a usable routing trace ({_first_line(exc)})") from None
    if trace.num_tokens == 0 or not trace.layers:
        raise CLIError(f"{arg} {path!r} holds no routed tokens; record a trace of some text first")
    return trace


def _load_predictor(arg: str, path: str, model):
    from ..runtime.prediction import PathPredictor

    _existing_file(arg, path, "a path-predictor file (expertflow train-predictor --out FILE)")
    try:
        return PathPredictor.load(path, model=model)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"{arg} {path!r} is not a usable path predictor ({_first_line(exc)})") from None


SHIPPED_MODEL = shipped_model_path()   # the default shipped model (expertflow_compile.assets.DEFAULT_MODEL)


def _shipped_or(path: str | None) -> str:
    """``--model``: a shipped model's short name (``expertflow_compile.assets.SHIPPED_MODELS``),
    a checkpoint directory, or None (the default shipped model)."""
    from ..assets import SHIPPED_MODELS, shipped_model_path

    path = path or SHIPPED_MODEL
    if path in SHIPPED_MODELS and not os.path.isdir(path):
        return shipped_model_path(path)
    if not os.path.isdir(path):
        raise CLIError(f"--model {path!r}: model path is not a directory, nor a shipped model's name "
                       f"({', '.join(SHIPPED_MODELS)})")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CLIError(f"--model {path!r} has no config.json: not a Hugging Face checkpoint")
    return path


def _moe_config(path: str):
    """The checkpoint's transformers config; a CLIError naming --model unless it is a MoE model."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"--model {path!r}: cannot read a transformers config ({_first_line(exc)})") from None
    if not any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise CLIError(f"--model {path!r} is not a Mixture-of-Experts model ({type(cfg).__name__} has no experts)")
    return cfg


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading weights" bar from transformers while the CLI loads a (small) checkpoint:
    stderr is for our one-line errors."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_checkpoint(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _moe_config(path)
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001  (a truncated or foreign checkpoint is the user's input)
        raise CLIError(f"--model {path!r}: cannot load the checkpoint ({_first_line(exc)})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"--model {path!r}: cannot load its tokenizer ({_first_line(exc)})") from None
    return model, tok
