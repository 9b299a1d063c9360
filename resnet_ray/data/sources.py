"""What every source reader returns, and the helpers the readers share.

Each source kind has its reader module (:mod:`~resnet_ray.data.digits`, :mod:`~resnet_ray.data.cifar`,
:mod:`~resnet_ray.data.parquet`, :mod:`~resnet_ray.data.imagefolder`); each returns a :class:`RawDataset` of
in-memory uint8 arrays, which ``prepare`` turns into the prepared layout (:mod:`resnet_ray.data.layout`).
Readers validate what they read and raise :class:`~resnet_ray.data.layout.DataError` naming the file and row.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from resnet_ray.data.layout import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "test")  # the splits a user source may hold (val is always carved from train)


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


def fine_to_coarse_map(
    fine: np.ndarray, coarse: np.ndarray, num_fine: int, where: str, missing: str = "error"
) -> Optional[list]:
    """fine label -> coarse label, derived from the data; DataError if one fine label has two coarse labels.

    A fine label that never occurs has no coarse label: ``missing="error"`` raises DataError (CIFAR-100, whose
    every label occurs); ``"warn"`` logs a warning and returns None (user sources: fine_to_coarse left unset).
    """
    mapping: list[Optional[int]] = [None] * num_fine
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0) if len(fine) else np.zeros((0, 2), np.int64)
    for f, c in pairs.tolist():
        if mapping[f] is not None:
            raise DataError(f"{where}: fine label {f} maps to two coarse labels ({mapping[f]} and {c})")
        mapping[f] = c
    absent = [i for i, c in enumerate(mapping) if c is None]
    if not absent:
        return mapping
    if missing == "error":
        raise DataError(f"{where}: fine label(s) {absent[:10]} never occur, cannot derive their coarse label")
    log.warning("%s: some fine labels never occur; fine_to_coarse left unset", where)
    return None


# ---------------------------------------------------------------------------
# source files and their checksum (Parquet and image folders, read in memory or in shard tasks)


def read_file(fs, path: str) -> bytes:
    """The bytes of ``path`` inside the pyarrow filesystem ``fs``."""
    with fs.open_input_stream(path) as f:
        return f.readall()


def file_digest(rel: str, content: Optional[bytes], inner: Optional[bytes] = None) -> int:
    """One file's share of a source checksum: sha256(name, sha256(content)) as an integer (content None and no
    ``inner`` digest given: an unreadable file)."""
    name = rel.encode()
    if inner is None:
        inner = hashlib.sha256(content).digest() if content is not None else b"unreadable"
    return int.from_bytes(hashlib.sha256(len(name).to_bytes(8, "little") + name + inner).digest(), "big")


def combine_digests(total: int) -> str:
    """The checksum of a set of files: the sum of their file_digest mod 2**256, in hex. Order-free, so that
    parallel tasks can each add up their own files."""
    return f"{total % (1 << 256):064x}"
