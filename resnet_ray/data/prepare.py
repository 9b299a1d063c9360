"""Turn any source into the canonical prepared dataset.

Layout under ``<data.root>/<dataset name>/<fingerprint>/``::

    metadata.json                   # written last: its presence marks a complete dataset
    train/part-00000.parquet ...    # row_id int64, image fixed_size_binary(H*W*3) HWC uint8, label, [coarse_label]
    val/...  test/...

The fingerprint covers the request (source, split seed and fractions, image size, ...) and the source's
content (names, sizes and modification times of its files), so a prepared folder is written once and never
rewritten: other settings or changed source files make a new folder beside it, and runs trained on the old
one keep reading the same rows. Writing goes to ``<fingerprint>.tmp-*`` under a lock
(``<fingerprint>.lock``, see :func:`resnet_ray.storage.lock`); a second prepare of the same request waits
for the first and reuses its result, and whoever holds the lock next deletes what a killed prepare left.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.sources import DataError, RawDataset, RawSplit, read_source

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROWS_PER_SHARD = 5000
METADATA = "metadata.json"


def dataset_dir(cfg: DataConfig) -> str:
    """The prepared folder of this request: ``<root>/<name>/<fingerprint>``."""
    return storage.join(cfg.root, cfg.dataset_name, request_fingerprint(cfg))


def source_files(path: str) -> list:
    """[relative name, size, mtime in ns] of every file of a source (one file or a folder; local or URI).

    [] when the path does not exist (the source reader then reports it).
    """
    fs, base = storage.resolve(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted([i.path[len(base):], i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File)


def request_fingerprint(cfg: DataConfig) -> str:
    """Identity of a prepare request: same source content and carving settings -> same prepared data."""
    path = storage.normalize(cfg.path) if cfg.path else None
    request = {
        "format": FORMAT_VERSION, "source": cfg.source, "path": path, "md5": cfg.md5,
        "files": source_files(path) if path else None,
        "image_column": cfg.image_column, "label_column": cfg.label_column,
        "coarse_label_column": cfg.coarse_label_column, "classes": list(cfg.classes),
        "image_size": cfg.image_size, "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction, "seed": cfg.seed,
    }
    # settings added later enter only when they differ from their default, which is what every dataset
    # prepared before them did: those keep their fingerprint (and folder)
    for key, default in (("resize", "center_crop"), ("on_bad_image", "error")):
        if getattr(cfg, key) != default:
            request[key] = getattr(cfg, key)
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(prepared: str) -> dict:
    """metadata.json of a prepared dataset; DataError when it is not (completely) prepared."""
    path = storage.join(prepared, METADATA)
    if not storage.exists(path):
        raise DataError(f"{prepared}: not a prepared dataset (no {METADATA}); run jobs/prepare.py first")
    return storage.read_json(path)


def _carve(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of row indices into (kept, carved)."""
    index = np.arange(len(labels))
    try:
        kept, carved = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot carve a stratified {what} split of {fraction} from {len(labels)} rows: {exc}") from None
    return np.sort(kept), np.sort(carved)


def _take(split: RawSplit, index: np.ndarray) -> RawSplit:
    coarse = None if split.coarse_labels is None else split.coarse_labels[index]
    return RawSplit(split.images[index], split.labels[index], coarse)


def carve_splits(raw: RawDataset, cfg: DataConfig) -> dict[str, RawSplit]:
    """train/val/test: val always carved from train; test carved only when the source has none.

    Each split is then put in a seeded random order, so that shards mix classes and a ``limit``
    takes a representative subset.
    """
    train = raw.splits["train"]
    splits = {}
    if "test" in raw.splits:
        splits["test"] = raw.splits["test"]
    else:
        kept, carved = _carve(train.labels, cfg.test_fraction, cfg.seed, "test")
        train, splits["test"] = _take(train, kept), _take(train, carved)
    kept, carved = _carve(train.labels, cfg.val_fraction, cfg.seed + 1, "val")
    splits["train"], splits["val"] = _take(train, kept), _take(train, carved)
    rng = np.random.default_rng(cfg.seed)
    return {name: _take(split, rng.permutation(len(split.labels))) for name, split in splits.items()}


def _channel_stats(images: np.ndarray) -> tuple[list, list]:
    """Per-channel mean and std on the [0, 1] scale, accumulated in float64 chunks."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk ** 2).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    return mean.tolist(), np.sqrt(np.maximum(total_sq / n - mean ** 2, 0)).tolist()


def split_table(split: RawSplit) -> pa.Table:
    n, h, w, c = split.images.shape
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(h * w * c), n,
                                                  [None, pa.py_buffer(np.ascontiguousarray(split.images))])
    columns = {"row_id": pa.array(np.arange(n, dtype=np.int64)), "image": images,
               "label": pa.array(split.labels.astype(np.int64))}
    if split.coarse_labels is not None:
        columns["coarse_label"] = pa.array(split.coarse_labels.astype(np.int64))
    return pa.table(columns)


def _write_split(fs: pafs.FileSystem, folder: str, split: RawSplit) -> None:
    fs.create_dir(folder, recursive=True)
    table = split_table(split)
    for shard, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_SHARD)):
        pq.write_table(table.slice(start, ROWS_PER_SHARD), f"{folder}/part-{shard:05d}.parquet", filesystem=fs)


def _commit(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Move the finished temporary folder into place; metadata.json last on object stores."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(tmp, final)
        return
    # object stores have no directory rename: move files, the commit marker last
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)) if i.type == pafs.FileType.File]
    for path in sorted(files, key=lambda p: p.endswith(METADATA)):
        fs.move(path, final + path[len(tmp):])
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
        log.warning("%s: left out %d image(s) that cannot be read (data.on_bad_image=skip), e.g. %s: %s; "
                    "all listed in metadata.json", cfg.dataset_name, len(bad), bad[0]["file"], bad[0]["reason"])
    return {"policy": cfg.on_bad_image, "count": len(bad), "files": bad}


def _write(cfg: DataConfig, final: str, fingerprint: str) -> dict:
    """Read, carve and write the dataset into a temporary folder, then move it to ``final``."""
    from resnet_ray.data.images import ResizeSpec

    raw = read_source(cfg)
    bad_images = _bad_image_record(cfg, raw.bad_images)
    splits = carve_splits(raw, cfg)
    mean, std = _channel_stats(splits["train"].images)
    fs, final_path = storage.resolve(final)
    tmp = f"{final_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for name, split in splits.items():
            _write_split(fs, f"{tmp}/{name}", split)
        meta = {
            "format_version": FORMAT_VERSION, "name": cfg.dataset_name, "source": cfg.source,
            "fingerprint": fingerprint, "source_checksum": raw.checksum, "image_size": cfg.image_size,
            "resize": ResizeSpec(cfg.image_size, cfg.resize).record(), "bad_images": bad_images,
            "classes": list(raw.classes), "coarse_classes": raw.coarse_classes,
            "fine_to_coarse": raw.fine_to_coarse, "counts": {n: int(len(s.labels)) for n, s in splits.items()},
            "mean": mean, "std": std, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
            "seed": cfg.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with fs.open_output_stream(f"{tmp}/{METADATA}") as f:
            f.write(json.dumps(meta, indent=2).encode())
        _commit(fs, tmp, final_path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)
        raise
    return meta


def prepare(cfg: DataConfig, wait_s: float = 1800.0) -> str:
    """Prepare cfg's source into the canonical layout once; returns the prepared folder.

    A prepare of the same request that is already running is waited for (at most ``wait_s`` seconds) and
    its result reused.
    """
    final = dataset_dir(cfg)
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
        meta = _write(cfg, final, fingerprint)
    log.info("prepared %s at %s in %.1f s: %s", cfg.dataset_name, final, time.perf_counter() - start, meta["counts"])
    return final


def ensure_prepared(cfg: DataConfig) -> tuple[str, dict]:
    """prepare() (a no-op when already done) and the dataset's metadata."""
    prepared = prepare(cfg)
    return prepared, read_metadata(prepared)
