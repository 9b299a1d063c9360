"""Batch inference callable for ``Dataset.map_batches``: one model per actor, the evaluation preprocessing, the
model's calibration temperature, optional flip test-time augmentation. Shared by evaluation, prediction and
serving."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import numpy as np
import torch

from resnet_ray.config import TTA_MODES, EvalConfig
from resnet_ray.lesion import lesioned
from resnet_ray.loop import autocast
from resnet_ray.resources import ActorPool
from resnet_ray.saved_model import SavedModel
from resnet_ray.watchdog import watched

log = logging.getLogger(__name__)

TOPK = 5


class Predictor:
    """Loads the model once per actor (GPU when the actor has one) and predicts uint8 image batches.

    ``threads``: torch intra-op threads of this actor (default: $OMP_NUM_THREADS, which Ray sets to the
    actor's CPUs, else 1). ``k``: how many of the most probable classes to return (at most C);
    ``probabilities``: also return their probabilities. ``calibrated``: probabilities of ``softmax(scores / T)``
    with the temperature T of the model's model.json (Guo et al. 2017; 1 for models without one), else of
    ``softmax(scores)``. ``tta``: "none", or "flip": the scores are the log of the mean softmax over the image and
    its horizontal mirror (one forward pass of both, on the device). ``logits``: also return the scores (float32,
    N x C) that the probabilities come from, before the temperature.

    The classes are ranked by the scores themselves, so the temperature never changes pred or top5: calibrated
    and raw predictions differ in their probabilities only.

    Input: a batch with ``image`` (N, H, W, 3) uint8 at the stored size; every other column (row_id, label,
    coarse_label, path, ...) is passed through. Output columns added per row: pred, confidence (top-1
    probability), top5 (the k most probable classes, most probable first), with ``probabilities`` top_probs
    (their probabilities), with ``logits`` logits; with ``lesions`` (lists of block names, resnet_ray.lesion)
    lesion_pred: (N, len(lesions)) top-1 with each list's residual branches removed.
    """

    def __init__(
        self,
        model_path: str,
        amp: bool = True,
        threads: Optional[int] = None,
        k: int = TOPK,
        probabilities: bool = False,
        calibrated: bool = True,
        tta: str = "none",
        logits: bool = False,
        lesions: Optional[list[list[str]]] = None,
    ):
        if tta not in TTA_MODES:
            raise ValueError(f"eval.tta: {tta!r} is not one of {', '.join(TTA_MODES)}")
        torch.set_num_threads(threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        saved = SavedModel.read(model_path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        self.model = saved.load().to(self.device)  # a URI: fetched once per node into the model cache
        if on_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.preprocess = saved.preprocess(channels_last=on_gpu)
        self.amp_dtype = torch.bfloat16 if on_gpu and amp else None
        self.k = min(k, saved.num_classes)
        self.probabilities = probabilities
        self.model_temperature = saved.temperature
        self.temperature = self.model_temperature if calibrated else 1.0
        self.tta = tta
        self.logits = logits
        self.lesions = lesions or []

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 scores of a uint8 NHWC batch on the device: the logits, or with flip TTA the log of the
        mean softmax of the image and its mirror (a log-probability: softmax of it is that mean)."""
        x = self.preprocess(images)
        if self.tta == "flip":
            x = torch.cat([x, x.flip(dims=[3])])  # NCHW: the width axis
        with autocast(self.device, self.amp_dtype):
            out = self.model(x)
        out = out.float()
        if self.tta == "flip":
            n = len(images)
            views = torch.stack([out[:n].log_softmax(dim=1), out[n:].log_softmax(dim=1)])
            out = torch.logsumexp(views, dim=0) - math.log(2.0)
        return out

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(batch["image"]).to(self.device, non_blocking=True)
        scores = self.scores(images)
        probs = (scores / self.temperature).softmax(dim=1)
        top = scores.topk(self.k, dim=1).indices  # the ranking of the scores: the same at any temperature
        values = probs.gather(1, top).cpu().numpy().astype(np.float64)
        indices = top.cpu().numpy().astype(np.int64)
        out = {key: value for key, value in batch.items() if key != "image"}
        out.update(pred=indices[:, 0], confidence=values[:, 0], top5=indices)
        if self.probabilities:
            out["top_probs"] = values
        if self.logits:
            out["logits"] = scores.cpu().numpy()
        if self.lesions:
            out["lesion_pred"] = np.stack([self._lesioned_top1(images, names) for names in self.lesions], axis=1)
        return out

    def _lesioned_top1(self, images: torch.Tensor, names: list[str]) -> np.ndarray:
        with lesioned(self.model, names):
            return self.scores(images).argmax(dim=1).cpu().numpy().astype(np.int64)


def on_actor_pool(rows, predictor: type, kwargs: dict, cfg: EvalConfig, pool: ActorPool, what: str):
    """Prediction batches of ``rows`` (a Ray Data dataset) from a pool of ``predictor`` actors (a Predictor class,
    built with ``kwargs`` and the pool's threads), as they arrive; StallError when none arrives for
    eval.stall_timeout_s (actors or reads that cannot start)."""
    import ray.data

    predictions = rows.map_batches(
        predictor,
        fn_constructor_kwargs={**kwargs, "threads": pool.threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_gpus=cfg.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
    )
    log.debug("%s: %d actor(s) x %d thread(s)", what, pool.actors, pool.threads)
    return watched(
        predictions.iter_batches(batch_size=None, batch_format="numpy"),
        cfg.stall_timeout_s,
        what,
        "eval.stall_timeout_s",
    )
