"""ResNet backbones from torchvision with a new classification head."""

from __future__ import annotations

import logging
import os

import torch
import torchvision
from torch import nn

from resnet_ray.config import ModelConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD = "fc"  # parameters whose name starts with this belong to the new head


class ModelError(RuntimeError):
    """The model or its weights cannot be built as configured."""


def _weights_enum(cfg: ModelConfig):
    """torchvision weights enum entry for imagenet / imagenet_v1 / imagenet_v2, else None."""
    if cfg.weights not in ("imagenet", "imagenet_v1", "imagenet_v2"):
        return None
    enum = torchvision.models.get_model_weights(cfg.arch)
    if cfg.weights == "imagenet":
        return enum.DEFAULT
    name = "IMAGENET1K_V1" if cfg.weights == "imagenet_v1" else "IMAGENET1K_V2"
    if not hasattr(enum, name):
        raise ModelError(
            f"model.weights: {cfg.arch} has no {name} weights; available: {', '.join(w.name for w in enum)}"
        )
    return getattr(enum, name)


def _fetch_pretrained(weights) -> str:
    """Path of the cached torchvision weights file, downloaded (hash-checked) when the network allows."""
    filename = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hash_prefix = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(weights.url, path, hash_prefix.group(1) if hash_prefix else None, progress=False)
    except Exception as exc:  # no network, proxy, hash mismatch: all end the same way for the user
        raise ModelError(
            f"model.weights: cannot download {weights.url} ({type(exc).__name__}: {exc}). torchvision caches "
            f"weights under $TORCH_HOME/hub/checkpoints (now {os.path.dirname(path)}): put {filename} there, or "
            f"pass a local state_dict file with --model.weights /path/to/weights.pth, or --model.weights none."
        ) from None
    return path


def fetch_weights(cfg: ModelConfig) -> None:
    """On the job's driver, before any Ray work: ImageNet weights cached on this node or downloaded now (the
    workers on this node then find them cached instead of each downloading them), else a ModelError at once;
    a weights path that does not exist here is refused too."""
    enum = _weights_enum(cfg)
    if enum is not None:
        _fetch_pretrained(enum)
    elif cfg.weights != "none":
        _require_file(os.path.expanduser(cfg.weights))


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ModelError(
            f"model.weights: {path!r} is neither imagenet, imagenet_v1, imagenet_v2, none nor an existing file"
        )


def load_state_dict(path: str) -> dict:
    """A state_dict from a file, loaded with weights_only=True (no arbitrary unpickling)."""
    _require_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"model.weights: cannot load {path}: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"model.weights: {path} does not hold a state_dict")
    return state


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """torchvision ResNet with cfg.weights loaded and a freshly initialised num_classes head."""
    # zero_init_residual: each block starts as identity, which speeds up training from scratch (Goyal et al. 2017)
    model = torchvision.models.get_model(cfg.arch, weights=None, zero_init_residual=True)
    if cfg.weights != "none":
        enum = _weights_enum(cfg)
        state = (
            torch.load(_fetch_pretrained(enum), map_location="cpu", weights_only=True)
            if enum
            else load_state_dict(os.path.expanduser(cfg.weights))
        )
        state = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEAD + ".")}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
        if missing or unexpected or mismatched:
            raise ModelError(
                f"model.weights: {cfg.weights} does not fit {cfg.arch}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {mismatched[:5]}"
            )
        model.load_state_dict(state, strict=False)
        log.info("loaded %s weights into %s", cfg.weights, cfg.arch)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def normalization(cfg: ModelConfig, meta: dict) -> tuple[tuple, tuple]:
    """(mean, std) on the [0, 1] scale: the pretrained weights' for ImageNet weights, else the train split's."""
    if cfg.weights == "none":
        return tuple(meta["mean"]), tuple(meta["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def is_head(param_name: str) -> bool:
    return param_name.removeprefix("module.").removeprefix("_orig_mod.").startswith(HEAD + ".")
