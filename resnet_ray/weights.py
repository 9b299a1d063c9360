"""The one loader of weight files: ``torch.load(..., weights_only=True)`` on the CPU, so that no code in a file can
run, and a one-line reason when a file is refused. A leaf: torch only, below model.py, checkpoint.py and
saved_model.py, which each turn :class:`UnreadableWeights` into their own error naming the field or folder.
"""

from __future__ import annotations

import re
from typing import Any

import torch


class UnreadableWeights(ValueError):
    """A file that torch.load(weights_only=True) refused; the message names the file and why, in one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def refusal(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line: a pickle that asks to run code (a global
    that is not a tensor type) is named as such; anything else by the first line of torch's message."""
    text = str(exc)
    asked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if "Weights only load failed" in text or asked:
        what = f" ({asked.group(1)})" if asked else ""
        return f"not a weights-only state_dict: its pickle asks to run code{what}, which is never run"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"not a readable weights file ({type(exc).__name__}: {first})"


def load(path: str, mmap: bool = False) -> Any:
    """What a weights file holds (tensors, and dicts/lists/numbers of them), on the CPU, loaded with
    weights_only=True. ``mmap``: map the tensors instead of reading them (a cheap check of the pickle; an old,
    non-zip file is read whole). UnreadableWeights naming the file for anything refused."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # one line: torch's message runs over many, and a pickle payload never runs
        raise UnreadableWeights(path, refusal(exc)) from None


def is_state_dict(value: Any) -> bool:
    """A mapping of parameter names to tensors."""
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def unwrap_state_dict(state: dict) -> dict:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    return {k.replace("module.", "", 1).replace("_orig_mod.", "", 1): v for k, v in state.items()}
