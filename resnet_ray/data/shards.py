"""Streaming prepare of image folders: the driver holds names and labels, parallel tasks decode and write shards.

The driver lists the source (names only, local or URI), carves the splits from the labels alone
(``prepare.carve_order``: stratified, seeded) and cuts every split, in its written order, into shards of
``prepare.rows_per_shard`` files. Each shard is one task: it reads its files, decodes them to the stored size
(``data.resize``), writes ``<split>/part-NNNNN.parquet`` and returns only small figures (rows, pixel sums for
the train split's mean/std, the bad files it left out, its share of the source checksum). Tasks run on the Ray
cluster when this process is connected to one (jobs/train.py, jobs/evaluate.py, jobs/prepare.py inside
``ray job submit``), else on a thread pool of this process; either way at most a few shards are in flight, so
memory stays bounded whatever the source size.

The result is the same dataset, row for row, as reading everything into memory (``files.read_imagefolder``) and
writing it (``prepare.carve_splits``), with the same checksum.
"""
from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.files import combine_digests, file_digest, list_imagefolder, read_file
from resnet_ray.data.images import BadImage, ResizeSpec, decode
from resnet_ray.data.sources import DataError, RawSplit

log = logging.getLogger(__name__)

MAX_THREADS = 4  # local decoding threads (each holds one shard): bounds this process's memory


@dataclass
class Streamed:
    """What writing the shards produced: the figures metadata.json needs."""

    classes: list
    counts: dict
    mean: list
    std: list
    checksum: str
    bad_images: list = field(default_factory=list)


def write_shard(task: dict) -> dict:
    """One shard: read, decode and write ``task["paths"]`` (as one Parquet file); small figures back.

    Never raises for a bad image: under data.on_bad_image=error it returns {"error": message naming the file}.
    """
    from resnet_ray.data.prepare import split_table

    fs, _ = storage.resolve(task["source"])
    spec = ResizeSpec.from_record(task["resize"], task["resize"]["size"])
    paths, labels = task["paths"], np.asarray(task["labels"], dtype=np.int64)
    images = np.empty((len(paths), spec.size, spec.size, 3), dtype=np.uint8)
    kept, bad, digest = [], [], 0
    for i, path in enumerate(paths):
        shown = f"{task['scheme']}://{path}" if task["scheme"] else path
        try:
            content = read_file(fs, path)
        except OSError as exc:
            content, reason = None, f"cannot read ({exc})"
        digest += file_digest(path[len(task["root"]):].lstrip("/"), content)
        try:
            if content is None:
                raise BadImage(reason)
            images[i] = decode(content, spec)
            kept.append(i)
        except BadImage as exc:
            if task["on_bad_image"] != "skip":
                return {"error": f"{shown}: {exc}"}
            bad.append({"split": task["split"], "file": shown, "reason": str(exc)})
    images = images[kept] if len(kept) < len(paths) else images
    out_fs, out_path = storage.resolve(task["out"])
    pq.write_table(split_table(RawSplit(images, labels[kept]), task["first_row_id"]), out_path, filesystem=out_fs)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0 if task["stats"] else np.zeros((0, 3))
    return {"index": task["index"], "rows": len(kept), "bad": bad, "digest": digest,
            "sum": pixels.sum(0).tolist(), "sum_sq": (pixels ** 2).sum(0).tolist(), "pixels": len(pixels)}


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to learn that it is not running
    return bool(ray and ray.is_initialized())


def _run_on_ray(tasks: list, in_flight: int) -> Iterator[dict]:
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    pending, queue = [], list(reversed(tasks))
    try:
        while queue or pending:
            while queue and len(pending) < in_flight:
                pending.append(remote.remote(queue.pop()))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # an error: stop what still runs before the temporary folder is deleted
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)


def _run_on_threads(tasks: list, workers: int) -> Iterator[dict]:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
    queue, pending = list(reversed(tasks)), set()
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                pending.add(pool.submit(write_shard, queue.pop()))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # what still runs finishes before the folder is deleted


def run_tasks(tasks: list) -> Iterator[dict]:
    """write_shard over tasks, as results arrive: Ray tasks when connected to Ray, else local threads."""
    if _ray_connected():
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        log.debug("prepare: %d shard tasks on the Ray cluster (%d CPUs)", len(tasks), cpus)
        return _run_on_ray(tasks, in_flight=max(2, 2 * cpus))
    return _run_on_threads(tasks, workers=max(1, min(MAX_THREADS, os.cpu_count() or 1)))


def _renumber(results: dict, tasks: list) -> dict:
    """Shard first_row_ids after skipped images, and rewrite the row_id of the shards that moved; counts back."""
    counts, next_id = {}, {}
    for task in tasks:
        split, rows = task["split"], results[task["index"]]["rows"]
        first = next_id.get(split, 0)
        if first != task["first_row_id"]:
            fs, path = storage.resolve(task["out"])
            table = pq.read_table(path, filesystem=fs)
            table = table.set_column(0, "row_id", pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)))
            pq.write_table(table, path, filesystem=fs)
        next_id[split] = first + rows
        counts[split] = counts.get(split, 0) + rows
    return counts


def write_imagefolder(cfg: DataConfig, tmp_uri: str, on_start: Optional[Callable[[int], None]] = None,
                      on_rows: Optional[Callable[[int], None]] = None) -> Streamed:
    """Write cfg's image folder as the prepared splits under ``tmp_uri`` (a local path or URI) in shard tasks."""
    from resnet_ray.data.prepare import carve_order, rows_per_shard

    listing = list_imagefolder(cfg)
    order = carve_order({split: labels for split, (_, labels) in listing.splits.items()}, cfg)
    per_shard = rows_per_shard(cfg.image_size)
    resize = ResizeSpec(cfg.image_size, cfg.resize).record()
    tasks = []
    for split, (source, index) in order.items():
        paths, labels = listing.splits[source]
        for shard, start in enumerate(range(0, max(len(index), 1), per_shard)):
            rows = index[start:start + per_shard]
            tasks.append({"index": len(tasks), "split": split, "paths": [paths[i] for i in rows],
                          "labels": labels[rows], "first_row_id": start, "stats": split == "train",
                          "out": storage.join(tmp_uri, split, f"part-{shard:05d}.parquet"),
                          "source": cfg.path, "root": listing.root, "scheme": listing.scheme,
                          "resize": resize, "on_bad_image": cfg.on_bad_image})
    for split in order:
        out_fs, out_path = storage.resolve(storage.join(tmp_uri, split))
        out_fs.create_dir(out_path, recursive=True)
    if on_start:
        on_start(sum(len(index) for _, index in order.values()))
    results = {}
    for result in run_tasks(tasks):
        if "error" in result:
            raise DataError(result["error"])
        results[result["index"]] = result
        if on_rows:
            on_rows(result["rows"] + len(result["bad"]))
    bad = sorted((b for r in results.values() for b in r["bad"]), key=lambda b: b["file"])
    counts = _renumber(results, tasks) if bad else {
        split: len(index) for split, (_, index) in order.items()}
    train = [results[i] for i in sorted(results) if results[i]["pixels"]]  # one summation order, any arrival
    n = sum(r["pixels"] for r in train)
    if not n:
        raise DataError(f"image folder {cfg.path}: no readable image in the train split")
    mean = np.sum([r["sum"] for r in train], axis=0) / n
    std = np.sqrt(np.maximum(np.sum([r["sum_sq"] for r in train], axis=0) / n - mean ** 2, 0))
    return Streamed(classes=listing.classes, counts=counts, mean=mean.tolist(), std=std.tolist(),
                    checksum=combine_digests(sum(r["digest"] for r in results.values())), bad_images=bad)
