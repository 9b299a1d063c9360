"""The image-folder source: ``<path>/{train,test}/<class>/<image>`` or ``<path>/<class>/<image>``, local or URI.

:func:`list_imagefolder` reads names only (what the driver holds); :func:`read_imagefolder` also reads and
decodes every image into memory, while ``prepare`` streams the files instead (:mod:`resnet_ray.data.writer`) to
the same dataset. Images are decoded with :func:`resnet_ray.data.layout.decode_batch` (any size and mode ->
``data.image_size`` RGB by the ``data.resize`` policy); an undecodable image raises
:class:`~resnet_ray.data.layout.DataError` naming the file under ``data.on_bad_image: error`` and is left out,
listed in ``RawDataset.bad_images``, under ``skip``.

Links: a link to a folder is never followed (it could lead out of the source or into a loop, multiplying and
relabelling images); a link to a file is read by its target, and each real file is listed once, under its real
name where that is inside the source (see ``_walk``).
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.layout import DataError, decode_batch, resize_for
from resnet_ray.data.sources import (
    SPLIT_NAMES,
    RawDataset,
    RawSplit,
    combine_digests,
    file_digest,
    read_file,
    unique_files,
    walk,
)
from resnet_ray.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass
class ImageFolderListing:
    """The files of an image-folder source, by name only: what the driver holds while preparing it."""

    fs: object  # pyarrow filesystem of the source
    root: str  # the source folder inside fs
    splits: dict  # split -> (file paths inside fs, np.ndarray int64 labels), files sorted by class, then name
    classes: list
    source: str = ""  # data.path as given (a local path or a URI)

    def display(self, path: str) -> str:
        """A file as messages name it: its local path, or its URI for a remote source."""
        return storage.display(self.source, path)

    def rel(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")


def _walk(cfg: DataConfig, fs, root: str) -> tuple[set, list]:
    """(folders, image files) below root, relative to it; hidden files and folders skipped.

    Links to folders are never followed (:func:`resnet_ray.data.sources.walk`): one directly below the source or a
    split folder (a class or split folder that is a link) is refused, one deeper inside a class folder is left
    out with a warning. A link to a file is read by its target, and each real file is listed once: where a file
    is reached by several names (a link to an image of another class, a hard link), its real name (the one that
    is not a link) wins, else the first by path, and the others are left out with a warning.
    """
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"image folder {cfg.path}: not a folder")
    try:
        entries = walk(fs, root, hidden=(".",))
    except OSError as exc:
        raise DataError(f"image folder {cfg.path}: cannot list ({exc})") from None
    dirs, files, links = set(), [], []
    for entry in entries:
        rel = entry.path[len(root) :].lstrip("/")
        if entry.kind == "dir":
            dirs.add(rel)
        elif entry.kind == "dir_link":
            links.append(rel)
        elif rel.lower().endswith(IMAGE_EXTENSIONS):
            files.append(entry)
    _check_folder_links(cfg, root, dirs, links)
    files, again = unique_files(files)
    if again:
        log.warning(
            "image folder %s: %d image(s) are other names (links) of images already listed, e.g. %s: each image is "
            "read once, under its real name",
            cfg.path,
            len(again),
            again[0].path[len(root) :].lstrip("/"),
        )
    return dirs, [e.path[len(root) :].lstrip("/") for e in files]


def _check_folder_links(cfg: DataConfig, root: str, dirs: set, links: list) -> None:
    """Refuse a class or split folder that is a link to a folder; warn of the links inside class folders."""
    split_level = "train" in dirs
    for rel in links:
        parts = rel.split("/")
        if len(parts) == 1 or (split_level and len(parts) == 2 and parts[0] in SPLIT_NAMES):
            raise DataError(
                f"image folder {cfg.path}: {posixpath.join(root, rel)} is a link to a folder "
                f"({os.path.realpath(posixpath.join(root, rel))}); links to folders are never followed (they can "
                "lead out of the source or into a loop): copy or move the folder in, or point data.path at it"
            )
    if links:
        log.warning(
            "image folder %s: not following %d link(s) to folders inside class folders, e.g. %s (links to folders "
            "can lead out of the source or into a loop; images are listed where they are)",
            cfg.path,
            len(links),
            links[0],
        )


def _class_dirs(dirs: set, prefix: str) -> list:
    """The sorted names of the folders directly below ``prefix`` (a split's folder, "" for the root)."""
    return sorted(
        d[len(prefix) :] for d in dirs if d.startswith(prefix) and d[len(prefix) :] and "/" not in d[len(prefix) :]
    )


def list_imagefolder(cfg: DataConfig) -> ImageFolderListing:
    """cfg.path/{train,test}/<class>/<image> or cfg.path/<class>/<image> (then all of it is train); local or URI.

    Images at any depth below a class folder count; hidden files and folders are skipped; links to folders are
    never followed and each real file is listed once (see _walk). Only names are read.
    """
    fs, root = storage.resolve(cfg.path)
    root = root.rstrip("/") or "/"
    dirs, files = _walk(cfg, fs, root)
    if "train" in dirs:
        prefixes = {s: s + "/" for s in SPLIT_NAMES if s in dirs}
    else:
        if "test" in dirs:
            log.warning("image folder %s has test/ but no train/: treating 'test' as a class folder", root)
        prefixes = {"train": ""}

    def folder(prefix: str, name: str = "") -> str:
        return posixpath.join(root, prefix, name).rstrip("/")

    classes = _class_dirs(dirs, prefixes["train"])
    if not classes:
        raise DataError(f"image folder {folder(prefixes['train'])}: no class subfolders")
    by_class: dict = {}
    for rel in files:
        for split, prefix in prefixes.items():
            if rel.startswith(prefix):
                name = rel[len(prefix) :].split("/", 1)
                if len(name) == 2:
                    by_class.setdefault((split, name[0]), []).append(rel)
    splits = {}
    for split, prefix in prefixes.items():
        names = _class_dirs(dirs, prefix)
        if names != classes:
            extra, missing = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
            raise DataError(
                f"image folder {folder(prefix)}: class folders differ from the train split's"
                + (f"; extra: {', '.join(extra)}" if extra else "")
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(by_class.get((split, name), []))
            if not found:
                raise DataError(f"image folder {folder(prefix, name)}: empty class folder (no image files)")
            paths += [posixpath.join(root, rel) for rel in found]
            labels += [label] * len(found)
        splits[split] = (paths, np.asarray(labels, dtype=np.int64))
    return ImageFolderListing(fs, root, splits, classes, cfg.path)


def read_imagefolder(cfg: DataConfig) -> RawDataset:
    """An image folder (see list_imagefolder) read and decoded into memory. ``prepare`` streams it instead
    (resnet_ray.data.writer); both give the same images, labels and checksum."""
    listing = list_imagefolder(cfg)
    splits, bad_images, total = {}, [], 0
    for split, (paths, labels) in listing.splits.items():
        contents = []
        for path in paths:
            try:
                contents.append(read_file(listing.fs, path))
            except OSError as exc:
                raise DataError(f"{listing.display(path)}: cannot read ({exc})") from None
            total += file_digest(listing.rel(path), contents[-1])
        decoded = decode_batch(
            contents, resize_for(cfg), cfg.on_bad_image, lambda i, ps=paths: listing.display(ps[i]), threads=True
        )
        del contents
        splits[split] = RawSplit(images=decoded.good_images(), labels=labels[decoded.kept])
        bad_images += decoded.bad_images(split)
    return RawDataset(splits=splits, classes=listing.classes, checksum=combine_digests(total), bad_images=bad_images)
