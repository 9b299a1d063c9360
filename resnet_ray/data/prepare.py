"""Turn any source into the canonical prepared dataset (its layout: :mod:`resnet_ray.data.layout`).

The source's reader is looked up in :data:`READERS`; image folders and Parquet sources are streamed by parallel
tasks (:mod:`resnet_ray.data.writer`), the built-in sources (digits, CIFAR) read into memory and written here.

The prepared folder is ``<data.root>/<dataset name>/<fingerprint>/``. The fingerprint covers the request
(source, split seed and fractions, image size, ...) and the source's content (names, sizes and modification
times of its files), so a prepared folder is written once and never rewritten: other settings or changed source
files make a new folder beside it, and runs trained on the old one keep reading the same rows. Writing goes to
``<fingerprint>.tmp-*`` under a lock (``<fingerprint>.lock``, see :func:`resnet_ray.storage.lock`); a second
prepare of the same request waits for the first and reuses its result, and whoever holds the lock next deletes
what a killed prepare left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Optional

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data import layout, writer
from resnet_ray.data.cifar import read_cifar10, read_cifar100
from resnet_ray.data.digits import read_digits
from resnet_ray.data.imagefolder import read_imagefolder
from resnet_ray.data.layout import FORMAT_VERSION, METADATA, DataError, read_metadata
from resnet_ray.data.parquet import read_parquet_source
from resnet_ray.data.sources import RawDataset, RawSplit, check_split, walk
from resnet_ray.data.writer import WrittenDataset

log = logging.getLogger(__name__)

# data.source -> the reader of that source kind (in memory); prepare streams imagefolder and parquet instead
READERS: dict[str, Callable[[DataConfig], RawDataset]] = {
    "digits": read_digits,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "parquet": read_parquet_source,
    "imagefolder": read_imagefolder,
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


def dataset_dir(cfg: DataConfig) -> str:
    """The prepared folder of this request: ``<root>/<name>/<fingerprint>``."""
    return storage.join(cfg.root, cfg.dataset_name, request_fingerprint(cfg))


def source_files(path: str) -> list:
    """[relative name, size, mtime in ns] of every file of a source (one file or a folder; local or URI), links to
    files by their target's size and time, links to folders not followed (as the readers list them).

    [] when the path does not exist (the source reader then reports it).
    """
    fs, base = storage.resolve(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [["", info.size, info.mtime_ns]]
    return [[e.path[len(base) :], e.size, e.mtime_ns] for e in walk(fs, base) if e.kind == "file"]


def request_fingerprint(cfg: DataConfig) -> str:
    """Identity of a prepare request: same source content and carving settings -> same prepared data."""
    path = storage.normalize(cfg.path) if cfg.path else None
    request = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "path": path,
        "md5": cfg.md5,
        "files": source_files(path) if path else None,
        "image_column": cfg.image_column,
        "label_column": cfg.label_column,
        "coarse_label_column": cfg.coarse_label_column,
        "classes": list(cfg.classes),
        "image_size": cfg.image_size,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
    }
    # settings added later enter only when they differ from their default, which is what every dataset
    # prepared before them did: those keep their fingerprint (and folder)
    for key, default in (("resize", "center_crop"), ("on_bad_image", "error")):
        if getattr(cfg, key) != default:
            request[key] = getattr(cfg, key)
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def _take(raw: RawDataset, rows: layout.SplitRows) -> RawSplit:
    """The rows of a prepared split (from one or both source splits) out of an in-memory source."""
    first = raw.splits[str(rows.source[0])] if len(rows.index) else raw.splits["train"]
    n = len(rows.index)
    images = np.empty((n, *first.images.shape[1:]), dtype=first.images.dtype)
    labels = np.empty(n, dtype=np.int64)
    coarse = None if first.coarse_labels is None else np.empty(n, dtype=np.int64)
    for source in np.unique(rows.source):
        positions, index = rows.of(str(source))
        part = raw.splits[str(source)]
        images[positions], labels[positions] = part.images[index], part.labels[index]
        if coarse is not None:
            coarse[positions] = part.coarse_labels[index]
    return RawSplit(images, labels, coarse)


def carve_with_duplicates(raw: RawDataset, cfg: DataConfig) -> tuple[dict[str, RawSplit], dict]:
    """train/val/test of an in-memory source, as carve_order says, each group of exact duplicates (equal stored
    pixels) in one split (layout.keep_together); and metadata.json's ``duplicates`` record."""
    labels = {name: split.labels for name, split in raw.splits.items()}
    groups = layout.duplicate_groups({name: layout.pixel_digests(split.images) for name, split in raw.splits.items()})
    order, record = layout.keep_together(layout.carve_order(labels, cfg), groups, labels)
    return {name: _take(raw, rows) for name, rows in order.items()}, record


def carve_splits(raw: RawDataset, cfg: DataConfig) -> dict[str, RawSplit]:
    """train/val/test of an in-memory source (see carve_with_duplicates)."""
    return carve_with_duplicates(raw, cfg)[0]


def _write_split(fs: pafs.FileSystem, folder: str, split: RawSplit) -> None:
    fs.create_dir(folder, recursive=True)
    table = layout.split_table(split.images, split.labels, split.coarse_labels)
    rows = layout.rows_per_shard(split.images.shape[1])
    for shard, start in enumerate(range(0, max(table.num_rows, 1), rows)):
        pq.write_table(table.slice(start, rows), f"{folder}/part-{shard:05d}.parquet", filesystem=fs)


def _commit(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Move the finished temporary folder into place; metadata.json last on object stores."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(tmp, final)
        return
    # object stores have no directory rename: move files, the commit marker last
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)) if i.type == pafs.FileType.File]
    for path in sorted(files, key=lambda p: p.endswith(METADATA)):
        fs.move(path, final + path[len(tmp) :])
    fs.delete_dir(tmp)


def _clean_leftovers(final: str) -> None:
    """Delete what killed prepares of this request left: temporary folders and a half-moved final folder.

    Called with the lock held, so none of it belongs to a live prepare.
    """
    parent, name = storage.split(final)
    for entry in storage.list_names(parent):
        if entry.startswith(f"{name}.tmp-"):
            log.warning("deleting %s, left by a prepare that did not finish", storage.join(parent, entry))
            storage.delete_dir(storage.join(parent, entry))
    if storage.exists(final):  # no metadata.json (checked by the caller): a commit interrupted on an object store
        log.warning("deleting %s: an interrupted prepare left it without %s", final, METADATA)
        storage.delete_dir(final)


def _bad_image_record(cfg: DataConfig, bad: list) -> dict:
    """metadata.json's account of the images left out (data.on_bad_image=skip), also said in the log."""
    if bad:
        log.warning(
            "%s: left out %d image(s) that cannot be read (data.on_bad_image=skip), e.g. %s: %s; "
            "all listed in metadata.json",
            cfg.dataset_name,
            len(bad),
            bad[0]["file"],
            bad[0]["reason"],
        )
    return {"policy": cfg.on_bad_image, "count": len(bad), "files": bad}


def _write_in_memory(cfg: DataConfig, fs: pafs.FileSystem, tmp: str) -> WrittenDataset:
    """Read the whole source into memory, carve and write it (the small built-in sources)."""
    raw = read_source(cfg)
    splits, duplicates = carve_with_duplicates(raw, cfg)
    mean, std = layout.mean_std([layout.pixel_sums(splits["train"].images)], f"{cfg.source} source {cfg.path}")
    for name, split in splits.items():
        _write_split(fs, f"{tmp}/{name}", split)
    return WrittenDataset(
        classes=list(raw.classes),
        counts={n: int(len(s.labels)) for n, s in splits.items()},
        mean=mean,
        std=std,
        checksum=raw.checksum,
        bad_images=raw.bad_images,
        coarse_classes=raw.coarse_classes,
        fine_to_coarse=raw.fine_to_coarse,
        duplicates=duplicates,
    )


def _duplicates_record(cfg: DataConfig, record: dict) -> dict:
    """metadata.json's ``duplicates``, also said in the log when there are any."""
    if record["groups"]:
        log.warning("%s: %s", cfg.dataset_name, layout.duplicates_summary(record))
    return record


def _write(
    cfg: DataConfig,
    final: str,
    fingerprint: str,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> dict:
    """Write the dataset into a temporary folder beside ``final``, then move it there.

    Image folders and Parquet sources stream (resnet_ray.data.writer: names and labels in this process, shards
    written by parallel tasks); the built-in sources (digits, CIFAR) are read into memory.
    """
    fs, final_path = storage.resolve(final)
    suffix = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp = final_path + suffix
    try:
        if cfg.source == "imagefolder":
            written = writer.write_imagefolder(cfg, final + suffix, on_start, on_rows)
        elif cfg.source == "parquet":
            written = writer.write_parquet(cfg, final + suffix, on_start, on_rows)
        else:
            written = _write_in_memory(cfg, fs, tmp)
        metadata = {
            "format_version": FORMAT_VERSION,
            "name": cfg.dataset_name,
            "source": cfg.source,
            "fingerprint": fingerprint,
            "source_checksum": written.checksum,
            "image_size": cfg.image_size,
            "resize": layout.resize_for(cfg).record(),
            "bad_images": _bad_image_record(cfg, written.bad_images),
            "duplicates": _duplicates_record(cfg, written.duplicates),
            "classes": list(written.classes),
            "coarse_classes": written.coarse_classes,
            "fine_to_coarse": written.fine_to_coarse,
            "counts": written.counts,
            "mean": written.mean,
            "std": written.std,
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
            "seed": cfg.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with fs.open_output_stream(f"{tmp}/{METADATA}") as f:
            f.write(json.dumps(metadata, indent=2).encode())
        _commit(fs, tmp, final_path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)
        raise
    return metadata


def prepare(
    cfg: DataConfig,
    wait_s: float = 1800.0,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> str:
    """Prepare cfg's source into the canonical layout once; returns the prepared folder.

    A prepare of the same request that is already running is waited for (at most ``wait_s`` seconds) and
    its result reused. ``on_start(images)`` / ``on_rows(n)`` report the progress of a streamed source.
    """
    final = dataset_dir(cfg)
    if cfg.path and (final + "/").startswith(storage.normalize(cfg.path).rstrip("/") + "/"):
        # the prepared files would become part of the source: a new fingerprint, and a source with them in it
        raise DataError(
            f"data.root {cfg.root}: the prepared dataset ({final}) would be written inside the source "
            f"data.path {cfg.path}; choose a data.root outside it"
        )
    fingerprint = storage.split(final)[1]
    done = storage.join(final, METADATA)
    if storage.exists(done):
        log.debug("%s is already prepared at %s: nothing to do", cfg.dataset_name, final)
        return final
    with storage.lock(f"{final}.lock", wait_s=wait_s):
        if storage.exists(done):
            log.info("%s was prepared at %s by another job meanwhile: reusing it", cfg.dataset_name, final)
            return final
        _clean_leftovers(final)
        start = time.perf_counter()
        metadata = _write(cfg, final, fingerprint, on_start, on_rows)
    seconds = time.perf_counter() - start
    rows = sum(metadata["counts"].values())
    log.info(
        "prepared %s at %s in %.1f s (%.0f images/s): %s",
        cfg.dataset_name,
        final,
        seconds,
        rows / seconds,
        metadata["counts"],
    )
    return final


def ensure_prepared(
    cfg: DataConfig, on_start: Optional[Callable[[int], None]] = None, on_rows: Optional[Callable[[int], None]] = None
) -> tuple[str, dict]:
    """prepare() (a no-op when already done) and the dataset's metadata."""
    prepared = prepare(cfg, on_start=on_start, on_rows=on_rows)
    return prepared, read_metadata(prepared)
