"""The Parquet source: a folder of Parquet files (local, or any pyarrow filesystem URI) with encoded images.

:func:`list_parquet` reads what the driver needs (files, row-group sizes, labels, class names) and checks every
file's columns and labels; :func:`read_parquet_source` also decodes every image into memory, while ``prepare``
streams the rows instead (:mod:`resnet_ray.data.writer`) to the same dataset. Images are decoded with
:func:`resnet_ray.data.layout.decode_batch` (any size and mode -> ``data.image_size`` RGB by the ``data.resize``
policy). A bad record raises :class:`~resnet_ray.data.layout.DataError` naming the file and row; an undecodable
image does so under ``data.on_bad_image: error`` and is left out, listed in ``RawDataset.bad_images``, under
``skip``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.layout import DataError, decode_batch, resize_for
from resnet_ray.data.sources import SPLIT_NAMES, RawDataset, RawSplit, combine_digests, file_digest, fine_to_coarse_map

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
FINE_KEYS = ("classes", "label_names", "names", "class_names", "fine_label_names")
COARSE_KEYS = ("coarse_classes", "coarse_label_names", "coarse_names")


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
    source: str = ""  # data.path as given (a local path or a URI)

    def display(self, path: str) -> str:
        """A file as messages name it: its local path, or its URI for a remote source."""
        return storage.display(self.source, path)

    def rel(self, path: str) -> str:
        return path[len(self.base) :].lstrip("/")


# ---------------------------------------------------------------------------
# files and columns


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


def _source_files(cfg: DataConfig, fs, base: str) -> tuple[str, dict]:
    """(folder, {split: sorted Parquet files}) of a Parquet source: one file (the train split) or a folder."""
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


def _column_values(table, column: str, file: str, kind: str):
    if column not in table.column_names:
        raise DataError(f"{file}: no {kind} column {column!r}; columns: {', '.join(table.column_names)}")
    return table.column(column).combine_chunks()


def _first_null(arr) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _int_labels(table, column: str, file: str, kind: str) -> np.ndarray:
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


def _read_footer(fs, path: str, columns: list, cfg: DataConfig) -> tuple[pa.Table, list]:
    """(the label columns ``columns[1:]``, rows of each row group) of one file, its image column checked."""
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names, footer = pf.schema_arrow.names, pf.metadata
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
    return table, [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]


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


def _find_classes_file(fs, base: str, files: Sequence[str]) -> Optional[str]:
    """classes.json beside the first train file or in a folder above it, up to the source folder."""
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


def _max_label_names(labels: dict) -> list:
    """str(i) up to the largest label of any split."""
    top = max(int(values.max()) for values in labels.values() if len(values))
    return [str(i) for i in range(top + 1)]


def _class_names(cfg: DataConfig, fs, base: str, train_files: list, labels: dict) -> tuple[list, str, Optional[tuple]]:
    """(class names, where they come from, (classes.json bytes, its path) or None): cfg.classes, else
    classes.json beside or above the train files, else str(i) up to the largest label."""
    if cfg.classes:
        return list(cfg.classes), "data.classes", None
    found = _find_classes_file(fs, base, train_files)
    if found:
        doc = (_read_bytes(fs, found), found)
        return _parse_classes(doc[0], found, FINE_KEYS, True), found, doc
    return _max_label_names(labels), "max label", None


def _coarse_classes(classes_doc: Optional[tuple], coarse: dict, owners: dict) -> list:
    """Coarse class names: from classes.json when it names them, else str(i); every coarse label checked."""
    names = _parse_classes(classes_doc[0], classes_doc[1], COARSE_KEYS, False) if classes_doc else None
    names = names or _max_label_names(coarse)
    for split in coarse:
        _check_range(coarse[split], len(names), owners[split], "coarse label", f"{len(names)} coarse classes")
    return names


# ---------------------------------------------------------------------------
# listing and reading


def list_parquet(cfg: DataConfig) -> ParquetListing:
    """Parquet files per split under cfg.path (local folder, file:// or any pyarrow filesystem URI):
    train.parquet / train-*.parquet (any depth, the Hugging Face layout) / train/*.parquet, likewise test.
    Reads the footers and the label columns only, and checks every file's columns and labels.
    Class names: cfg.classes, else classes.json beside or above the train files (a list, or an object with
    "classes"/"label_names"), else str(i) up to the largest label."""
    fs, base = _filesystem(cfg.path)
    base, by_split = _source_files(cfg, fs, base.rstrip("/") or "/")
    coarse_col = cfg.coarse_label_column
    columns = [cfg.image_column, cfg.label_column] + ([coarse_col] if coarse_col else [])
    files, labels, coarse, owners = {}, {}, {}, {}
    for split, paths in by_split.items():
        files[split], split_labels, split_coarse, owners[split] = [], [], [], []
        for path in paths:
            table, groups = _read_footer(fs, path, columns, cfg)
            split_labels.append(_int_labels(table, cfg.label_column, path, "label"))
            if coarse_col:
                split_coarse.append(_int_labels(table, coarse_col, path, "coarse label"))
            files[split].append((path, groups))
            owners[split].append((path, np.arange(table.num_rows)))
        labels[split] = np.concatenate(split_labels)
        coarse[split] = np.concatenate(split_coarse) if coarse_col else None
    if not len(labels["train"]):
        raise DataError(f"parquet source {cfg.path}: the train split has no rows ({', '.join(by_split['train'])})")

    classes, classes_from, classes_doc = _class_names(cfg, fs, base, by_split["train"], labels)
    for split in labels:
        _check_range(labels[split], len(classes), owners[split], "label", f"{len(classes)} classes from {classes_from}")
    coarse_classes = fine_to_coarse = None
    if coarse_col:
        coarse_classes = _coarse_classes(classes_doc, coarse, owners)
        fine_to_coarse = fine_to_coarse_map(
            np.concatenate(list(labels.values())),
            np.concatenate(list(coarse.values())),
            len(classes),
            f"parquet source {cfg.path}",
            missing="warn",
        )
    return ParquetListing(fs, base, files, labels, coarse, classes, coarse_classes, fine_to_coarse, cfg.path)


def image_blobs(column) -> list:
    """An image column (binary, or a struct with 'bytes') -> list of bytes, None where the image is null."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_struct(array.type):
        nulls = array.is_null().to_pylist()
        return [None if null else blob for null, blob in zip(nulls, array.field("bytes").to_pylist())]
    return array.to_pylist()


def image_rows(fs, path: str, groups: list, skip: int, take: int, column: str) -> Iterator[list]:
    """Lists of image blobs (None where null) of rows [skip, skip + take) of a run of a Parquet file's row
    groups, read 256 rows at a time."""
    with fs.open_input_file(path) as f:
        seen = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256, row_groups=groups, columns=[column]):
            lo, hi = max(skip - seen, 0), min(skip + take - seen, batch.num_rows)
            seen += batch.num_rows
            if lo < hi:
                yield image_blobs(batch.column(0).slice(lo, hi - lo))
            if seen >= skip + take:
                return


def read_parquet_source(cfg: DataConfig) -> RawDataset:
    """A Parquet source (see list_parquet) read and decoded into memory; checksum: combine_digests of every
    file. ``prepare`` streams it instead (resnet_ray.data.writer) to the same dataset."""
    listing = list_parquet(cfg)
    resize = resize_for(cfg)
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
            decoded = decode_batch(
                blobs, resize, cfg.on_bad_image, lambda i, p=path: f"{listing.display(p)}: row {i}", threads=True
            )
            images.append(decoded.good_images())
            kept_rows.append(offset + decoded.kept)
            offset += len(blobs)
            bad_images += decoded.bad_images(split)
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
