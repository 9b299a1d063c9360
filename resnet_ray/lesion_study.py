"""The lesion study of a trained net (Veit, Wilber & Belongie 2016, arXiv 1605.06431, sec. 4, Figs. 3 and 5a) and
its layer responses (He et al. 2016a, sec. 4.2, Fig. 7): what ``jobs/lesion.py`` runs.

On the evaluation's inference (a Ray Data actor pool, or the job's own process on a local instance: the
Predictor with ``lesions``), every batch of a prepared split is predicted by the whole net and by the net with
(a) each removable block's residual branch removed, one at a time, and (b) ``k`` random non-downsampling blocks
removed, ``draws`` seeded draws for every k. Every row is counted exactly once for every configuration. The layer
responses are the std of each 3x3 layer's response on the split's first ``RESPONSE_ROWS`` rows (a random sample:
prepare writes a split in a seeded random order). Writes ``lesion.json``, ``lesion.png`` and ``responses.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from itertools import combinations
from typing import Optional

import numpy as np
import torch

from resnet_ray import console, plots, storage
from resnet_ray.checkpoint import CheckpointError
from resnet_ray.config import Config
from resnet_ray.data.layout import split_rows
from resnet_ray.data.load import read_split
from resnet_ray.data.prepare import ensure_prepared
from resnet_ray.evaluate import EvaluationError, check_model_fits, prediction_batches
from resnet_ray.lesion import BlockInfo, blocks
from resnet_ray.metrics import RowCoverage
from resnet_ray.probes import layer_responses
from resnet_ray.run_folder import default_output
from resnet_ray.saved_model import SavedModel

log = logging.getLogger(__name__)

RESPONSE_ROWS = 256


def random_sets(listed: list[BlockInfo], draws: int, seed: int) -> list[tuple[int, list[str]]]:
    """(k, block names) for k = 1 .. every removable non-downsampling block: ``draws`` distinct seeded draws of k
    of them (all the sets where there are fewer)."""
    pool = [b.name for b in listed if b.removable and not b.downsampling]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, len(pool) + 1):
        if math.comb(len(pool), k) <= draws:
            chosen = [list(c) for c in combinations(pool, k)]
        else:
            seen: set = set()
            chosen = []
            while len(chosen) < draws:
                names = tuple(sorted(rng.choice(len(pool), size=k, replace=False)))
                if names not in seen:
                    seen.add(names)
                    chosen.append([pool[i] for i in names])
        out += [(k, names) for names in chosen]
    return out


def _responses(saved: SavedModel, model: torch.nn.Module, cfg: Config, split: str, prepared: str) -> Optional[list]:
    """The layer responses on the split's first RESPONSE_ROWS rows, or None for a net that has none defined."""
    from resnet_ray.cifar_resnet import CifarResNet

    if not isinstance(model, CifarResNet):
        return None
    batch = next(read_split(cfg.data, split, prepared))
    images = saved.preprocess()(torch.tensor(batch["image"][:RESPONSE_ROWS]))
    return layer_responses(model, images)


def lesion_study(
    cfg: Config, model_path: str, split: str = "test", output: Optional[str] = None, draws: int = 5, seed: int = 0
) -> dict:
    """Run the study on ``model_path`` (exported, checkpoint or run folder) over a prepared split of ``cfg.data``;
    returns lesion.json's dict with ``output`` added."""
    saved = SavedModel.verified(model_path)
    prepared, meta = ensure_prepared(cfg.data)
    check_model_fits(saved, meta, model_path)
    model = saved.load()
    listed = blocks(model)
    if not listed:
        raise CheckpointError(f"{model_path}: {saved.info['arch']} has no residual or plain blocks to remove")
    singles = [b for b in listed if b.removable]
    drawn = random_sets(listed, draws, seed)
    configurations = [[b.name] for b in singles] + [names for _, names in drawn]
    expected = split_rows(meta, split, cfg.data.limit)
    output = output or default_output(model_path, f"lesion-{split}")
    log.info(
        "lesion study of %s on %s: %d configurations x %d rows", saved.folder, split, len(configurations), expected
    )
    coverage = RowCoverage(expected, EvaluationError, "row", "split")
    baseline, correct = 0, np.zeros(len(configurations), dtype=np.int64)
    options = {"tta": "none", "calibrated": False, "lesions": configurations}
    with console.progress_bar(f"lesions of {split}", console.logging_console()) as (begin, advance):
        stream = prediction_batches(cfg, model_path, split, prepared, meta, expected, options)
        begin(expected)
        for batch in stream:
            coverage.add(batch["row_id"])
            labels = batch["label"]
            baseline += int((batch["pred"] == labels).sum())
            correct += (batch["lesion_pred"] == labels[:, None]).sum(axis=0)
            advance(len(labels))
    coverage.finish()
    accuracy = dict(zip(range(len(configurations)), (correct / expected).tolist()))
    single = {b.name: accuracy[i] for i, b in enumerate(singles)}
    random_k = []
    for k in sorted({k for k, _ in drawn}):
        values = [accuracy[len(singles) + i] for i, (kk, _) in enumerate(drawn) if kk == k]
        random_k.append({"k": k, "mean": float(np.mean(values)), "std": float(np.std(values)), "draws": len(values)})
    study = {
        "arch": saved.info["arch"],
        "model": saved.folder,
        "split": split,
        "rows": expected,
        "baseline_accuracy": baseline / expected,
        "chance": 1.0 / saved.num_classes,
        "draws": draws,
        "seed": seed,
        "blocks": [
            {"block": b.name, "downsampling": b.downsampling, "removable": b.removable, "accuracy": single.get(b.name)}
            for b in listed
        ],
        "random_k": random_k,
        "responses": _responses(saved, model, cfg, split, prepared),
    }
    with tempfile.TemporaryDirectory(prefix="resnet_ray-lesion-") as tmp:
        with open(os.path.join(tmp, "lesion.json"), "w") as f:
            json.dump(study, f, indent=2)
        plots.write_lesion_plot(study, os.path.join(tmp, "lesion.png"))
        if study["responses"]:
            plots.write_responses_plot(
                [{"net": saved.info["arch"], "responses": study["responses"]}], os.path.join(tmp, "responses.png")
            )
        storage.upload_dir(tmp, output)
    return {**study, "output": output}
