"""The signal at initialization of several nets on one batch: what ``jobs/init_stats.py`` runs (no training, no
Ray). Each net is the config's model with ``model.*`` overrides (the paper's ideas as switches); the batch is
the first rows of the config's prepared train split (a random sample: prepare writes a seeded random order),
preprocessed as for evaluation, or N(0, 1) noise with ``noise``. Per net and conv layer:
:func:`resnet_ray.probes.signal_stats`. Writes ``signal.json`` and ``signal.png``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch

from resnet_ray import plots, storage
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import replace
from resnet_ray.model import build_model, normalization
from resnet_ray.probes import first_last_ratio, signal_stats
from resnet_ray.transforms import Preprocess

log = logging.getLogger(__name__)

# the comparison of the "why" issue: vanishing under Xavier without BN, exploding towards the input with BN but no
# shortcuts (Philipp et al. 2018, Yang et al. 2019), and shortcuts taming it
DEFAULT_NETS = (
    "plain-56 no-BN xavier:model.arch=plain56,model.norm=none,model.init=xavier",
    "plain-56 no-BN he:model.arch=plain56,model.norm=none,model.init=he",
    "plain-56 BN he:model.arch=plain56",
    "resnet-56 BN he:model.arch=resnet56",
)


def parse_net(text: str) -> tuple[str, dict]:
    """``"LABEL:model.arch=plain56,model.init=xavier"`` -> (label, {"model.arch": "plain56", ...}); only model.*
    fields (ConfigError naming the net otherwise)."""
    label, sep, spec = text.partition(":")
    if not sep or not label.strip():
        raise ConfigError(f"--net {text!r}: expected LABEL:model.field=value[,model.field=value...]")
    overrides = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("model."):
            raise ConfigError(f"--net {text!r}: {item!r} is not model.field=value")
        overrides[key] = value
    return label.strip(), overrides


NOISE_CLASSES = 10


def signal_batch(cfg: Config, rows: int, noise: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(images (rows, 3, S, S) float, labels (rows,), the number of classes, what they are) for the probe."""
    size = cfg.model.image_size
    if noise:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(rows, 3, size, size, generator=g)
        labels = torch.randint(0, NOISE_CLASSES, (rows,), generator=g)
        return images, labels, NOISE_CLASSES, f"{rows} images of N(0, 1) noise, random labels"
    from resnet_ray.data.load import read_split
    from resnet_ray.data.prepare import ensure_prepared

    prepared, meta = ensure_prepared(cfg.data)
    batch = next(read_split(cfg.data, "train", prepared))
    mean, std = normalization(cfg.model, meta)
    images = Preprocess(size, mean, std)(torch.tensor(batch["image"][:rows]))
    labels = torch.tensor(batch["label"][:rows]).long()
    return images, labels, len(meta["classes"]), f"the first {len(labels)} training images of {meta['name']}"


def init_signal(cfg: Config, nets: list[str], output: str, rows: int = 64, noise: bool = False, seed: int = 0) -> dict:
    """signal.json's dict (``batch``: what was fed; ``nets``: label, overrides and the first/last ratios; ``rows``:
    one row per net and conv layer), written with signal.png into ``output`` (local path or URI)."""
    parsed = [parse_net(text) for text in nets]
    # every net checked before any runs; at initialization: no pretrained weights
    configs = [(label, replace(cfg, {"model.weights": "none", **overrides})) for label, overrides in parsed]
    images, labels, num_classes, what = signal_batch(cfg, rows, noise, seed)
    table, summary = [], []
    for (label, overrides), (_, net_cfg) in zip(parsed, configs):
        torch.manual_seed(seed)
        model = build_model(net_cfg.model, num_classes)
        stats = signal_stats(model, images, labels)
        table += [{"net": label, **row} for row in stats]
        summary.append(
            {
                "net": label,
                "overrides": overrides,
                "layers": len(stats),
                "activation_grad_first_last": first_last_ratio(stats),
                "weight_grad_first_last": first_last_ratio(stats, "weight_grad_norm"),
            }
        )
        log.info("%s: activation-gradient norm first/last layer %.3g", label, summary[-1]["activation_grad_first_last"])
    result = {"batch": what, "seed": seed, "nets": summary, "rows": table}
    with tempfile.TemporaryDirectory(prefix="resnet_ray-signal-") as tmp:
        with open(os.path.join(tmp, "signal.json"), "w") as f:
            json.dump(result, f, indent=2)
        plots.write_signal_plot(table, os.path.join(tmp, "signal.png"))
        storage.upload_dir(tmp, output)
    return {**result, "output": output}
