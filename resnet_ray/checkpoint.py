"""Training state <-> checkpoint folders, and the self-contained exported model.

A training checkpoint folder holds ``state.pt`` (model, optimizer, epoch) and ``meta.json``
(resolved config, class names, normalization, metrics history). An exported model folder holds
``model.pt`` (a plain state_dict) and ``model.json`` (everything needed to use it, with the
SHA-256 of model.pt, checked before loading). Everything loads with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from resnet_ray.config import ModelConfig, from_dict

STATE = "state.pt"
META = "meta.json"
MODEL = "model.pt"
MODEL_INFO = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint or exported model is missing, corrupt or does not fit."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unwrap_state_dict(state: dict) -> dict:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    return {k.replace("module.", "", 1).replace("_orig_mod.", "", 1): v for k, v in state.items()}


def model_weights(state: dict) -> dict:
    """The weights a training state stands for: the moving average when the run kept one (train.ema_decay)."""
    return unwrap_state_dict(state.get("ema") or state["model"])


def save_training_state(folder: str, state: dict, meta: dict) -> None:
    torch.save(state, os.path.join(folder, STATE))
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=2)


def load_training_state(folder: str) -> tuple[dict, dict]:
    """(state, meta) of a training checkpoint folder."""
    state_path, meta_path = os.path.join(folder, STATE), os.path.join(folder, META)
    for path in (state_path, meta_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: not a training checkpoint (missing {os.path.basename(path)})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{folder}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None
    return state, meta


def export_model(checkpoint_folder: str, out_dir: str) -> str:
    """Write the checkpoint's model as a self-contained folder (state_dict + JSON metadata), atomically."""
    state, meta = load_training_state(checkpoint_folder)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        torch.save(model_weights(state), os.path.join(tmp, MODEL))
        info = {key: meta[key] for key in ("arch", "num_classes", "classes", "coarse_classes", "fine_to_coarse",
                                           "image_size", "mean", "std", "dataset", "epoch", "metrics", "config")}
        info["sha256"] = _sha256(os.path.join(tmp, MODEL))
        with open(os.path.join(tmp, MODEL_INFO), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class LoadedModel:
    model: torch.nn.Module
    info: dict  # model.json contents (or the equivalent from a training checkpoint)
    source: str  # the folder it came from


def _resolve_model_folder(path: str) -> str:
    """An exported model folder, a training checkpoint folder, or a run folder (-> its model/)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder, checkpoint or run folder")
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, MODEL_INFO)) or os.path.isfile(os.path.join(candidate, STATE)):
            return candidate
    raise CheckpointError(f"{path}: neither an exported model ({MODEL_INFO}), a training checkpoint ({STATE}) "
                          f"nor a run folder with model/")


def read_info(path: str) -> tuple[str, dict]:
    """(folder, metadata) of an exported model, checkpoint or run folder, without loading any weights."""
    folder = _resolve_model_folder(path)
    name = MODEL_INFO if os.path.isfile(os.path.join(folder, MODEL_INFO)) else META
    try:
        with open(os.path.join(folder, name)) as f:
            return folder, json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/{name}: missing or corrupt ({exc})") from None


def load_model(path: str) -> LoadedModel:
    """Rebuild the model from an exported folder, checkpoint folder or run folder, on the CPU, in eval mode."""
    from resnet_ray.model import build_model

    folder, info = read_info(path)
    if os.path.isfile(os.path.join(folder, MODEL_INFO)):
        model_path = os.path.join(folder, MODEL)
        if not os.path.isfile(model_path) or _sha256(model_path) != info.get("sha256"):
            raise CheckpointError(f"{model_path}: missing or its SHA-256 differs from {MODEL_INFO}: refusing to load")
        weights = torch.load(model_path, map_location="cpu", weights_only=True)
    else:
        state, _ = load_training_state(folder)
        weights = model_weights(state)
    missing = [key for key in ("arch", "num_classes", "image_size", "mean", "std", "config") if key not in info]
    if missing:
        raise CheckpointError(f"{folder}: model metadata lacks {', '.join(missing)}")
    arch = ModelConfig(arch=info["arch"], weights="none")
    model = build_model(arch, info["num_classes"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: weights do not fit {info['arch']} with {info['num_classes']} classes: "
                              f"{str(exc).splitlines()[0]}") from None
    return LoadedModel(model.eval(), info, folder)


def checkpoint_config(path: str):
    """The resolved Config stored with a model, checkpoint or run folder."""
    return from_dict(read_info(path)[1]["config"])
