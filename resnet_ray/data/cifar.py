"""CIFAR-10 / CIFAR-100 readers for the official "python version" archives.

``cfg.path`` may be

* the ``.tar.gz`` archive itself,
* an extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or a folder holding one,
* ``None`` or a folder without either: the official archive is then looked up in / downloaded to
  ``cfg.path`` or ``~/.cache/resnet_ray/downloads`` (``cfg.download``).

The batches are pickles, so nothing is unpickled before its bytes are verified: an archive must match
``cfg.md5`` (or the official MD5), and every file of an extracted folder must match torchvision's
official per-file MD5. Archive members are read from memory; nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np

from resnet_ray.config import DataConfig
from resnet_ray.data.layout import DataError
from resnet_ray.data.sources import RawDataset, RawSplit, fine_to_coarse_map

log = logging.getLogger(__name__)

DOWNLOAD_DIR = "~/.cache/resnet_ray/downloads"
CIFAR_SIZE = 32


@dataclass(frozen=True)
class _Release:
    """An official CIFAR release: where to get it and the MD5 of its archive and of every file in it."""

    name: str
    url: str
    filename: str  # archive file name
    archive_md5: str
    base_folder: str  # folder inside the archive
    files: dict  # member file name -> official md5
    train: tuple  # member names of the train split, in order
    test: tuple
    meta_file: str  # member name of the pickle that holds the class names


def _release(name: str) -> _Release:
    from torchvision.datasets import CIFAR10, CIFAR100

    ds = CIFAR10 if name == "cifar10" else CIFAR100
    files = {f: md5 for f, md5 in ds.train_list + ds.test_list}
    files[ds.meta["filename"]] = ds.meta["md5"]
    return _Release(
        name=name,
        url=ds.url,
        filename=ds.filename,
        archive_md5=ds.tgz_md5,
        base_folder=ds.base_folder,
        files=files,
        train=tuple(f for f, _ in ds.train_list),
        test=tuple(f for f, _ in ds.test_list),
        meta_file=ds.meta["filename"],
    )


# ---------------------------------------------------------------------------
# locating and verifying the bytes


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _read_archive(path: str, expected_md5: str, release: _Release) -> tuple[dict, str]:
    """Read the archive into memory, verify its MD5, then return {member name: bytes} of the needed files."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{release.name} archive {path}: cannot read ({exc})") from None
    actual = _md5(data)
    if actual != expected_md5.lower():
        raise DataError(
            f"{release.name} archive {path}: MD5 {actual} does not match the expected {expected_md5} "
            f"(data.md5 or the official checksum); the file is corrupt, incomplete or not the "
            f"official {release.filename}"
        )
    wanted = set(release.files)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
                if not member.isfile() or len(parts) != 2 or parts[0] != release.base_folder:
                    continue
                if parts[1] in wanted and parts[1] not in found:
                    found[parts[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{release.name} archive {path}: not a readable tar.gz archive ({exc})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{release.name} archive {path}: missing {', '.join(release.base_folder + '/' + m for m in missing)}"
        )
    return found, actual


def _read_folder(folder: str, release: _Release) -> tuple[dict, str]:
    """Read every needed file of an extracted folder and verify it against the official per-file MD5."""
    found: dict[str, bytes] = {}
    for name, official in release.files.items():
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{release.name} folder {folder}: missing file {name}") from None
        except OSError as exc:
            raise DataError(f"{release.name} file {path}: cannot read ({exc})") from None
        actual = _md5(data)
        if actual != official:
            raise DataError(
                f"{release.name} file {path}: MD5 {actual} does not match the official {official}; "
                f"re-extract the official {release.filename}"
            )
        found[name] = data
    digest = hashlib.sha256()
    for name in sorted(release.files):
        digest.update(f"{name}:{release.files[name]}\n".encode())
    return found, digest.hexdigest()


def _is_extracted(folder: str, release: _Release) -> bool:
    return os.path.isfile(os.path.join(folder, release.meta_file))


def _download(release: _Release, folder: str, md5: str) -> str:
    from torchvision.datasets.utils import download_url

    os.makedirs(folder, exist_ok=True)
    log.info("downloading %s into %s", release.url, folder)
    try:
        download_url(release.url, root=folder, filename=release.filename, md5=md5)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"{release.name}: could not download {release.url} ({type(exc).__name__}: {exc}); "
            f"put {release.filename} into {folder} or set data.path to the archive or extracted folder, "
            f"without network access"
        ) from None
    path = os.path.join(folder, release.filename)
    if not os.path.isfile(path):
        raise DataError(f"{release.name}: download of {release.url} left no file at {path}")
    return path


def _load_bytes(cfg: DataConfig, release: _Release) -> tuple[dict, str]:
    """Find the source named by cfg.path (or the download cache), verify it and return its files' bytes."""
    expected = cfg.md5 or release.archive_md5
    path = os.path.abspath(os.path.expanduser(cfg.path)) if cfg.path else None
    if path and os.path.isfile(path):
        return _read_archive(path, expected, release)
    if path and os.path.isdir(path):
        for folder in (path, os.path.join(path, release.base_folder)):
            if _is_extracted(folder, release):
                if cfg.md5:
                    log.warning(
                        "data.md5 applies to archives only; checking %s against the official per-file MD5s", folder
                    )
                return _read_folder(folder, release)
        download_dir = path
    elif path:
        if path.endswith((".tar.gz", ".tgz")) or not cfg.download:
            raise DataError(
                f"{release.name}: data.path {cfg.path} does not exist; it must be the {release.filename} "
                f"archive, its extracted {release.base_folder} folder, or a folder holding either"
            )
        download_dir = path
    else:
        download_dir = os.path.expanduser(DOWNLOAD_DIR)
    archive = os.path.join(download_dir, release.filename)
    if os.path.isfile(archive):
        return _read_archive(archive, expected, release)
    if not cfg.download:
        raise DataError(
            f"{release.name}: no archive found and data.download is false; put the official "
            f"{release.filename} ({release.url}) at {archive}, or set data.path to the archive or to its "
            f"extracted {release.base_folder} folder"
        )
    return _read_archive(_download(release, download_dir, expected), expected, release)


# ---------------------------------------------------------------------------
# decoding the (verified) pickles


def _str(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(name: str, data: bytes, release: _Release) -> dict:
    """Only ever called on bytes whose checksum was verified. Keys come back as str (official python2
    pickles loaded with latin1) or bytes (python3 pickles of b'' keys); both are normalised to str."""
    try:
        obj = pickle.loads(data, encoding="latin1")
    except Exception as exc:
        raise DataError(f"{release.name} {release.base_folder}/{name}: cannot unpickle ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{release.name} {release.base_folder}/{name}: expected a dict, got {type(obj).__name__}")
    return {_str(k): v for k, v in obj.items()}


def _field(d: dict, key: str, name: str, release: _Release):
    if key not in d:
        raise DataError(f"{release.name} {release.base_folder}/{name}: no {key!r} entry (has {', '.join(sorted(d))})")
    return d[key]


def _batch(name: str, data: bytes, release: _Release, label_keys: tuple) -> tuple[np.ndarray, list]:
    d = _unpickle(name, data, release)
    where = f"{release.name} {release.base_folder}/{name}"
    pixels = np.asarray(_field(d, "data", name, release))
    if pixels.ndim != 2 or pixels.shape[1] != 3 * CIFAR_SIZE * CIFAR_SIZE or pixels.dtype != np.uint8:
        raise DataError(f"{where}: 'data' is {pixels.dtype} {pixels.shape}, expected uint8 (N, 3072)")
    images = np.ascontiguousarray(pixels.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1))
    labels = []
    for key in label_keys:
        values = np.asarray(_field(d, key, name, release))
        if values.ndim != 1 or len(values) != len(images) or not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{where}: {key!r} holds {values.dtype} {values.shape}, expected {len(images)} integers")
        labels.append(values.astype(np.int64))
    return images, labels


def _names(names_dict: dict, key: str, release: _Release) -> list:
    values = _field(names_dict, key, release.meta_file, release)
    return [_str(v) for v in values]


def _check_labels(labels: np.ndarray, n: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if len(bad):
        raise DataError(f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {n})")


def _read(cfg: DataConfig, name: str, label_keys: tuple) -> tuple[dict, dict, str, _Release]:
    if cfg.image_size != CIFAR_SIZE:
        raise DataError(
            f"{name}: images are {CIFAR_SIZE}x{CIFAR_SIZE}; set data.image_size={CIFAR_SIZE} "
            f"(got {cfg.image_size}); resizing happens in the model (model.image_size)"
        )
    release = _release(name)
    files, checksum = _load_bytes(cfg, release)  # raises before any unpickling if a checksum is wrong
    names_dict = _unpickle(release.meta_file, files[release.meta_file], release)
    splits = {}
    for split, members in (("train", release.train), ("test", release.test)):
        parts = [_batch(m, files[m], release, label_keys) for m in members]
        images = np.concatenate([p[0] for p in parts])
        labels = [np.concatenate([p[1][i] for p in parts]) for i in range(len(label_keys))]
        splits[split] = (images, labels)
    return splits, names_dict, checksum, release


def read_cifar10(cfg: DataConfig) -> RawDataset:
    splits, names_dict, checksum, release = _read(cfg, "cifar10", ("labels",))
    classes = _names(names_dict, "label_names", release)
    out = {}
    for split, (images, (labels,)) in splits.items():
        _check_labels(labels, len(classes), f"cifar10 {split} split")
        out[split] = RawSplit(images, labels)
    return RawDataset(splits=out, classes=classes, checksum=checksum)


def read_cifar100(cfg: DataConfig) -> RawDataset:
    splits, names_dict, checksum, release = _read(cfg, "cifar100", ("fine_labels", "coarse_labels"))
    classes = _names(names_dict, "fine_label_names", release)
    coarse_classes = _names(names_dict, "coarse_label_names", release)
    out = {}
    for split, (images, (fine, coarse)) in splits.items():
        _check_labels(fine, len(classes), f"cifar100 {split} split")
        _check_labels(coarse, len(coarse_classes), f"cifar100 {split} split (coarse labels)")
        out[split] = RawSplit(images, fine, coarse_labels=coarse)
    fine_all = np.concatenate([s.labels for s in out.values()])
    coarse_all = np.concatenate([s.coarse_labels for s in out.values()])
    mapping = fine_to_coarse_map(fine_all, coarse_all, len(classes), "cifar100", missing="error")
    return RawDataset(
        splits=out, classes=classes, checksum=checksum, coarse_classes=coarse_classes, fine_to_coarse=mapping
    )
