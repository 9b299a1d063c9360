"""Building the network of a ``model.arch`` name, with weights loading and a new classification head.

torchvision's ImageNet ResNets (resnet18/34/50, ImageNet weights allowed) and the CIFAR ResNets of He et al.
(resnet20..110, resnet164, plain20..110; resnet_ray/cifar_resnet.py), each built from the resolved ModelConfig (its
null switches replaced by the arch's own) and its depth in ``architectures.ARCH_SWITCHES``, the one registry.
"""

from __future__ import annotations

import logging
import os

import torch
import torchvision
from torch import nn

from resnet_ray import weights
from resnet_ray.architectures import ARCH_SWITCHES, TORCHVISION_ARCHS
from resnet_ray.cifar_resnet import CifarResNet, init_weights
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


def read_weights_file(path: str) -> dict:
    """The state_dict in a model.weights file (a plain state_dict, or a training state's ``model`` entry), loaded
    with weights_only=True: no code in the file can run."""
    _require_file(path)
    try:
        state = weights.load(path)
    except weights.UnreadableWeights as exc:
        raise ModelError(f"model.weights: cannot load {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not weights.is_state_dict(state):
        raise ModelError(f"model.weights: {path} does not hold a state_dict")
    return state


def _torchvision_resnet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """torchvision ResNet (its own he init; zero_init_residual true unless configured) with a num_classes head."""
    # zero_init_residual: each block starts as identity, which speeds up training from scratch (Goyal et al. 2017)
    model = torchvision.models.get_model(cfg.arch, weights=None, zero_init_residual=cfg.zero_init_residual)
    if cfg.init != "he":  # torchvision's own init is he (kaiming_normal_, fan_out, relu)
        init_weights(model, cfg.init)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _cifar_resnet(depth: int, cfg: ModelConfig, num_classes: int) -> nn.Module:
    return CifarResNet(
        depth,
        num_classes,
        shortcut=cfg.shortcut,
        block=cfg.block,
        preact=cfg.preact,
        norm=cfg.norm,
        init=cfg.init,
        zero_init_residual=cfg.zero_init_residual,
    )


def _build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network of a resolved cfg: torchvision's for its ImageNet ResNets, else the CIFAR ResNet of the arch's
    depth (architectures.ARCH_SWITCHES, the one registry of model.arch names). resnetN and plainN differ only by the
    shortcut that the resolved cfg carries."""
    if cfg.arch in TORCHVISION_ARCHS:
        return _torchvision_resnet(cfg, num_classes)
    return _cifar_resnet(ARCH_SWITCHES[cfg.arch]["depth"], cfg, num_classes)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The cfg.arch network with its switches, cfg.weights loaded (all but the head) and a freshly initialised
    num_classes head named ``fc``."""
    cfg = cfg.resolved()
    model = _build(cfg, num_classes)
    if cfg.weights != "none":
        enum = _weights_enum(cfg)
        state = read_weights_file(_fetch_pretrained(enum) if enum else os.path.expanduser(cfg.weights))
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
    return model


# the fields that shape a model's weights: a saved model is rebuilt with them (init and zero-init are overwritten)
STRUCTURE = ("shortcut", "block", "preact", "norm")


def saved_model_config(info: dict) -> ModelConfig:
    """The ModelConfig (weights none) that rebuilds a saved model from its model.json / meta.json: ``arch`` and
    the structural switches of its stored config. Files written before the switches existed lack them, and a
    stored config of another arch says nothing about this one: null switches, the arch's own, as before."""
    saved = (info.get("config") or {}).get("model") or {}
    if saved.get("arch") != info["arch"]:
        saved = {}
    return ModelConfig(arch=info["arch"], weights="none", **{k: saved[k] for k in STRUCTURE if k in saved})


def normalization(cfg: ModelConfig, meta: dict) -> tuple[tuple, tuple]:
    """(mean, std) on the [0, 1] scale: the pretrained weights' for torchvision nets with ImageNet weights or a
    weights file, else the train split's (a CIFAR net's weights file comes from a run of this product)."""
    if cfg.weights == "none" or not cfg.torchvision:
        return tuple(meta["mean"]), tuple(meta["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def is_head(param_name: str) -> bool:
    return param_name.removeprefix("module.").removeprefix("_orig_mod.").startswith(HEAD + ".")
