"""Readers that turn each supported source into in-memory uint8 arrays.

Every reader returns a :class:`RawDataset`; ``prepare`` turns it into the canonical Parquet layout.
Readers validate what they read and raise :class:`DataError` naming the file and row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from resnet_ray.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file and row."""


@dataclass
class RawSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    coarse_labels: Optional[np.ndarray] = None  # (N,) int64 where the source has superclasses


@dataclass
class RawDataset:
    splits: dict  # split name ("train", "test") -> RawSplit; "test" may be missing
    classes: list  # class names, index = label
    checksum: str  # identity of the source bytes (sha256 or md5 of the files read)
    coarse_classes: Optional[list] = None
    fine_to_coarse: Optional[list] = None  # fine label -> coarse label
    bad_images: list = field(default_factory=list)  # on_bad_image=skip: [{"split" (of the source), "file", "reason"}]


def check_split(split: RawSplit, num_classes: int, where: str, image_size: int) -> None:
    """Shape, dtype and label-range checks shared by every reader; names the first bad row."""
    images, labels = split.images, split.labels
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise DataError(f"{where}: images have shape {images.shape[1:]}, expected ({image_size}, {image_size}, 3)")
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got {images.dtype}")
    if len(labels) != len(images):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {num_classes})")


def read_digits(cfg: DataConfig) -> RawDataset:
    """scikit-learn's embedded 8x8 digits (1,797 images, 0..16), upscaled to 32x32 RGB uint8. No download."""
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


def _lazy(module: str, fn: str) -> Callable[[DataConfig], RawDataset]:
    def reader(cfg: DataConfig) -> RawDataset:
        import importlib

        return getattr(importlib.import_module(module), fn)(cfg)

    return reader


READERS: dict[str, Callable[[DataConfig], RawDataset]] = {
    "digits": read_digits,
    "cifar10": _lazy("resnet_ray.data.cifar", "read_cifar10"),
    "cifar100": _lazy("resnet_ray.data.cifar", "read_cifar100"),
    "parquet": _lazy("resnet_ray.data.files", "read_parquet_source"),
    "imagefolder": _lazy("resnet_ray.data.files", "read_imagefolder"),
}


def read_source(cfg: DataConfig) -> RawDataset:
    """Read and validate cfg.source; every split is checked before anything is written."""
    raw = READERS[cfg.source](cfg)
    for name, split in raw.splits.items():
        check_split(split, len(raw.classes), f"{cfg.source} {name} split", cfg.image_size)
        if split.coarse_labels is not None and raw.coarse_classes is not None:
            check_split(
                RawSplit(split.images, split.coarse_labels),
                len(raw.coarse_classes),
                f"{cfg.source} {name} split (coarse labels)",
                cfg.image_size,
            )
    return raw
