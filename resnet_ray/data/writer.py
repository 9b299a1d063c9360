"""Streaming prepare: the driver holds names, row-group sizes and labels; parallel tasks decode and write shards.

The driver lists the source (names only, local or URI; for Parquet the footers and the label columns), carves
the splits from the labels alone (``layout.carve_order``: stratified, seeded) and cuts every split, in its
written order, into shards of ``layout.rows_per_shard`` rows. Tasks return only small figures (rows, pixel sums
for the train split's mean/std, the bad files they left out, their share of the source checksum).

- Image folders: one task per shard reads its files, decodes them to the stored size (``data.resize``) and writes
  ``<split>/part-NNNNN.parquet``.
- Parquet: a shard's rows are scattered over the source files, so the shuffle is external and bucketed. Stage
  tasks each decode a run of row groups (read in order) and write every decoded row into the staging bucket of
  its output shard; gather tasks then each read one bucket, order it and write the shard. Hash tasks checksum
  the source files meanwhile.

Exact duplicates (equal stored pixels) must stand in one split, but the carve happens before any image is decoded.
So every task also returns the pixel digest of each row it decoded (16 bytes a row); the driver then groups the
rows (``layout.duplicate_groups``) and keeps each group in one split (``layout.keep_together``). Where that moves
no row (a source without duplicates across splits: the usual case), the shards written are final and no image
was decoded twice. Otherwise the splits are written again in the corrected order (Parquet: staged again, before
any gather), which costs that source one more decoding pass.

Tasks run on the Ray cluster when this process is connected to one (jobs/train.py, jobs/evaluate.py,
jobs/prepare.py inside ``ray job submit``), else on a thread pool of this process; either way at most a few are in
flight, so memory stays bounded whatever the source size. The result is the same dataset, row for row, as
reading everything into memory (``imagefolder.read_imagefolder`` / ``parquet.read_parquet_source``, then
``prepare.carve_splits``), with the same checksum. What a write produced, streamed or in memory, is a
:class:`WrittenDataset`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data import layout
from resnet_ray.data.imagefolder import ImageFolderListing, list_imagefolder
from resnet_ray.data.layout import DataError
from resnet_ray.data.parquet import ParquetListing, list_parquet
from resnet_ray.data.shard_tasks import run_task
from resnet_ray.data.sources import combine_digests
from resnet_ray.watchdog import StallError, diagnose

log = logging.getLogger(__name__)

MAX_THREADS = 4  # local decoding threads (each holds one shard): bounds this process's memory
STALL_S = 1800.0  # no Ray task finished for this long: stop with a diagnosis instead of waiting forever


@dataclass
class WrittenDataset:
    """What writing the prepared splits produced (streamed or from memory): the figures metadata.json needs."""

    classes: list
    counts: dict
    mean: list
    std: list
    checksum: str
    bad_images: list = field(default_factory=list)
    coarse_classes: Optional[list] = None
    fine_to_coarse: Optional[list] = None
    duplicates: dict = field(default_factory=dict)  # metadata.json's count (layout.keep_together)


# ---------------------------------------------------------------------------
# running the tasks: on Ray when connected to it, else on local threads


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to learn that it is not running
    return bool(ray and ray.is_initialized())


def _run_on_ray(tasks: list, in_flight: int) -> Iterator[dict]:
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(run_task)
    pending, queue = [], list(reversed(tasks))
    try:
        while queue or pending:
            while queue and len(pending) < in_flight:
                pending.append(remote.remote(queue.pop()))
            done, pending = ray.wait(pending, num_returns=1, timeout=STALL_S)
            if not done:  # tasks that can never be scheduled (no CPU free on any node) must not hang the job
                raise StallError(f"prepare: no shard task finished in {STALL_S:.0f} s; {diagnose()}")
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
                pending.add(pool.submit(run_task, queue.pop()))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # what still runs finishes before the folder is deleted


def run_tasks(tasks: list) -> Iterator[dict]:
    """run_task over tasks, as results arrive: Ray tasks when connected to Ray, else local threads."""
    if _ray_connected():
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        log.debug("prepare: %d shard tasks on the Ray cluster (%d CPUs)", len(tasks), cpus)
        return _run_on_ray(tasks, in_flight=max(2, 2 * cpus))
    return _run_on_threads(tasks, workers=max(1, min(MAX_THREADS, os.cpu_count() or 1)))


def _drain(tasks: list, on_rows: Optional[Callable[[int], None]]) -> dict:
    """Run tasks; {index: result}; the first bad-image error (data.on_bad_image=error) raised as DataError."""
    results = {}
    for result in run_tasks(tasks):
        if "error" in result:
            raise DataError(result["error"])
        results[result["index"]] = result
        if on_rows and result["rows"] + len(result["bad"]):
            on_rows(result["rows"] + len(result["bad"]))
    return results


def _train_mean_std(results: dict, cfg: DataConfig) -> tuple[list, list]:
    """The train split's per-channel mean and std from the shards' exact pixel sums (other shards send none)."""
    return layout.mean_std(results.values(), f"{cfg.source} source {cfg.path}")


def _make_dirs(tmp_uri: str, splits) -> None:
    for split in splits:
        out_fs, out_path = storage.resolve(storage.join(tmp_uri, split))
        out_fs.create_dir(out_path, recursive=True)


def _kept_together(order: dict, labels: dict, parts) -> tuple[dict, dict]:
    """The final order of the splits (each group of exact duplicates in one split) and metadata.json's count,
    from the pixel digests that the tasks returned. ``parts``: (source split, its row indices, their digests,
    whether each decoded) of every task."""
    digests = {src: np.zeros((len(values), 16), dtype=np.uint8) for src, values in labels.items()}
    readable = {src: np.zeros(len(values), dtype=bool) for src, values in labels.items()}
    for source, rows, pixels, ok in parts:
        digests[source][rows], readable[source][rows] = pixels, ok
    final, record = layout.keep_together(order, layout.duplicate_groups(digests, readable), labels)
    if record["moved_rows"]:
        log.info(
            "%s moved to keep exact duplicates in one split: writing the splits again in that order",
            ", ".join(f"{n} row(s) into {split}" for split, n in record["moved_rows"].items()),
        )
    return final, record


# ---------------------------------------------------------------------------
# image folders


def _shard_tasks(
    cfg: DataConfig, listing: ImageFolderListing, order: dict, per_shard: int, tmp_uri: str
) -> tuple[list, list]:
    """(one image_shard task per output shard of every split, in the split's written order; each task's rows as
    (source splits, row indices), kept by the driver)."""
    resize = layout.resize_for(cfg).record()
    tasks, plans = [], []
    for split, rows in order.items():
        for shard, start in enumerate(range(0, max(len(rows.index), 1), per_shard)):
            source, index = rows.source[start : start + per_shard], rows.index[start : start + per_shard]
            tasks.append(
                {
                    "kind": "image_shard",
                    "index": len(tasks),
                    "split": split,
                    "paths": [listing.splits[str(src)][0][i] for src, i in zip(source, index)],
                    "labels": np.array([listing.splits[str(src)][1][i] for src, i in zip(source, index)], np.int64),
                    "first_row_id": start,
                    "stats": split == "train",
                    "out": storage.join(tmp_uri, split, f"part-{shard:05d}.parquet"),
                    "source": cfg.path,
                    "root": listing.root,
                    "resize": resize,
                    "on_bad_image": cfg.on_bad_image,
                }
            )
            plans.append((source, index))
    return tasks, plans


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


def _write_image_shards(
    cfg: DataConfig, listing: ImageFolderListing, order: dict, tmp_uri: str, on_rows: Optional[Callable[[int], None]]
) -> tuple[dict, list, list]:
    """Write every split of ``order`` as shards: (results by task index, tasks, the parts _kept_together reads)."""
    tasks, plans = _shard_tasks(cfg, listing, order, layout.rows_per_shard(cfg.image_size), tmp_uri)
    _make_dirs(tmp_uri, order)
    results = _drain(tasks, on_rows)
    parts = []
    for task, (source, index) in zip(tasks, plans):
        result = results[task["index"]]
        for src in np.unique(source):
            mask = source == src
            parts.append((str(src), index[mask], result["hashes"][mask], result["ok"][mask]))
    return results, tasks, parts


def write_imagefolder(
    cfg: DataConfig,
    tmp_uri: str,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> WrittenDataset:
    """Write cfg's image folder as the prepared splits under ``tmp_uri`` (a local path or URI) in shard tasks; a
    second time, in the corrected order, where exact duplicates stood in two splits (see the module docstring)."""
    listing = list_imagefolder(cfg)
    labels = {split: labels for split, (_, labels) in listing.splits.items()}
    order = layout.carve_order(labels, cfg)
    if on_start:
        on_start(sum(len(rows.index) for rows in order.values()))
    results, tasks, parts = _write_image_shards(cfg, listing, order, tmp_uri, on_rows)
    final, duplicates = _kept_together(order, labels, parts)
    if duplicates["moved_rows"]:
        for split in order:
            storage.delete_dir(storage.join(tmp_uri, split))
        results, tasks, _ = _write_image_shards(cfg, listing, final, tmp_uri, None)
    bad = sorted((b for r in results.values() for b in r["bad"]), key=lambda b: b["file"])
    counts = _renumber(results, tasks) if bad else {split: len(rows.index) for split, rows in final.items()}
    mean, std = _train_mean_std(results, cfg)
    return WrittenDataset(
        classes=listing.classes,
        counts=counts,
        mean=mean,
        std=std,
        checksum=combine_digests(sum(r["digest"] for r in results.values())),
        bad_images=bad,
        duplicates=duplicates,
    )


# ---------------------------------------------------------------------------
# Parquet: stage, then gather


def _runs(groups: list, per_task: int) -> Iterator[tuple[list, int, int]]:
    """(row groups, rows to skip, rows to take) of one file, about per_task rows each; a giant row group is
    read by several tasks, each taking its own slice."""
    run, rows = [], 0
    for g, n in enumerate(groups):
        if n > per_task:
            if run:
                yield run, 0, rows
                run, rows = [], 0
            for skip in range(0, n, per_task):
                yield [g], skip, min(per_task, n - skip)
            continue
        if rows + n > per_task and run:
            yield run, 0, rows
            run, rows = [], 0
        if n:
            run, rows = run + [g], rows + n
    if run:
        yield run, 0, rows


def _destinations(listing: ParquetListing, order: dict) -> tuple[dict, dict]:
    """({source split: output split code of each row, -1 for none}, {source split: row's position in it})."""
    dest_split = {src: np.full(len(labels), -1, dtype=np.int64) for src, labels in listing.labels.items()}
    dest_pos = {src: np.zeros(len(labels), dtype=np.int64) for src, labels in listing.labels.items()}
    for code, rows in enumerate(order.values()):
        for source in np.unique(rows.source):
            positions, index = rows.of(str(source))
            dest_split[str(source)][index] = code
            dest_pos[str(source)][index] = positions
    return dest_split, dest_pos


def _stage_tasks(cfg: DataConfig, listing: ParquetListing, order: dict, per_shard: int, staging: str) -> list:
    """A hash task per source file, then a stage task per run of about per_shard rows of each file (its rows:
    ``source_split``, ``source_rows`` = (first, count), which the driver reads with the task's pixel digests)."""
    dest_split, dest_pos = _destinations(listing, order)
    names = list(order)
    resize = layout.resize_for(cfg).record()
    tasks = [
        {"kind": "hash", "index": i, "path": path, "rel": listing.rel(path), "source": cfg.path}
        for i, path in enumerate(path for files in listing.files.values() for path, _ in files)
    ]
    for source, files in listing.files.items():
        offset, coarse = 0, listing.coarse[source]
        for path, groups in files:
            starts = np.concatenate([[0], np.cumsum(groups)]).astype(int)
            for run, skip, take in _runs(groups, per_shard):
                lo = offset + int(starts[run[0]]) + skip
                rows = slice(lo, lo + take)
                tasks.append(
                    {
                        "kind": "stage",
                        "index": len(tasks),
                        "path": path,
                        "groups": run,
                        "skip": skip,
                        "take": take,
                        "first_row": lo - offset,
                        "labels": listing.labels[source][rows],
                        "coarse": None if coarse is None else coarse[rows],
                        "dest_split": dest_split[source][rows],
                        "dest_pos": dest_pos[source][rows],
                        "splits": names,
                        "rows_per_shard": per_shard,
                        "staging": staging,
                        "chunk": len(tasks),
                        "image_column": cfg.image_column,
                        "resize": resize,
                        "on_bad_image": cfg.on_bad_image,
                        "source": cfg.path,
                        "source_split": source,
                        "source_rows": (lo, take),
                    }
                )
            offset += int(starts[-1])
    return tasks


def _staged_parts(tasks: list, staged: dict) -> list:
    """(source split, row indices, pixel digests, decoded) of every stage task, for _kept_together."""
    parts = []
    for task in tasks:
        if task["kind"] == "stage":
            result, (first, count) = staged[task["index"]], task["source_rows"]
            parts.append((task["source_split"], np.arange(first, first + count), result["hashes"], result["ok"]))
    return parts


def _gather_tasks(
    cfg: DataConfig, listing: ParquetListing, order: dict, bad: list, per_shard: int, staging: str, tmp_uri: str
) -> list:
    """A gather task per output shard of every split; ``bad``: the staged rows left out (with their position)."""
    gathers = []
    for split, rows in order.items():
        bad_positions = np.asarray([b["position"] for b in bad if b["split"] == split], dtype=np.int64)
        for shard in range(max(1, -(-len(rows.index) // per_shard))):
            gathers.append(
                {
                    "kind": "gather",
                    "index": len(gathers),
                    "staging": storage.join(staging, split, f"{shard:05d}"),
                    "out": storage.join(tmp_uri, split, f"part-{shard:05d}.parquet"),
                    "bad_positions": bad_positions,
                    "size": cfg.image_size,
                    "stats": split == "train",
                    "has_coarse": listing.coarse["train"] is not None,
                }
            )
    return gathers


def write_parquet(
    cfg: DataConfig,
    tmp_uri: str,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> WrittenDataset:
    """Write cfg's Parquet source as the prepared splits under ``tmp_uri``: stage, then gather; staged again in
    the corrected order, before any gather, where exact duplicates stood in two splits (see the module
    docstring)."""
    listing = list_parquet(cfg)
    order = layout.carve_order(listing.labels, cfg)
    per_shard = layout.rows_per_shard(cfg.image_size)
    staging = storage.join(tmp_uri, "_staging")
    tasks = _stage_tasks(cfg, listing, order, per_shard, staging)
    if on_start:
        on_start(sum(len(rows.index) for rows in order.values()))
    try:
        staged = _drain(tasks, on_rows)
        checksum = combine_digests(sum(r["digest"] for r in staged.values()))
        final, duplicates = _kept_together(order, listing.labels, _staged_parts(tasks, staged))
        if duplicates["moved_rows"]:
            storage.delete_dir(staging)
            again = [t for t in _stage_tasks(cfg, listing, final, per_shard, staging) if t["kind"] == "stage"]
            staged = _drain(again, None)
        bad = sorted((b for r in staged.values() for b in r["bad"]), key=lambda b: (b["split"], b["position"]))
        gathers = _gather_tasks(cfg, listing, final, bad, per_shard, staging, tmp_uri)
        _make_dirs(tmp_uri, final)
        results = _drain(gathers, None)
    finally:
        storage.delete_dir(staging)
    counts = {split: len(rows.index) - sum(b["split"] == split for b in bad) for split, rows in final.items()}
    mean, std = _train_mean_std(results, cfg)
    for b in bad:
        del b["position"]
    return WrittenDataset(
        classes=listing.classes,
        counts=counts,
        mean=mean,
        std=std,
        checksum=checksum,
        bad_images=bad,
        coarse_classes=listing.coarse_classes,
        fine_to_coarse=listing.fine_to_coarse,
        duplicates=duplicates,
    )
