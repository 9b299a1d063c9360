"""Training state <-> checkpoint folders, and the self-contained exported model.

A training checkpoint folder holds ``state.pt`` (model, optimizer, epoch) and ``meta.json``
(resolved config, class names, normalization, metrics history). An exported model folder holds
``model.pt`` (a plain state_dict) and ``model.json`` (everything needed to use it, with the
SHA-256 of model.pt, checked before loading, and the calibration ``temperature``: 1 where absent). Everything
loads with ``weights_only=True``: a file whose pickle asks to run code is refused in one line naming it, and no
code in it runs (:func:`load_weights`).

Models on remote storage (URIs) are fetched file by file: an exported model's ``model.pt`` and ``model.json``
only, verified once per node and cached under ``<cache>/models/<sha256>/`` (``RESNET_RAY_CACHE``, default
``~/.cache/resnet_ray``); a training checkpoint's two files into a temporary folder that is deleted after use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from resnet_ray import storage
from resnet_ray.config import from_dict

log = logging.getLogger(__name__)

STATE = "state.pt"
META = "meta.json"
MODEL = "model.pt"
MODEL_INFO = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint or exported model is missing, corrupt or does not fit."""


def _sha256(path: str) -> str:
    return storage.file_sha256(path)


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


def load_weights(path: str, mmap: bool = False) -> dict:
    """The state_dict (name -> tensor) in a weights file, loaded with weights_only=True, so that no code in it can
    run; CheckpointError in one line naming the file for anything else (a pickle payload, a corrupt file, a file
    of other objects). ``mmap``: map the tensors instead of reading them (a cheap check of the pickle)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old (not zip) file: read it whole
    except Exception as exc:
        raise CheckpointError(f"{path}: {refusal(exc)}; refusing to load") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of names to tensors); refusing to load")
    return state


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
    except Exception as exc:
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{state_path}: corrupt checkpoint, {refusal(exc)}; refusing to load") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{state_path}: corrupt checkpoint, not a training state (no 'model' entry)")
    return state, meta


def export_model(checkpoint_folder: str, out_dir: str) -> str:
    """Write the checkpoint's model as a self-contained folder (state_dict + JSON metadata), atomically."""
    state, meta = load_training_state(checkpoint_folder)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder like any other (mkdtemp's 0700 would hide it from other users)
    try:
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


def export_checkpoint(checkpoint, out_dir: str) -> dict:
    """Export a ``ray.train.Checkpoint`` (local or on remote storage) to ``out_dir`` (local path or URI).

    Returns the checkpoint's metadata. On remote storage model.pt is uploaded before model.json, whose SHA-256
    makes a reader refuse a half-replaced pair.
    """
    with checkpoint.as_directory() as folder:
        meta = _read_json(folder, META)  # the weights are loaded once, by export_model (which checks both files)
        if not storage.is_uri(out_dir):
            export_model(folder, out_dir)
            return meta
        with tempfile.TemporaryDirectory() as tmp:
            local = export_model(folder, os.path.join(tmp, "model"))
            for name in (MODEL, MODEL_INFO):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes(storage.join(out_dir, name), f.read())
    return meta


@dataclass
class LoadedModel:
    model: torch.nn.Module
    info: dict  # model.json contents (or the equivalent from a training checkpoint)
    source: str  # the folder it came from (a URI for remote models)


def _locate(path: str) -> tuple[str, str]:
    """(folder, its metadata file: MODEL_INFO or META) of an exported model, a training checkpoint or a run
    folder (-> its model/); local or URI."""
    path = storage.normalize(path).rstrip("/")
    for candidate in (path, storage.join(path, "model")):
        for name in (MODEL_INFO, STATE):
            if storage.exists(storage.join(candidate, name)):
                return candidate, MODEL_INFO if name == MODEL_INFO else META
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such model folder, checkpoint or run folder")
    raise CheckpointError(
        f"{path}: neither an exported model ({MODEL_INFO}), a training checkpoint ({STATE}) "
        f"nor a run folder with model/"
    )


def _read_json(folder: str, name: str) -> dict:
    try:
        return storage.read_json(storage.join(folder, name))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/{name}: missing or corrupt ({exc})") from None


def read_info(path: str) -> tuple[str, dict]:
    """(folder, metadata) of an exported model, checkpoint or run folder (local or URI), without any weights."""
    folder, name = _locate(path)
    return folder, _read_json(folder, name)


def model_cache() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("RESNET_RAY_CACHE", "~/.cache/resnet_ray")), "models")


def _sweep_dead_fetches(cache: str) -> None:
    """Remove the temporary folders of fetches whose process is gone (killed mid-download: an actor stopped at
    the end of its job). They are named ``.fetch-<pid>-*``; only this node's processes write this cache."""
    for name in os.listdir(cache):
        parts = name.split("-")
        if name.startswith(".fetch-") and len(parts) >= 3 and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


def fetch_model(folder: str, info: dict) -> str:
    """Local folder with the exported model ``folder`` (a URI): this node's cached copy, fetched if missing.

    Only model.pt and model.json are downloaded, into a temporary folder beside the cache entry; model.pt's
    SHA-256 is checked against model.json, then the folder is renamed to ``<cache>/models/<sha256>``. A
    complete entry is never fetched or hashed again; of two processes fetching at once, one rename wins. The
    temporary folders of fetches killed midway are removed by the next fetch on the node.
    """
    sha = str(info.get("sha256") or "")
    if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
        raise CheckpointError(f"{folder}/{MODEL_INFO}: no valid sha256 ({sha!r}); export the model again")
    target = os.path.join(model_cache(), sha)
    os.makedirs(model_cache(), exist_ok=True)
    _sweep_dead_fetches(model_cache())
    if os.path.isfile(os.path.join(target, MODEL_INFO)):
        return target
    tmp = tempfile.mkdtemp(prefix=f".fetch-{os.getpid()}-", dir=model_cache())
    try:
        if storage.download(storage.join(folder, MODEL), os.path.join(tmp, MODEL)) != sha:
            raise CheckpointError(f"{folder}/{MODEL}: its SHA-256 differs from {MODEL_INFO}: refusing to load")
        with open(os.path.join(tmp, MODEL_INFO), "w") as f:
            json.dump(info, f, indent=2)
        try:
            os.rename(tmp, target)
            log.info("fetched %s into %s", folder, target)
        except OSError:  # another process of this node was faster
            if not os.path.isfile(os.path.join(target, MODEL_INFO)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _local_checkpoint(folder: str) -> Iterator[str]:
    """A training checkpoint folder on this machine: itself, or its two files in a temporary folder."""
    if not storage.is_uri(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="resnet_ray-") as tmp:
        for name in (STATE, META):
            storage.download(storage.join(folder, name), os.path.join(tmp, name))
        yield tmp


def _verified_model_file(folder: str, info: dict) -> str:
    """Local path of an exported model's model.pt, its SHA-256 checked here or by this node's cache."""
    if storage.is_uri(folder):
        return os.path.join(fetch_model(folder, info), MODEL)
    model_path = os.path.join(folder, MODEL)
    if not os.path.isfile(model_path) or _sha256(model_path) != info.get("sha256"):
        raise CheckpointError(f"{model_path}: missing or its SHA-256 differs from {MODEL_INFO}: refusing to load")
    return model_path


def temperature_of(info: dict, where: str = MODEL_INFO) -> float:
    """The calibration temperature stored with a model (model.json's ``temperature``); 1 for models exported
    before temperature scaling existed. CheckpointError naming the field for a value that is not > 0."""
    value = info.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise CheckpointError(f"{where}: temperature must be a number > 0, got {value!r}")
    return float(value)


def verify_model(path: str) -> tuple[str, dict]:
    """(folder, metadata) like read_info, after checking that a local exported model's weights are there and
    intact: bad weights fail here, before any inference starts. A remote model is verified where it is used
    (fetch_model, once per node), so that the driver's node downloads nothing."""
    folder, name = _locate(path)
    info = _read_json(folder, name)
    if name == MODEL_INFO:
        temperature_of(info, f"{folder}/{MODEL_INFO}")
        if not storage.is_uri(folder):
            load_weights(_verified_model_file(folder, info), mmap=True)  # the pickle checked, no tensor read
    return folder, info


def _exported_weights(folder: str, info: dict) -> dict:
    """An exported model's state_dict: SHA-256 checked here, or taken from this node's verified cache."""
    return load_weights(_verified_model_file(folder, info))


def _checkpoint_weights(folder: str) -> dict:
    with _local_checkpoint(folder) as local:
        state, _ = load_training_state(local)
    return model_weights(state)


def load_model(path: str) -> LoadedModel:
    """Rebuild the model from an exported, checkpoint or run folder (local or URI) on the CPU, in eval mode."""
    from resnet_ray.model import build_model, saved_model_config

    folder, name = _locate(path)
    info = _read_json(folder, name)
    weights = _exported_weights(folder, info) if name == MODEL_INFO else _checkpoint_weights(folder)
    missing = [key for key in ("arch", "num_classes", "image_size", "mean", "std", "config") if key not in info]
    if missing:
        raise CheckpointError(f"{folder}: model metadata lacks {', '.join(missing)}")
    with torch.device("meta"):  # no random init of weights that are replaced at once (~0.5 s on one core)
        model = build_model(saved_model_config(info), info["num_classes"])  # the arch with its switches
    try:
        model.load_state_dict(weights, assign=True)  # strict: no meta tensor is left
    except RuntimeError as exc:
        raise CheckpointError(
            f"{folder}: weights do not fit {info['arch']} with {info['num_classes']} classes: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return LoadedModel(model.eval(), info, folder)


def checkpoint_config(path: str):
    """The resolved Config stored with a model, checkpoint or run folder (local or URI)."""
    return from_dict(read_info(path)[1]["config"])
