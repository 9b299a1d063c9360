"""Batch inference callable for ``Dataset.map_batches``: one model per actor, the evaluation preprocessing."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from resnet_ray.checkpoint import load_model
from resnet_ray.loop import autocast
from resnet_ray.transforms import Preprocess

TOPK = 5


class Predictor:
    """Loads the model once per actor (GPU when the actor has one) and predicts uint8 image batches.

    ``threads``: torch intra-op threads of this actor (default: $OMP_NUM_THREADS, which Ray sets to the
    actor's CPUs, else 1). ``k``: how many of the most probable classes to return (at most C);
    ``probabilities``: also return their softmax probabilities.

    Input: a batch with ``image`` (N, H, W, 3) uint8 at the stored size; every other column (row_id, label,
    coarse_label, path, ...) is passed through. Output columns added per row: pred, confidence (top-1 softmax
    probability), top5 (the k most probable classes, most probable first) and, with ``probabilities``,
    top_probs (their probabilities).
    """

    def __init__(
        self,
        model_path: str,
        amp: bool = True,
        threads: Optional[int] = None,
        k: int = TOPK,
        probabilities: bool = False,
    ):
        torch.set_num_threads(threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        loaded = load_model(model_path)  # a URI: fetched once per node into the model cache
        info = loaded.info
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        self.model = loaded.model.to(self.device)
        if on_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.preprocess = Preprocess(info["image_size"], tuple(info["mean"]), tuple(info["std"]), channels_last=on_gpu)
        self.amp_dtype = torch.bfloat16 if on_gpu and amp else None
        self.k = min(k, info["num_classes"])
        self.probabilities = probabilities

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(batch["image"]).to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(self.preprocess(images))
        probs = logits.float().softmax(dim=1)
        top = probs.topk(self.k, dim=1)
        values = top.values.cpu().numpy().astype(np.float64)
        out = {key: value for key, value in batch.items() if key != "image"}
        out.update(
            pred=top.indices[:, 0].cpu().numpy().astype(np.int64),
            confidence=values[:, 0],
            top5=top.indices.cpu().numpy().astype(np.int64),
        )
        if self.probabilities:
            out["top_probs"] = values
        return out
