"""The on-disk format of a prepared dataset, and the steps that every writer and reader of it shares.

Layout under ``<data.root>/<dataset name>/<fingerprint>/`` (written by :mod:`resnet_ray.data.prepare`)::

    metadata.json                   # written last: its presence marks a complete dataset
    train/part-00000.parquet ...    # row_id int64, image fixed_size_binary(H*W*3) HWC uint8, label, [coarse_label]
    val/...  test/...

Here: the metadata file (:data:`METADATA`, :func:`read_metadata`, :func:`split_rows`), the shard sizes
(:func:`rows_per_shard`) and tables (:func:`split_table`, :func:`pixel_array`), the carve order of the splits
(:func:`carve_order`) with exact duplicates kept together (:func:`pixel_digests`, :func:`duplicate_groups`,
:func:`keep_together`), reading stored rows by id (:func:`read_rows`), the channel statistics (:func:`pixel_sums`,
:func:`mean_std`) and decoding a batch of encoded images under ``data.on_bad_image`` (:func:`decode_batch`, also
used by the prediction job).

Exact duplicates: every stored image is hashed (BLAKE2b of its pixels), and each group of equal images is kept in
one split (the first of train, val, test that holds one of them), never dropped: a model cannot be tested or
validated on a copy of a training image, and every row stays. Format 2 (:data:`FORMAT_VERSION`) carves so and
counts them in metadata.json's ``duplicates``; without duplicates across splits its splits hold exactly the rows
of format 1.

The leaf of ``resnet_ray.data``: it imports no other module of it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import pyarrow as pa

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.images import BadImage, ResizeSpec, decode

# 2: exact duplicates kept together in one split, counted in metadata.json (1: splits carved from labels alone)
FORMAT_VERSION = 2
METADATA = "metadata.json"
ROWS_PER_SHARD = 5000
SHARD_BYTES = 32 << 20

# 32x32 decodes are dominated by Python overhead and get slower with threads (GIL contention);
# bigger images (stored or encoded) spend their time in C with the GIL released, so threads pay off there.
_THREADED_MIN_SIZE = 96
_THREADED_MIN_BYTES = 16384  # mean encoded size from which photos are decoded on threads
_CHUNK = 256


class DataError(ValueError):
    """Bad input data: the message names the file and row."""


# ---------------------------------------------------------------------------
# metadata.json


def read_metadata(prepared: str) -> dict:
    """metadata.json of a prepared dataset; DataError when it is not (completely) prepared."""
    path = storage.join(prepared, METADATA)
    if not storage.exists(path):
        raise DataError(f"{prepared}: not a prepared dataset (no {METADATA}); run jobs/prepare.py first")
    return storage.read_json(path)


def split_rows(metadata: dict, split: str, limit: Optional[int]) -> int:
    """Rows a split holds, at most ``limit``: the count the evaluation's support must equal."""
    if split not in metadata["counts"]:
        raise DataError(f"split {split!r} does not exist in {metadata['name']}; it has {', '.join(metadata['counts'])}")
    count = metadata["counts"][split]
    return min(count, limit) if limit else count


def resize_for(cfg: DataConfig) -> ResizeSpec:
    """How cfg's source images become the stored ``data.image_size`` (recorded in metadata.json as ``resize``)."""
    return ResizeSpec(cfg.image_size, cfg.resize)


# ---------------------------------------------------------------------------
# shards


def rows_per_shard(image_size: int) -> int:
    """Rows per Parquet shard: ROWS_PER_SHARD, fewer for big images (about SHARD_BYTES of pixels at most)."""
    return max(256, min(ROWS_PER_SHARD, SHARD_BYTES // (image_size * image_size * 3)))


def pixel_column(images: np.ndarray) -> pa.Array:
    """(N, H, W, 3) uint8 -> the stored image column: fixed_size_binary(H*W*3), one HWC row per image."""
    n, h, w, c = images.shape
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(h * w * c), n, [None, pa.py_buffer(np.ascontiguousarray(images))]
    )


def pixel_array(column: pa.ChunkedArray | pa.Array, image_size: int) -> np.ndarray:
    """The stored image column -> (N, H, W, 3) uint8 view of its buffer, no per-row Python (pixel_column back)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.byte_width
    flat = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return flat.reshape(len(array), image_size, image_size, 3)


def split_table(
    images: np.ndarray, labels: np.ndarray, coarse_labels: Optional[np.ndarray] = None, first_row_id: int = 0
) -> pa.Table:
    """The stored table of rows: row_id (from first_row_id on), image fixed_size_binary(H*W*3), label[, coarse]."""
    columns = {
        "row_id": pa.array(np.arange(first_row_id, first_row_id + len(images), dtype=np.int64)),
        "image": pixel_column(images),
        "label": pa.array(labels.astype(np.int64)),
    }
    if coarse_labels is not None:
        columns["coarse_label"] = pa.array(coarse_labels.astype(np.int64))
    return pa.table(columns)


def read_rows(prepared: str, split: str, row_ids, image_size: int) -> dict[int, np.ndarray]:
    """{row id: (S, S, 3) uint8 image} of the given rows of a prepared split (local or URI), read by row id:
    only the row groups whose row_id range holds one of them are read (Parquet statistics)."""
    import pyarrow.parquet as pq

    wanted = sorted({int(i) for i in row_ids})
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    folder = storage.join(prepared, split)
    fs, path = storage.resolve(folder)
    for name in storage.list_names(folder):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(
            f"{path}/{name}", columns=["row_id", "image"], filters=[("row_id", "in", wanted)], filesystem=fs
        )
        if table.num_rows:
            images = pixel_array(table.column("image"), image_size)
            found.update(zip(table.column("row_id").to_pylist(), images.copy()))
        if len(found) == len(wanted):
            break
    return found


# ---------------------------------------------------------------------------
# carving the splits


def _carve(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of row indices into (kept, carved)."""
    from sklearn.model_selection import train_test_split  # imported here: 1 s that every Ray worker would pay

    index = np.arange(len(labels))
    try:
        kept, carved = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(
            f"cannot carve a stratified {what} split of {fraction} from {len(labels)} rows: {exc}"
        ) from None
    return np.sort(kept), np.sort(carved)


class SplitRows(NamedTuple):
    """The rows of a prepared split, in written order: each row's source split and its index in that split."""

    source: np.ndarray  # (n,) str: "train" or "test", the source split a row comes from
    index: np.ndarray  # (n,) int64: the row's index in its source split

    def of(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions in this split, indices into the source split) of the rows that come from ``source``."""
        positions = np.flatnonzero(self.source == source)
        return positions, self.index[positions]


def carve_order(labels: dict, cfg: DataConfig) -> dict[str, SplitRows]:
    """Each prepared split's rows (:class:`SplitRows`, in written order), from the labels alone.

    test: the source's test split, else carved from train (stratified, seeded); val: always carved from the
    rest of train. Each split is then put in a seeded random order, so that shards mix classes and a ``limit``
    takes a representative subset. :func:`keep_together` then moves exact duplicates into one split.
    """
    train = np.arange(len(labels["train"]))
    order = {}
    if "test" in labels:
        order["test"] = ("test", np.arange(len(labels["test"])))
    else:
        kept, carved = _carve(labels["train"], cfg.test_fraction, cfg.seed, "test")
        train, order["test"] = train[kept], ("train", train[carved])
    kept, carved = _carve(labels["train"][train], cfg.val_fraction, cfg.seed + 1, "val")
    order["train"], order["val"] = ("train", train[kept]), ("train", train[carved])
    rng = np.random.default_rng(cfg.seed)
    return {
        name: SplitRows(np.full(len(index), source), index[rng.permutation(len(index))])
        for name, (source, index) in order.items()
    }


# ---------------------------------------------------------------------------
# exact duplicates: hashed pixels, kept together in one split

HOME_ORDER = ("train", "val", "test")  # a duplicate group lives in the first of these that holds one of its rows
SOURCE_ORDER = ("train", "test")


def pixel_digests(images: np.ndarray) -> np.ndarray:
    """(N, 16) uint8: the BLAKE2b-128 digest of each image's stored pixels (equal digests: equal pixels)."""
    images = np.ascontiguousarray(images)
    out = np.empty((len(images), 16), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = np.frombuffer(hashlib.blake2b(images[i].data, digest_size=16).digest(), dtype=np.uint8)
    return out


def duplicate_groups(digests: dict, readable: Optional[dict] = None) -> dict[str, np.ndarray]:
    """{source split: (N,) int64 group of each row}: rows of any source split with equal pixel digests share a
    group; each row that was not decoded (``readable[split]`` False: a skipped bad image) has a group of its own.

    ``digests``: {source split: (N, 16) uint8 from :func:`pixel_digests`}.
    """
    names = [name for name in SOURCE_ORDER if name in digests]
    flat = np.concatenate([np.ascontiguousarray(digests[name], dtype=np.uint8) for name in names])
    _, group = np.unique(flat.view(np.dtype((np.void, 16))).ravel(), return_inverse=True)
    group = group.astype(np.int64).ravel()
    if readable is not None:
        ok = np.concatenate([np.asarray(readable[name], dtype=bool) for name in names])
        group[~ok] = group.max(initial=-1) + 1 + np.arange(int((~ok).sum()))
    bounds = np.cumsum([0] + [len(digests[name]) for name in names])
    return {name: group[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}


def keep_together(order: dict[str, SplitRows], groups: dict, labels: dict) -> tuple[dict[str, SplitRows], dict]:
    """Move every group of exact duplicates that :func:`carve_order` spread over several splits into one split,
    the first of train, val, test that holds one of its rows; (new order, metadata.json's ``duplicates``).

    The rows that stay keep their order; the rows moved into a split follow its own rows, by source split and
    index. So without duplicates across splits nothing changes, and a held-out split only ever loses rows (test
    never gains one): every row is kept, and no image can stand in two splits.
    """
    names = [name for name in HOME_ORDER if name in order]
    row_groups = {name: _groups_of(order[name], groups) for name in names}
    total = 1 + max(int(g.max(initial=-1)) for g in groups.values())
    home = np.full(total, len(names), dtype=np.int64)
    for rank, name in enumerate(names):
        np.minimum.at(home, row_groups[name], rank)
    moved: dict = {name: [] for name in names}
    new = {}
    for rank, name in enumerate(names):
        rows, target = order[name], home[row_groups[name]]
        stay = target == rank
        new[name] = SplitRows(rows.source[stay], rows.index[stay])
        for to in np.unique(target[~stay]):
            leave = target == to
            moved[names[to]].append((rows.source[leave], rows.index[leave]))
    for name, parts in moved.items():
        if parts:
            source = np.concatenate([new[name].source] + [p[0] for p in parts])
            index = np.concatenate([new[name].index] + [p[1] for p in parts])
            tail = np.arange(len(new[name].index), len(index))
            rank = np.array([SOURCE_ORDER.index(s) for s in source[tail]], dtype=np.int64)
            tail = tail[np.lexsort((index[tail], rank))]
            keep = np.concatenate([np.arange(len(new[name].index)), tail])
            new[name] = SplitRows(source[keep], index[keep])
    record = _duplicates_record(groups, labels)
    record["moved_rows"] = {name: int(sum(len(p[1]) for p in parts)) for name, parts in moved.items() if parts}
    return {name: new[name] for name in order}, record


def _groups_of(rows: SplitRows, groups: dict) -> np.ndarray:
    out = np.empty(len(rows.index), dtype=np.int64)
    for source in np.unique(rows.source):
        positions, index = rows.of(str(source))
        out[positions] = groups[str(source)][index]
    return out


def _duplicates_record(groups: dict, labels: dict) -> dict:
    """metadata.json's count of exact duplicates: groups of 2 or more equal images, the rows beyond the first of
    each, and the groups whose rows have different labels (the same image under two classes)."""
    group = np.concatenate([groups[name] for name in SOURCE_ORDER if name in groups])
    label = np.concatenate([np.asarray(labels[name]) for name in SOURCE_ORDER if name in groups])
    sizes = np.bincount(group)
    pairs = np.unique(np.stack([group, label], axis=1), axis=0)
    labels_per_group = np.bincount(pairs[:, 0], minlength=len(sizes))
    return {
        "groups": int((sizes > 1).sum()),
        "extra_rows": int((sizes[sizes > 1] - 1).sum()),
        "label_conflicts": int((labels_per_group > 1).sum()),
        "policy": "each group in one split: the first of train, val, test that holds one of its rows",
    }


def duplicates_summary(record: Optional[dict]) -> str:
    """One phrase for the prepare's closing line: how many exact duplicates were found and where they went."""
    if record is None:
        return "duplicates not checked (prepared before format 2)"
    if not record["groups"]:
        return "no exact duplicate images"
    moved = sum(record.get("moved_rows", {}).values())
    text = (
        f"{record['extra_rows']} exact duplicate image(s) in {record['groups']} group(s), each group in one split"
        + (f" ({moved} row(s) moved to keep them together)" if moved else "")
    )
    if record.get("label_conflicts"):
        text += f"; {record['label_conflicts']} group(s) hold the same image under different labels"
    return text


# ---------------------------------------------------------------------------
# channel statistics (metadata.json's mean and std)


def pixel_sums(images: np.ndarray, chunk: int = 256) -> dict:
    """Exact per-channel sums of the uint8 values and of their squares (integers: no rounding, any order), and the
    pixel count: the figures of :func:`mean_std`, which add up over shards."""
    total, total_sq = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for start in range(0, len(images), chunk):
        values = images[start : start + chunk].reshape(-1, 3).astype(np.int64)
        total += values.sum(0)
        total_sq += (values * values).sum(0)
    return {"sum": total.tolist(), "sum_sq": total_sq.tolist(), "pixels": int(np.prod(images.shape[:3]))}


def mean_std(sums: Iterable[dict], where: str) -> tuple[list, list]:
    """Per-channel mean and std on the [0, 1] scale of the images whose :func:`pixel_sums` are ``sums``
    (dicts that hold them among other keys); DataError naming ``where`` when they hold no pixel."""
    parts = [s for s in sums if s.get("pixels")]
    n = sum(s["pixels"] for s in parts)
    if not n:
        raise DataError(f"{where}: no readable image in the train split")
    total = [sum(s["sum"][c] for s in parts) for c in range(3)]
    total_sq = [sum(s["sum_sq"][c] for s in parts) for c in range(3)]
    mean = [t / (255.0 * n) for t in total]
    std = [math.sqrt(max(sq / (255.0**2 * n) - m * m, 0.0)) for sq, m in zip(total_sq, mean)]
    return mean, std


# ---------------------------------------------------------------------------
# decoding a batch under the bad-image policy


class BadRow(NamedTuple):
    index: int  # position in the batch
    file: str  # the item as messages name it (``where(index)``)
    reason: str


@dataclass
class Decoded:
    """A decoded batch: every item's image, whether it decoded, and why the others did not."""

    images: np.ndarray  # (N, S, S, 3) uint8; zeros where an item did not decode
    ok: np.ndarray  # (N,) bool
    bad: list  # [BadRow] of the items that did not decode, in order

    @property
    def kept(self) -> np.ndarray:
        """Indices of the items that decoded."""
        return np.flatnonzero(self.ok)

    def good_images(self) -> np.ndarray:
        """The images of the items that decoded, in order (no copy when all did)."""
        return self.images if self.ok.all() else self.images[self.ok]

    def bad_images(self, split: str) -> list[dict]:
        """The items left out, as metadata.json lists them: [{"split", "file", "reason"}]."""
        return [{"split": split, "file": b.file, "reason": b.reason} for b in self.bad]


def decode_batch(
    blobs: Iterable,
    resize: ResizeSpec,
    on_bad_image: str = "error",
    where: Optional[Callable[[int], str]] = None,
    count: Optional[int] = None,
    threads: bool = False,
) -> Decoded:
    """Decode encoded images to ``resize.size`` RGB uint8 by the resize policy (:func:`resnet_ray.images.decode`).

    An item is the encoded bytes, None (a null image) or a BadImage (an item that could not be read: its reason).
    ``on_bad_image="error"`` raises DataError (``"<where(i)>: <reason>"``) at the first bad item in order;
    ``"skip"`` lists it in ``Decoded.bad``. ``where(i)`` names item i (default: its index). ``count``: the number
    of items when ``blobs`` is an iterator (items beyond it are not read; fewer leave ``ok`` False without a
    reason). ``threads``: decode chunks on a thread pool when the images are large (``blobs`` a sequence).
    """
    n = len(blobs) if count is None else count
    images = np.zeros((n, resize.size, resize.size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    where = where or str
    skip = on_bad_image == "skip"
    workers = _decode_workers(blobs, resize) if threads else 1
    if workers <= 1 or n <= _CHUNK:
        bad = _decode_into(images, ok, 0, blobs, resize, where, skip)
    else:
        with ThreadPoolExecutor(workers) as pool:
            chunks = [
                pool.submit(_decode_into, images, ok, start, blobs[start : start + _CHUNK], resize, where, skip)
                for start in range(0, n, _CHUNK)
            ]
            bad = [row for chunk in chunks for row in chunk.result()]  # in order: the earliest error wins
    return Decoded(images, ok, bad)


def _decode_workers(blobs: Sequence, resize: ResizeSpec) -> int:
    """Threads worth decoding on: several for large images (stored size or encoded bytes), else one."""
    sample = blobs[:64]
    mean_bytes = sum(len(b) if isinstance(b, bytes) else 0 for b in sample) / max(len(sample), 1)
    large = resize.size >= _THREADED_MIN_SIZE or mean_bytes >= _THREADED_MIN_BYTES
    return min(8, os.cpu_count() or 1) if large else 1


def _decode_into(
    images: np.ndarray,
    ok: np.ndarray,
    start: int,
    blobs: Iterable,
    resize: ResizeSpec,
    where: Callable[[int], str],
    skip: bool,
) -> list[BadRow]:
    """Decode blobs into images[start:...] (setting ok); the bad ones as BadRow, or DataError at the first."""
    bad = []
    for i, blob in zip(range(start, len(images)), blobs):  # range first: nothing is read beyond the batch
        try:
            if blob is None:
                raise BadImage("image is null")
            if isinstance(blob, BadImage):
                raise blob
            images[i] = decode(blob, resize)
            ok[i] = True
        except BadImage as exc:
            if not skip:
                raise DataError(f"{where(i)}: {exc}") from None
            bad.append(BadRow(i, where(i), str(exc)))
    return bad
