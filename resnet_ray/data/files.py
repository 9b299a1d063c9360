"""Readers for user data: Parquet folders (local or any pyarrow filesystem URI) and image folders.

Both decode every image with :mod:`resnet_ray.data.images` (any size and mode -> ``data.image_size`` RGB by the
``data.resize`` policy). A bad record raises :class:`DataError` naming the file and row; an undecodable image
does so under ``data.on_bad_image: error`` and is left out, listed in ``RawDataset.bad_images``, under ``skip``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.images import IMAGE_EXTENSIONS, BadImage, ResizeSpec, decode
from resnet_ray.data.sources import DataError, RawDataset, RawSplit

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "test")
CLASSES_FILE = "classes.json"
# 32x32 decodes are dominated by Python overhead and get slower with threads (GIL contention);
# bigger images (stored or encoded) spend their time in C with the GIL released, so threads pay off there.
_THREADED_MIN_SIZE = 96
_THREADED_MIN_BYTES = 16384  # mean encoded size from which photos are decoded on threads
_CHUNK = 256


# ---------------------------------------------------------------------------
# decoding


def _decode_into(
    out: np.ndarray, start: int, blobs: Sequence, where: Callable[[int], str], spec: ResizeSpec, skip: bool
) -> list[tuple[int, str]]:
    """Decode blobs into out[start:...]; returns [(index, reason)] of the bad ones (raises unless skip)."""
    bad = []
    for offset, blob in enumerate(blobs):
        i = start + offset
        try:
            if blob is None:
                raise BadImage("image is null")
            out[i] = decode(blob, spec)
        except BadImage as exc:
            if not skip:
                raise DataError(f"{where(i)}: {exc}") from None
            bad.append((i, str(exc)))
    return bad


def decode_images(
    blobs: Sequence, spec: ResizeSpec, where: Callable[[int], str], on_bad_image: str = "error"
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode encoded images into (N', S, S, 3) uint8; ``where(i)`` names item i in messages.

    Returns (images of the good items in order, indices of those items, [{"file": where(i), "reason": ...}] of
    the bad ones). ``on_bad_image="error"`` raises DataError at the first bad item (in order) instead.
    Chunks run on a thread pool for large images.
    """
    n = len(blobs)
    out = np.empty((n, spec.size, spec.size, 3), dtype=np.uint8)
    sample = blobs[:64]
    large = spec.size >= _THREADED_MIN_SIZE or (
        len(sample) and sum(len(b or b"") for b in sample) / len(sample) >= _THREADED_MIN_BYTES
    )
    workers = min(8, os.cpu_count() or 1) if large else 1
    starts = list(range(0, n, _CHUNK))
    skip = on_bad_image == "skip"
    if workers <= 1 or len(starts) <= 1:
        bad = _decode_into(out, 0, blobs, where, spec, skip)
    else:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_decode_into, out, s, blobs[s : s + _CHUNK], where, spec, skip) for s in starts]
            bad = [item for future in futures for item in future.result()]  # in order: the earliest error wins
    if not bad:
        return out, np.arange(n), []
    keep = np.setdiff1d(np.arange(n), [i for i, _ in bad])
    return out[keep], keep, [{"file": where(i), "reason": reason} for i, reason in bad]


def resize_spec(cfg: DataConfig) -> ResizeSpec:
    return ResizeSpec(cfg.image_size, cfg.resize)


# ---------------------------------------------------------------------------
# class names


def _parse_classes(text: bytes, where: str, keys: Sequence[str], required: bool) -> Optional[list]:
    """A JSON list of names, or an object holding one under one of ``keys``; None if absent and not required."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(value, dict):
        key = next((k for k in keys if k in value), None)
        if key is None:
            if required:
                raise DataError(
                    f"{where}: expected a JSON list of class names, or an object with one of "
                    f"{', '.join(keys)}; got keys {', '.join(map(str, value))}"
                )
            return None
        value = value[key]
    elif not required:  # a bare list names the fine classes only
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: expected a non-empty JSON list of class-name strings")
    return value


FINE_KEYS = ("classes", "label_names", "names", "class_names", "fine_label_names")
COARSE_KEYS = ("coarse_classes", "coarse_label_names", "coarse_names")


def fine_to_coarse_map(fine: np.ndarray, coarse: np.ndarray, num_fine: int, where: str) -> Optional[list]:
    """fine label -> coarse label derived from the data; DataError if one fine label has two coarse labels;
    None (with a warning) if some fine label never occurs."""
    mapping: list = [None] * num_fine
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0) if len(fine) else np.zeros((0, 2), np.int64)
    for f, c in pairs.tolist():
        if mapping[f] is not None:
            raise DataError(f"{where}: fine label {f} maps to two coarse labels ({mapping[f]} and {c})")
        mapping[f] = c
    if any(c is None for c in mapping):
        log.warning("%s: some fine labels never occur; fine_to_coarse left unset", where)
        return None
    return mapping


# ---------------------------------------------------------------------------
# Parquet


def _split_of(rel: str) -> Optional[str]:
    """train.parquet, train-*.parquet (any depth) or train/*.parquet -> "train"; likewise test."""
    parts = rel.split("/")
    name = parts[-1]
    if not name.endswith(".parquet") or any(p.startswith((".", "_")) for p in parts):
        return None
    for split in SPLIT_NAMES:
        if name == f"{split}.parquet" or fnmatch.fnmatchcase(name, f"{split}-*.parquet"):
            return split
    if len(parts) >= 2 and parts[-2] in SPLIT_NAMES:
        return parts[-2]
    return None


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as exc:
            raise DataError(f"parquet source {path}: cannot open filesystem ({exc})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _read_bytes(fs, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except Exception as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _column_values(table, column: str, file: str, kind: str):
    if column not in table.column_names:
        raise DataError(f"{file}: no {kind} column {column!r}; columns: {', '.join(table.column_names)}")
    return table.column(column).combine_chunks()


def _first_null(arr) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _int_labels(table, column: str, file: str, kind: str) -> np.ndarray:
    import pyarrow as pa

    arr = _column_values(table, column, file, kind)
    if not pa.types.is_integer(arr.type):
        raise DataError(f"{file}: {kind} column {column!r} has type {arr.type}, expected integers")
    if arr.null_count:
        raise DataError(f"{file}: row {_first_null(arr)}: {kind} is null")
    labels = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero(labels < 0)
    if len(bad):
        raise DataError(f"{file}: row {bad[0]}: {kind} {labels[bad[0]]} is negative")
    return labels


def _check_range(labels: np.ndarray, n: int, owners: Sequence[tuple], kind: str, what: str) -> None:
    """Label range check that names the file and row; owners = [(file, the file's row numbers kept), ...] in
    order (rows of skipped images are not among them)."""
    bad = np.flatnonzero(labels >= n)
    if not len(bad):
        return
    row = int(bad[0])
    for file, rows in owners:
        if row < len(rows):
            raise DataError(f"{file}: row {rows[row]}: {kind} {labels[bad[0]]} is outside [0, {n}) ({what})")
        row -= len(rows)


def _find_classes_file(fs, base: str, files: Sequence[str]) -> Optional[str]:
    """classes.json beside the first train file or in a folder above it, up to the source folder."""
    import pyarrow.fs as pafs

    folder = posixpath.dirname(files[0])
    candidates = []
    while True:
        candidates.append(posixpath.join(folder, CLASSES_FILE))
        if folder == base or len(folder) <= len(base) or folder in ("", "/"):
            break
        folder = posixpath.dirname(folder)
    for info in fs.get_file_info(candidates):
        if info.type == pafs.FileType.File:
            return info.path
    return None


@dataclass
class ParquetListing:
    """A Parquet source without its images: files, row-group sizes, labels and classes (what the driver holds)."""

    fs: object
    base: str  # the source folder inside fs
    files: dict  # split -> [(path inside fs, [rows of each row group])], in path order
    labels: dict  # split -> int64 labels of all rows, in file order
    coarse: dict  # split -> int64 coarse labels, or None
    classes: list
    coarse_classes: Optional[list] = None
    fine_to_coarse: Optional[list] = None
    scheme: Optional[str] = None

    def display(self, path: str) -> str:
        return f"{self.scheme}://{path}" if self.scheme else path

    def rel(self, path: str) -> str:
        return path[len(self.base) :].lstrip("/")


def _source_files(cfg: DataConfig, fs, base: str) -> tuple[str, dict]:
    """(folder, {split: sorted Parquet files}) of a Parquet source: one file (the train split) or a folder."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"parquet source {cfg.path}: not found")
    if info.type == pafs.FileType.File:  # a single file is the train split
        return posixpath.dirname(base), {"train": [base]}
    by_split = {s: [] for s in SPLIT_NAMES}
    others = []
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        rel = item.path[len(base) :].lstrip("/")
        split = _split_of(rel)
        if split:
            by_split[split].append(item.path)
        elif rel.endswith(".parquet"):
            others.append(rel)
    if others:
        log.warning(
            "parquet source %s: ignoring %d file(s) of no train/test split, e.g. %s", cfg.path, len(others), others[0]
        )
    if not by_split["train"]:
        raise DataError(
            f"parquet source {cfg.path}: no train split found; expected train.parquet, "
            f"train-*.parquet or train/*.parquet below it"
            + (f" (found only {', '.join(others[:5])})" if others else "")
        )
    return base, {s: sorted(f) for s, f in by_split.items() if f}


def _check_image_column(schema, column: str, file: str) -> None:
    import pyarrow as pa

    kind = schema.field(column).type
    if pa.types.is_struct(kind):
        if kind.get_field_index("bytes") < 0:
            raise DataError(f"{file}: image column {column!r} is a struct without a 'bytes' field ({kind})")
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(
            f"{file}: image column {column!r} has type {schema.field(column).type}, expected encoded "
            f"image bytes (binary, or a struct with a 'bytes' field)"
        )


def list_parquet(cfg: DataConfig) -> ParquetListing:
    """Parquet files per split under cfg.path (local folder, file:// or any pyarrow filesystem URI):
    train.parquet / train-*.parquet (any depth, the Hugging Face layout) / train/*.parquet, likewise test.
    Reads the footers and the label columns only, and checks every file's columns and labels.
    Class names: cfg.classes, else classes.json beside or above the train files (a list, or an object with
    "classes"/"label_names"), else str(i) up to the largest label."""
    import pyarrow.parquet as pq

    fs, base = _filesystem(cfg.path)
    base, by_split = _source_files(cfg, fs, base.rstrip("/") or "/")
    coarse_col = cfg.coarse_label_column
    columns = [cfg.image_column, cfg.label_column] + ([coarse_col] if coarse_col else [])
    files, labels, coarse, owners = {}, {}, {}, {}
    for split, paths in by_split.items():
        files[split], split_labels, split_coarse, owners[split] = [], [], [], []
        for path in paths:
            try:
                with fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    names, meta = pf.schema_arrow.names, pf.metadata
                    missing = [c for c in columns if c not in names]
                    if missing:
                        raise DataError(
                            f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns: {', '.join(names)}"
                        )
                    _check_image_column(pf.schema_arrow, cfg.image_column, path)
                    table = pf.read(columns=columns[1:])
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            split_labels.append(_int_labels(table, cfg.label_column, path, "label"))
            if coarse_col:
                split_coarse.append(_int_labels(table, coarse_col, path, "coarse label"))
            files[split].append((path, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
            owners[split].append((path, np.arange(table.num_rows)))
        labels[split] = np.concatenate(split_labels)
        coarse[split] = np.concatenate(split_coarse) if coarse_col else None
    if not len(labels["train"]):
        raise DataError(f"parquet source {cfg.path}: the train split has no rows ({', '.join(by_split['train'])})")

    classes_doc = None
    if cfg.classes:
        classes, classes_from = list(cfg.classes), "data.classes"
    else:
        found = _find_classes_file(fs, base, by_split["train"])
        if found:
            classes_doc = (_read_bytes(fs, found), found)
            classes, classes_from = _parse_classes(classes_doc[0], found, FINE_KEYS, True), found
        else:
            top = max(int(values.max()) for values in labels.values() if len(values))
            classes, classes_from = [str(i) for i in range(top + 1)], "max label"
    for split in labels:
        _check_range(labels[split], len(classes), owners[split], "label", f"{len(classes)} classes from {classes_from}")

    coarse_classes = fine_to_coarse = None
    if coarse_col:
        if classes_doc is not None:
            coarse_classes = _parse_classes(classes_doc[0], classes_doc[1], COARSE_KEYS, False)
        if coarse_classes is None:
            top = max(int(values.max()) for values in coarse.values() if len(values))
            coarse_classes = [str(i) for i in range(top + 1)]
        for split in coarse:
            _check_range(
                coarse[split],
                len(coarse_classes),
                owners[split],
                "coarse label",
                f"{len(coarse_classes)} coarse classes",
            )
        fine_to_coarse = fine_to_coarse_map(
            np.concatenate(list(labels.values())),
            np.concatenate(list(coarse.values())),
            len(classes),
            f"parquet source {cfg.path}",
        )
    scheme = cfg.path.split("://", 1)[0] if storage.is_uri(cfg.path) else None
    return ParquetListing(fs, base, files, labels, coarse, classes, coarse_classes, fine_to_coarse, scheme)


def image_blobs(column) -> list:
    """An image column (binary, or a struct with 'bytes') -> list of bytes, None where the image is null."""
    import pyarrow as pa

    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_struct(array.type):
        nulls = array.is_null().to_pylist()
        return [None if null else blob for null, blob in zip(nulls, array.field("bytes").to_pylist())]
    return array.to_pylist()


def read_parquet_source(cfg: DataConfig) -> RawDataset:
    """A Parquet source (see list_parquet) read and decoded into memory; checksum: combine_digests of every
    file. ``prepare`` streams it instead (resnet_ray.data.shards) to the same dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listing = list_parquet(cfg)
    spec = resize_spec(cfg)
    splits, bad_images, total = {}, [], 0
    for split, files in listing.files.items():
        images, kept_rows, offset = [], [], 0
        for path, _groups in files:
            content = _read_bytes(listing.fs, path)
            total += file_digest(listing.rel(path), content)
            blobs = image_blobs(
                pq.read_table(pa.BufferReader(content), columns=[cfg.image_column]).column(cfg.image_column)
            )
            del content
            decoded, kept, bad = decode_images(
                blobs, spec, lambda i, p=path: f"{listing.display(p)}: row {i}", cfg.on_bad_image
            )
            images.append(decoded)
            kept_rows.append(offset + kept)
            offset += len(blobs)
            bad_images += [{"split": split, **b} for b in bad]
        keep = np.concatenate(kept_rows)
        coarse = listing.coarse[split]
        splits[split] = RawSplit(
            images=np.concatenate(images) if len(images) > 1 else images[0],
            labels=listing.labels[split][keep],
            coarse_labels=None if coarse is None else coarse[keep],
        )
    return RawDataset(
        splits=splits,
        classes=listing.classes,
        checksum=combine_digests(total),
        coarse_classes=listing.coarse_classes,
        fine_to_coarse=listing.fine_to_coarse,
        bad_images=bad_images,
    )


# ---------------------------------------------------------------------------
# image folders


@dataclass
class ImageFolderListing:
    """The files of an image-folder source, by name only: what the driver holds while preparing it."""

    fs: object  # pyarrow filesystem of the source
    root: str  # the source folder inside fs
    splits: dict  # split -> (file paths inside fs, np.ndarray int64 labels), files sorted by class, then name
    classes: list
    scheme: Optional[str] = None  # the source URI's scheme (s3, gs, file, ...); None for a local path

    def display(self, path: str) -> str:
        """A file as messages name it: its local path, or its URI for a remote source."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def rel(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")


def list_imagefolder(cfg: DataConfig) -> ImageFolderListing:
    """cfg.path/{train,test}/<class>/<image> or cfg.path/<class>/<image> (then all of it is train); local or URI.

    Images at any depth below a class folder count; hidden files and folders are skipped. Only names are read.
    """
    fs, root = storage.resolve(cfg.path)
    root = root.rstrip("/") or "/"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"image folder {cfg.path}: not a folder")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataError(f"image folder {cfg.path}: cannot list ({exc})") from None
    dirs, files = set(), []
    for info in infos:
        rel = info.path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if info.type == pafs.FileType.Directory:
            dirs.add(rel)
        elif info.type == pafs.FileType.File and rel.lower().endswith(IMAGE_EXTENSIONS):
            files.append(rel)
    if "train" in dirs:
        prefixes = {s: s + "/" for s in SPLIT_NAMES if s in dirs}
    else:
        if "test" in dirs:
            log.warning("image folder %s has test/ but no train/: treating 'test' as a class folder", root)
        prefixes = {"train": ""}

    def class_dirs(prefix: str) -> list:
        return sorted(
            d[len(prefix) :] for d in dirs if d.startswith(prefix) and d[len(prefix) :] and "/" not in d[len(prefix) :]
        )

    def folder(prefix: str, name: str = "") -> str:
        return posixpath.join(root, prefix, name).rstrip("/")

    classes = class_dirs(prefixes["train"])
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
        names = class_dirs(prefix)
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
    scheme = cfg.path.split("://", 1)[0] if storage.is_uri(cfg.path) else None
    return ImageFolderListing(fs, root, splits, classes, scheme)


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


def read_file(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.readall()


def read_imagefolder(cfg: DataConfig) -> RawDataset:
    """An image folder (see list_imagefolder) read and decoded into memory. ``prepare`` streams it instead
    (resnet_ray.data.shards); both give the same images, labels and checksum."""
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
        images, kept, bad = decode_images(
            contents, resize_spec(cfg), lambda i, ps=paths: listing.display(ps[i]), cfg.on_bad_image
        )
        del contents
        splits[split] = RawSplit(images=images, labels=labels[kept])
        bad_images += [{"split": split, **b} for b in bad]
    return RawDataset(splits=splits, classes=listing.classes, checksum=combine_digests(total), bad_images=bad_images)
