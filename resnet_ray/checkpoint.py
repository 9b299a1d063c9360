"""Training state <-> checkpoint folders, and the export of a checkpoint's model.

A training checkpoint folder holds ``state.pt`` (model, optimizer, epoch) and ``meta.json`` (resolved config,
class names, normalization, metrics history). :func:`export_model` writes an exported model folder: ``model.pt``
(a plain state_dict) and ``model.json`` (everything needed to use it, with the SHA-256 of model.pt). Reading,
verifying and loading a saved model (exported or a checkpoint, local or a URI) is :mod:`resnet_ray.saved_model`'s;
every weights file is loaded by :func:`resnet_ray.weights.load` (``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from resnet_ray import storage, weights
from resnet_ray.weights import unwrap_state_dict

STATE = "state.pt"
META = "meta.json"
MODEL = "model.pt"
MODEL_INFO = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint or exported model is missing, corrupt or does not fit."""


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
    except Exception as exc:
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})") from None
    try:
        state = weights.load(state_path)
    except weights.UnreadableWeights as exc:
        raise CheckpointError(f"{state_path}: corrupt checkpoint, {exc.reason}; refusing to load") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{state_path}: corrupt checkpoint, not a training state (no 'model' entry)")
    return state, meta


def export_model(checkpoint_folder: str, out_dir: str) -> str:
    """Write the checkpoint's model as a self-contained folder (state_dict + JSON metadata), atomically."""
    state, meta = load_training_state(checkpoint_folder)
    with storage.new_local_folder(out_dir) as tmp:
        torch.save(model_weights(state), os.path.join(tmp, MODEL))
        info = {
            key: meta[key]
            for key in (
                "arch",
                "num_classes",
                "classes",
                "coarse_classes",
                "fine_to_coarse",
                "image_size",
                "mean",
                "std",
                "dataset",
                "epoch",
                "metrics",
                "config",
            )
        }
        if meta.get("resize"):  # how new images reach the stored size (data/images.py); absent in older runs
            info["resize"] = meta["resize"]
        info["sha256"] = storage.file_sha256(os.path.join(tmp, MODEL))
        with open(os.path.join(tmp, MODEL_INFO), "w") as f:
            json.dump(info, f, indent=2)
    return out_dir


def export_checkpoint(checkpoint, out_dir: str) -> dict:
    """Export a ``ray.train.Checkpoint`` (local or on remote storage) to ``out_dir`` (local path or URI).

    Returns the checkpoint's metadata. On remote storage model.pt is uploaded before model.json, whose SHA-256
    makes a reader refuse a half-replaced pair.
    """
    with checkpoint.as_directory() as folder:
        try:  # the weights are loaded once, by export_model (which checks both files)
            with open(os.path.join(folder, META)) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{checkpoint.path}/{META}: missing or corrupt ({exc})") from None
        if not storage.is_uri(out_dir):
            export_model(folder, out_dir)
            return meta
        with tempfile.TemporaryDirectory() as tmp:
            local = export_model(folder, os.path.join(tmp, "model"))
            for name in (MODEL, MODEL_INFO):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes(storage.join(out_dir, name), f.read())
    return meta
