"""What every source reader returns, and the helpers the readers share.

Each source kind has its reader module (:mod:`~resnet_ray.data.digits`, :mod:`~resnet_ray.data.cifar`,
:mod:`~resnet_ray.data.parquet`, :mod:`~resnet_ray.data.imagefolder`); each returns a :class:`RawDataset` of
in-memory uint8 arrays, which ``prepare`` turns into the prepared layout (:mod:`resnet_ray.data.layout`).
Readers validate what they read and raise :class:`~resnet_ray.data.layout.DataError` naming the file and row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import pyarrow.fs as pafs

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


# ---------------------------------------------------------------------------
# listing a source folder: links to folders are never followed, each real file is listed once


class Entry(NamedTuple):
    """One entry below a listed folder."""

    path: str  # inside the filesystem, as listed (a link's own path, not its target's)
    kind: str  # "file" | "dir" | "dir_link" (a link to a folder: listed, never entered)
    size: int  # bytes of the file (of its target for a link to a file); 0 for a folder or a broken link
    mtime_ns: int
    identity: tuple  # the real file: (device, inode) on a local disk (a link's target), else ("path", path)
    link: bool = False  # the entry is a symbolic link (to a file, a folder, or nowhere)


def walk(fs, root: str, hidden: tuple = ()) -> list[Entry]:
    """Every file and folder below ``root`` inside the pyarrow filesystem ``fs``, sorted by path.

    On a local disk a link to a folder is listed as ``dir_link`` and never entered, so that a listing can neither
    leave the source folder nor loop (a link to its own parent would otherwise list its images again and again,
    under other class names); a link to a file is listed with its target's size, time and identity, so that a
    caller can keep each real file once (:func:`unique_files`); a broken link is a file of size 0 that cannot
    be read. Object stores have no links. Names starting with one of ``hidden`` are neither listed nor entered.
    Raises OSError when a folder cannot be listed.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        entries = []
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            rel = info.path[len(root) :].lstrip("/")
            if hidden and any(part.startswith(hidden) for part in rel.split("/")):
                continue
            if info.type in (pafs.FileType.File, pafs.FileType.Directory):
                kind = "file" if info.type == pafs.FileType.File else "dir"
                mtime = (info.mtime_ns or 0) if kind == "file" else 0
                entries.append(Entry(info.path, kind, info.size or 0, mtime, ("path", info.path)))
        return sorted(entries)
    entries, folders = [], [root]
    while folders:
        with os.scandir(folders.pop()) as listing:
            for item in listing:
                if hidden and item.name.startswith(hidden):
                    continue
                entry = _local_entry(item)
                if entry is not None:
                    entries.append(entry)
                    if entry.kind == "dir":
                        folders.append(entry.path)
    return sorted(entries)


def _local_entry(item: os.DirEntry) -> Optional[Entry]:
    """A scandir entry as an Entry (None for sockets, devices, ...); a link's target stat'ed, never entered."""
    link = item.is_symlink()
    try:
        info = os.stat(item.path) if link else item.stat(follow_symlinks=False)
    except OSError:  # a broken link (or a file gone meanwhile): reading it will say why
        return Entry(item.path, "file", 0, 0, ("path", item.path), link)
    if stat.S_ISDIR(info.st_mode):
        return Entry(item.path, "dir_link" if link else "dir", 0, 0, (info.st_dev, info.st_ino), link)
    if stat.S_ISREG(info.st_mode):
        return Entry(item.path, "file", info.st_size, info.st_mtime_ns, (info.st_dev, info.st_ino), link)
    return None


def unique_files(files: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(each real file once, the other entries that stand for a file already kept): of several entries of one
    file (links to it, hard links), the one that is not a link is kept, else the first by path."""
    kept: dict = {}
    for entry in sorted(files, key=lambda e: (e.link, e.path)):
        kept.setdefault(entry.identity, entry)
    chosen = {id(e) for e in kept.values()}
    return sorted(kept.values()), [e for e in files if id(e) not in chosen]
