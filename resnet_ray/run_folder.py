"""A training run's folder (local path or URI): its name, config copies, history files and resume.

``<storage_path>/<train.name>/`` holds config.yaml (the config it trains with now), config-<hash>.yaml (the copy
each history row names), history.jsonl / history.csv (one row per epoch, written by rank 0), Ray Train's
checkpoints and its ``checkpoint_manager_snapshot.json``, ``model/`` (the exported best model) and ``eval-<split>/``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time

from resnet_ray import storage
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import from_dict, load_config, to_dict, to_yaml


def run_dir_of(cfg: Config) -> str:
    return storage.join(cfg.train.storage_path, cfg.train.name)


def with_run_name(cfg: Config) -> Config:
    """Give the run a name (so it can be resumed) when the config has none."""
    if cfg.train.name:
        return cfg
    tree = to_dict(cfg)
    tree["train"]["name"] = f"{cfg.data.dataset_name}-{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return from_dict(tree)


# what a resumed run cannot change: the weights and the data it was trained on would no longer fit
RESUME_FIXED = (
    "model.arch",
    "model.image_size",
    "model.shortcut",  # plain vs residual: the same weights, another network
    "model.block",
    "model.preact",
    "model.norm",
    "data.source",
    "data.path",
    "data.name",
    "data.image_size",
    "data.resize",
    "data.on_bad_image",
    "data.classes",
    "data.val_fraction",
    "data.test_fraction",
    "data.seed",
    "data.limit",
)


def config_for_resume(run_dir: str, overrides=()) -> Config:
    """The config saved in a run folder, pointed back at that folder, with optional overrides.

    Overrides of the schedule, optimizer, workers or epochs apply from the resumed epoch on; an override of a
    field in RESUME_FIXED is refused (ConfigError naming it).
    """
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    with storage.local_file(path, suffix=".yaml") as local:
        saved = load_config(local)
        cfg = load_config(local, overrides)
    new = to_dict(cfg)
    for key in RESUME_FIXED:
        section, name = key.split(".")
        trained = _trained_value(saved, section, name)
        if trained != _trained_value(cfg, section, name):
            raise ConfigError(
                f"{key}: a resumed run keeps {trained!r} (it was trained with it); start a new run to change it"
            )
    new["train"].update(zip(("storage_path", "name"), storage.split(run_dir)))
    return from_dict(new)


def _trained_value(cfg: Config, section: str, name: str):
    """A field's value as the run trains with it (a null model switch is the architecture's own)."""
    return getattr(cfg.model.resolved() if section == "model" else getattr(cfg, section), name)


def write_history(run_dir: str, history: list) -> None:
    """history.jsonl and history.csv in the run folder (the CSV's columns: every key any epoch has)."""
    storage.write_text(storage.join(run_dir, "history.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(key for h in history for key in h)))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(run_dir, "history.csv"), out.getvalue())


def config_file(cfg: Config) -> str:
    """Name of the run folder's copy of ``cfg`` that history rows point at: config-<hash of its YAML>.yaml."""
    return f"config-{hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:8]}.yaml"


def write_config(run_dir: str, cfg: Config) -> None:
    """config.yaml (the config the run trains with now) and config-<hash>.yaml, the copy that the history rows
    of the epochs trained with it name (a resumed run with overrides adds a second one)."""
    text = to_yaml(cfg)
    for name in ("config.yaml", config_file(cfg)):
        storage.write_text(storage.join(run_dir, name), text)


def read_history(run_dir: str) -> list:
    """The run's history.jsonl (written by rank 0 after every epoch) as a list of per-epoch metric dicts."""
    return [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, "history.jsonl")).splitlines()]


def latest_checkpoint_epoch(run_dir: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for the run (0: none yet), read from its
    checkpoint manager's snapshot in the run folder (Ray is pinned)."""
    try:
        latest = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return 0
    return int(((latest.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


def interrupted_run(run_dir: str, command: str) -> str:
    """What a run stopped by a person has kept, and the command that continues it."""
    if not storage.exists(storage.join(run_dir, "config.yaml")):
        return "nothing was kept: the run had not started training; run the same command again"
    epoch = latest_checkpoint_epoch(run_dir)
    kept = f"kept the checkpoint of epoch {epoch}" if epoch else "no epoch checkpointed yet (it starts at epoch 1)"
    return f"{kept} in {run_dir}; continue with: {command}"


def default_output(model_path: str, name: str) -> str:
    """``<run>/<name>`` for a run's exported model (``<run>/model``), else ``<model folder>/<name>``: where the
    inference jobs write by default."""
    location = storage.normalize(model_path).rstrip("/")
    parent = location.rsplit("/", 1)[0] if location.endswith("/model") else location
    return storage.join(parent, name)
