"""scikit-learn's embedded digits: the built-in source for smoke tests and examples (no file, no download)."""

from __future__ import annotations

import hashlib

import numpy as np

from resnet_ray.config import DataConfig
from resnet_ray.data.sources import RawDataset, RawSplit


def read_digits(cfg: DataConfig) -> RawDataset:
    """scikit-learn's embedded 8x8 digits (1,797 images, 0..16), upscaled to data.image_size (32 by
    default) RGB uint8."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = torch.nn.functional.interpolate(
        small, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
    )
    gray = big.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    labels = digits.target.astype(np.int64)
    checksum = hashlib.sha256(digits.images.tobytes() + labels.tobytes()).hexdigest()
    return RawDataset(
        splits={"train": RawSplit(images, labels)}, classes=[str(i) for i in range(10)], checksum=checksum
    )
