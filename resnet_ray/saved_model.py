"""A saved model, read and verified in one place: :class:`SavedModel`.

A saved model is an exported model folder (``model.pt``, a plain state_dict, and ``model.json``: classes,
normalization, resize, the SHA-256 of model.pt, the calibration ``temperature``, the resolved config), a training
checkpoint (``state.pt`` and ``meta.json``) or a run folder (its ``model/``), local or a URI. Evaluation,
calibration, prediction, serving and export open it with :meth:`SavedModel.read` or :meth:`SavedModel.verified`
and ask it for what they need; nothing else reads ``model.json``. Weights load through
:func:`resnet_ray.weights.load` (``weights_only=True``): a file whose pickle asks to run code is refused in one line
naming it, and no code in it runs.

Models on remote storage (URIs) are fetched file by file: an exported model's ``model.pt`` and ``model.json``
only, verified once per node and cached under ``<cache>/models/<sha256>/`` (``RESNET_RAY_CACHE``, default
``~/.cache/resnet_ray``); a training checkpoint's two files into a temporary folder that is deleted after use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from resnet_ray import storage, weights
from resnet_ray.checkpoint import META, MODEL, MODEL_INFO, STATE, CheckpointError, load_training_state, model_weights
from resnet_ray.config import Config
from resnet_ray.config_files import from_dict, parse_overrides, replace
from resnet_ray.images import ResizeSpec
from resnet_ray.model import build_model, saved_model_config
from resnet_ray.transforms import Preprocess

log = logging.getLogger(__name__)

REQUIRED = ("arch", "num_classes", "image_size", "mean", "std", "config")


@dataclass(frozen=True)
class SavedModel:
    """One saved model: where it is and what its metadata says (no weights held)."""

    folder: str  # the exported model's or checkpoint's folder (a run folder resolves to its model/); may be a URI
    info: dict  # model.json, or a training checkpoint's meta.json
    exported: bool  # model.json (True) or a training checkpoint (False)

    @classmethod
    def read(cls, path: str) -> SavedModel:
        """The saved model at ``path`` (exported, checkpoint or run folder; local or URI), without any weights."""
        folder, name = _locate(path)
        return cls(folder, _read_json(folder, name), name == MODEL_INFO)

    @classmethod
    def verified(cls, path: str) -> SavedModel:
        """Like :meth:`read`, after checking that a local exported model's weights are there and intact and its
        temperature valid: bad weights fail here, before any inference starts. A remote model is verified where it
        is used (:func:`fetch_model`, once per node), so that the driver's node downloads nothing."""
        saved = cls.read(path)
        if saved.exported:
            saved.temperature  # noqa: B018 - raises CheckpointError naming the field
            if not storage.is_uri(saved.folder):
                _state_dict(_verified_model_file(saved.folder, saved.info), mmap=True)  # the pickle, no tensor read
        return saved

    @property
    def num_classes(self) -> int:
        return self.info["num_classes"]

    @property
    def classes(self) -> list[str]:
        """The class names (their indices as names where a model has none)."""
        return list(self.info.get("classes") or [str(i) for i in range(self.num_classes)])

    @property
    def sha256(self) -> str:
        """The SHA-256 of the weights: model.json's for an exported model, else that of state.pt."""
        if self.info.get("sha256"):
            return self.info["sha256"]
        return storage.file_sha256(storage.join(self.folder, STATE))

    @property
    def temperature(self) -> float:
        """The calibration temperature (model.json's ``temperature``); 1 for models exported before temperature
        scaling existed. CheckpointError naming the field for a value that is not > 0."""
        return temperature_of(self.info, f"{self.folder}/{MODEL_INFO}")

    def resize(self, cfg: Config) -> ResizeSpec:
        """How new images reach the model's size: its training data's resize (model.json), or for older models
        the one ``cfg`` implies."""
        if self.info.get("resize"):
            return ResizeSpec.from_record(self.info["resize"], cfg.data.image_size)
        return ResizeSpec(cfg.data.image_size, cfg.data.resize)

    def preprocess(self, channels_last: bool = False) -> Preprocess:
        """The evaluation preprocessing the model was trained for: uint8 NHWC -> normalized float at its size."""
        info = self.info
        return Preprocess(info["image_size"], tuple(info["mean"]), tuple(info["std"]), channels_last=channels_last)

    def config(self, overrides=()) -> Config:
        """The resolved config saved with the model, with CLI-style dotted ``overrides``."""
        return replace(from_dict(self.info["config"]), parse_overrides(overrides))

    def store_calibration(self, record: dict) -> None:
        """model.json with ``temperature`` and ``calibration`` (resnet_ray.calibration's record, stamped), written
        atomically; model.pt and its SHA-256 are untouched."""
        info = {
            **self.info,
            "temperature": record["temperature"],
            "calibration": {**record, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        storage.write_text(storage.join(self.folder, MODEL_INFO), json.dumps(info, indent=2) + "\n")

    def load(self) -> torch.nn.Module:
        """The network on the CPU, in eval mode, with its weights (an exported model's SHA-256 checked)."""
        missing = [key for key in REQUIRED if key not in self.info]
        if missing:
            raise CheckpointError(f"{self.folder}: model metadata lacks {', '.join(missing)}")
        state = _exported_weights(self.folder, self.info) if self.exported else _checkpoint_weights(self.folder)
        with torch.device("meta"):  # no random init of weights that are replaced at once (~0.5 s on one core)
            model = build_model(saved_model_config(self.info), self.num_classes)  # the arch with its switches
        try:
            model.load_state_dict(state, assign=True)  # strict: no meta tensor is left
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.folder}: weights do not fit {self.info['arch']} with {self.num_classes} classes: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        return model.eval()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    info: dict  # model.json contents (or the equivalent from a training checkpoint)
    source: str  # the folder it came from (a URI for remote models)


def load_model(path: str) -> LoadedModel:
    """The network of an exported, checkpoint or run folder (local or URI) on the CPU, in eval mode, with its
    metadata."""
    saved = SavedModel.read(path)
    return LoadedModel(saved.load(), saved.info, saved.folder)


def temperature_of(info: dict, where: str = MODEL_INFO) -> float:
    """The calibration temperature stored in model.json's ``info`` (1 where absent); CheckpointError naming
    ``where`` for a value that is not a number > 0."""
    value = info.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise CheckpointError(f"{where}: temperature must be a number > 0, got {value!r}")
    return float(value)


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
    if not os.path.isfile(model_path) or storage.file_sha256(model_path) != info.get("sha256"):
        raise CheckpointError(f"{model_path}: missing or its SHA-256 differs from {MODEL_INFO}: refusing to load")
    return model_path


def _state_dict(path: str, mmap: bool = False) -> dict:
    """The state_dict in an exported model's model.pt; CheckpointError in one line naming the file for anything
    else (a pickle payload, a corrupt file, a file of other objects)."""
    try:
        state = weights.load(path, mmap=mmap)
    except weights.UnreadableWeights as exc:
        raise CheckpointError(f"{exc}; refusing to load") from None
    if not weights.is_state_dict(state):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of names to tensors); refusing to load")
    return state


def _exported_weights(folder: str, info: dict) -> dict:
    """An exported model's state_dict: SHA-256 checked here, or taken from this node's verified cache."""
    return _state_dict(_verified_model_file(folder, info))


def _checkpoint_weights(folder: str) -> dict:
    with _local_checkpoint(folder) as local:
        state, _ = load_training_state(local)
    return model_weights(state)
