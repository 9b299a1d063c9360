"""Streaming prepare: the driver holds names, row-group sizes and labels; parallel tasks decode and write shards.

The driver lists the source (names only, local or URI; for Parquet the footers and the label columns), carves
the splits from the labels alone (``prepare.carve_order``: stratified, seeded) and cuts every split, in its
written order, into shards of ``prepare.rows_per_shard`` rows. Tasks return only small figures (rows, pixel sums
for the train split's mean/std, the bad files they left out, their share of the source checksum).

- Image folders: one task per shard reads its files, decodes them to the stored size (``data.resize``) and writes
  ``<split>/part-NNNNN.parquet``.
- Parquet: a shard's rows are scattered over the source files, so the shuffle is external and bucketed. Stage
  tasks each decode a run of row groups (read in order) and write every decoded row into the staging bucket of
  its output shard; gather tasks then each read one bucket, order it and write the shard. Hash tasks checksum
  the source files meanwhile.

Tasks run on the Ray cluster when this process is connected to one (jobs/train.py, jobs/evaluate.py,
jobs/prepare.py inside ``ray job submit``), else on a thread pool of this process; either way at most a few are in
flight, so memory stays bounded whatever the source size. The result is the same dataset, row for row, as
reading everything into memory (``files.read_imagefolder`` / ``files.read_parquet_source``, then
``prepare.carve_splits``), with the same checksum.
"""

from __future__ import annotations

import logging
import math
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
from resnet_ray.data.files import combine_digests, file_digest, image_blobs, list_imagefolder, list_parquet, read_file
from resnet_ray.data.images import BadImage, ResizeSpec, decode
from resnet_ray.data.sources import DataError, RawSplit

log = logging.getLogger(__name__)

MAX_THREADS = 4  # local decoding threads (each holds one shard): bounds this process's memory
STALL_S = 1800.0  # no Ray task finished for this long: stop with a diagnosis instead of waiting forever


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
        digest += file_digest(path[len(task["root"]) :].lstrip("/"), content)
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
    return {
        "index": task["index"],
        "rows": len(kept),
        "bad": bad,
        "digest": digest,
        **pixel_sums(images if task["stats"] else images[:0]),
    }


def pixel_sums(images: np.ndarray, chunk: int = 256) -> dict:
    """Exact per-channel sums of the uint8 values and of their squares (integers: no rounding, any order)."""
    total, total_sq = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for start in range(0, len(images), chunk):
        values = images[start : start + chunk].reshape(-1, 3).astype(np.int64)
        total += values.sum(0)
        total_sq += (values * values).sum(0)
    return {"sum": total.tolist(), "sum_sq": total_sq.tolist(), "pixels": int(np.prod(images.shape[:3]))}


def _shown(task: dict, path: str) -> str:
    return f"{task['scheme']}://{path}" if task["scheme"] else path


def hash_file(task: dict) -> dict:
    """A source file's share of the checksum, the file streamed (never held whole)."""
    fs, _ = storage.resolve(task["source"])
    digest = storage.stream_sha256(fs, task["path"]).digest()
    return {"rows": 0, "bad": [], "digest": file_digest(task["rel"], None, digest)}


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


def stage_rows(task: dict) -> dict:
    """Decode a run of a Parquet file's rows and write each into the staging bucket of its output shard."""
    fs, _ = storage.resolve(task["source"])
    spec = ResizeSpec.from_record(task["resize"], task["resize"]["size"])
    n = task["take"]
    images = np.empty((n, spec.size, spec.size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    bad, i = [], 0
    codes, positions = np.asarray(task["dest_split"]), np.asarray(task["dest_pos"])
    for blobs in image_rows(fs, task["path"], task["groups"], task["skip"], task["take"], task["image_column"]):
        for blob in blobs:
            where = f"{_shown(task, task['path'])}: row {task['first_row'] + i}"
            try:
                if blob is None:
                    raise BadImage("image is null")
                images[i] = decode(blob, spec)
                ok[i] = True
            except BadImage as exc:
                if task["on_bad_image"] != "skip":
                    return {"error": f"{where}: {exc}"}
                bad.append(
                    {
                        "split": task["splits"][codes[i]],
                        "file": where,
                        "reason": str(exc),
                        "position": int(positions[i]),
                    }
                )
            i += 1
    if i != n:
        raise RuntimeError(f"{task['path']}: read {i} rows of row groups {task['groups']}, expected {n}")
    labels, coarse = np.asarray(task["labels"]), task["coarse"]
    shard = positions // task["rows_per_shard"]
    for code, number in sorted(set(zip(codes[ok].tolist(), shard[ok].tolist()))):
        rows = np.flatnonzero(ok & (codes == code) & (shard == number))
        columns = {
            "position": pa.array(positions[rows]),
            "image": _fixed(images[rows]),
            "label": pa.array(labels[rows]),
        }
        if coarse is not None:
            columns["coarse_label"] = pa.array(np.asarray(coarse)[rows])
        out_fs, out = storage.resolve(
            storage.join(task["staging"], task["splits"][code], f"{number:05d}", f"{task['chunk']:06d}.parquet")
        )
        out_fs.create_dir(out.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.table(columns), out, filesystem=out_fs)
    return {"rows": int(ok.sum()), "bad": bad, "digest": 0}


def _fixed(images: np.ndarray) -> pa.Array:
    n, h, w, c = images.shape
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(h * w * c), n, [None, pa.py_buffer(np.ascontiguousarray(images))]
    )


def gather_shard(task: dict) -> dict:
    """Read one output shard's staging bucket, order it by position and write the shard."""
    import pyarrow.fs as pafs

    from resnet_ray.data.load import decode_images as pixels_of
    from resnet_ray.data.prepare import split_table

    fs, folder = storage.resolve(task["staging"])
    parts = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        if i.type == pafs.FileType.File
    )
    size = task["size"]
    if parts:
        table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts]).sort_by("position")
        positions = table.column("position").to_numpy()
        images = pixels_of(table.column("image"), size)
        labels = table.column("label").to_numpy()
        coarse = table.column("coarse_label").to_numpy() if "coarse_label" in table.column_names else None
        first = int(positions[0]) - int(np.searchsorted(np.asarray(task["bad_positions"]), positions[0]))
    else:  # every row of this shard was a bad image (or the split is empty)
        images, labels, first = np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), 0
        coarse = np.zeros(0, np.int64) if task["has_coarse"] else None
    out_fs, out = storage.resolve(task["out"])
    pq.write_table(split_table(RawSplit(images, labels, coarse), first), out, filesystem=out_fs)
    return {
        "index": task["index"],
        "rows": len(labels),
        "bad": [],
        "digest": 0,
        **pixel_sums(images if task["stats"] else images[:0]),
    }


TASKS = {"image_shard": write_shard, "hash": hash_file, "stage": stage_rows, "gather": gather_shard}


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
                from resnet_ray.watchdog import StallError, diagnose

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


def run_task(task: dict) -> dict:
    """One task of any kind (see TASKS); its result carries the task's index."""
    result = TASKS[task["kind"]](task)
    result.setdefault("index", task["index"])
    return result


def run_tasks(tasks: list) -> Iterator[dict]:
    """run_task over tasks, as results arrive: Ray tasks when connected to Ray, else local threads."""
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


def write_imagefolder(
    cfg: DataConfig,
    tmp_uri: str,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> Streamed:
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
            rows = index[start : start + per_shard]
            tasks.append(
                {
                    "kind": "image_shard",
                    "index": len(tasks),
                    "split": split,
                    "paths": [paths[i] for i in rows],
                    "labels": labels[rows],
                    "first_row_id": start,
                    "stats": split == "train",
                    "out": storage.join(tmp_uri, split, f"part-{shard:05d}.parquet"),
                    "source": cfg.path,
                    "root": listing.root,
                    "scheme": listing.scheme,
                    "resize": resize,
                    "on_bad_image": cfg.on_bad_image,
                }
            )
    for split in order:
        out_fs, out_path = storage.resolve(storage.join(tmp_uri, split))
        out_fs.create_dir(out_path, recursive=True)
    if on_start:
        on_start(sum(len(index) for _, index in order.values()))
    results = _drain(tasks, on_rows)
    bad = sorted((b for r in results.values() for b in r["bad"]), key=lambda b: b["file"])
    counts = _renumber(results, tasks) if bad else {split: len(index) for split, (_, index) in order.items()}
    mean, std = _mean_std(results, cfg)
    return Streamed(
        classes=listing.classes,
        counts=counts,
        mean=mean,
        std=std,
        checksum=combine_digests(sum(r["digest"] for r in results.values())),
        bad_images=bad,
    )


def _mean_std(results: dict, cfg: DataConfig) -> tuple[list, list]:
    """The train split's per-channel mean and std on [0, 1] from the shards' exact integer sums."""
    train = [r for r in results.values() if r.get("pixels")]
    n = sum(r["pixels"] for r in train)
    if not n:
        raise DataError(f"{cfg.source} source {cfg.path}: no readable image in the train split")
    total = [sum(r["sum"][c] for r in train) for c in range(3)]
    total_sq = [sum(r["sum_sq"][c] for r in train) for c in range(3)]
    mean = [t / (255.0 * n) for t in total]
    std = [math.sqrt(max(sq / (255.0**2 * n) - m * m, 0.0)) for sq, m in zip(total_sq, mean)]
    return mean, std


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


def write_parquet(
    cfg: DataConfig,
    tmp_uri: str,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> tuple[Streamed, Optional[list], Optional[list]]:
    """Write cfg's Parquet source as the prepared splits under ``tmp_uri``: stage, then gather (see the module
    docstring). Returns (figures, coarse classes, fine -> coarse)."""
    from resnet_ray.data.prepare import carve_order, rows_per_shard

    listing = list_parquet(cfg)
    order = carve_order(listing.labels, cfg)
    names = list(order)
    per_shard = rows_per_shard(cfg.image_size)
    dest_split = {src: np.full(len(labels), -1, dtype=np.int64) for src, labels in listing.labels.items()}
    dest_pos = {src: np.zeros(len(labels), dtype=np.int64) for src, labels in listing.labels.items()}
    for code, (source, index) in enumerate(order.values()):
        dest_split[source][index] = code
        dest_pos[source][index] = np.arange(len(index))
    staging = storage.join(tmp_uri, "_staging")
    common = {"source": cfg.path, "scheme": listing.scheme}
    tasks = [
        {"kind": "hash", "index": i, "path": path, "rel": listing.rel(path), **common}
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
                        "resize": ResizeSpec(cfg.image_size, cfg.resize).record(),
                        "on_bad_image": cfg.on_bad_image,
                        **common,
                    }
                )
            offset += int(starts[-1])
    del dest_split, dest_pos
    if on_start:
        on_start(sum(len(index) for _, index in order.values()))
    try:
        staged = _drain(tasks, on_rows)
        bad = sorted((b for r in staged.values() for b in r["bad"]), key=lambda b: (b["split"], b["position"]))
        gathers = []
        for split, (_, index) in order.items():
            bad_positions = np.asarray([b["position"] for b in bad if b["split"] == split], dtype=np.int64)
            for shard in range(max(1, -(-len(index) // per_shard))):
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
            out_fs, out = storage.resolve(storage.join(tmp_uri, split))
            out_fs.create_dir(out, recursive=True)
        results = _drain(gathers, None)
    finally:
        storage.delete_dir(staging)
    counts = {split: len(index) - sum(b["split"] == split for b in bad) for split, (_, index) in order.items()}
    mean, std = _mean_std(results, cfg)
    for b in bad:
        del b["position"]
    checksum = combine_digests(sum(r["digest"] for r in staged.values()))
    return (
        Streamed(classes=listing.classes, counts=counts, mean=mean, std=std, checksum=checksum, bad_images=bad),
        listing.coarse_classes,
        listing.fine_to_coarse,
    )
