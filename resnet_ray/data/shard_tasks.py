"""The tasks of a streamed prepare (:mod:`resnet_ray.data.writer` plans and runs them): each is a function of a
small task dict that runs on a Ray worker or a local thread and returns small figures (rows, pixel sums, the bad
files left out, digests). ``run_task`` runs one of any kind."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.data import layout
from resnet_ray.data.layout import DataError
from resnet_ray.data.parquet import image_rows
from resnet_ray.data.sources import file_digest, read_file
from resnet_ray.images import BadImage, ResizeSpec


def _file_contents(fs, paths: list, root: str, digests: list) -> Iterator:
    """Each file's bytes in turn (a BadImage with the reason for one that cannot be read), appending its share
    of the source checksum to ``digests``."""
    for path in paths:
        try:
            content = read_file(fs, path)
        except OSError as exc:
            content = BadImage(f"cannot read ({exc})")
        digests.append(file_digest(path[len(root) :].lstrip("/"), None if isinstance(content, BadImage) else content))
        yield content


def write_shard(task: dict) -> dict:
    """One shard: read, decode and write ``task["paths"]`` (as one Parquet file); small figures back.

    Never raises for a bad image: under data.on_bad_image=error it returns {"error": message naming the file}.
    """
    fs, _ = storage.resolve(task["source"])
    resize = ResizeSpec.from_record(task["resize"], task["resize"]["size"])
    paths, labels, digests = task["paths"], np.asarray(task["labels"], dtype=np.int64), []
    try:
        decoded = layout.decode_batch(
            _file_contents(fs, paths, task["root"], digests),
            resize,
            task["on_bad_image"],
            lambda i: storage.display(task["source"], paths[i]),
            count=len(paths),
        )
    except DataError as exc:
        return {"error": str(exc)}
    images = decoded.good_images()
    table = layout.split_table(images, labels[decoded.kept], first_row_id=task["first_row_id"])
    out_fs, out_path = storage.resolve(task["out"])
    pq.write_table(table, out_path, filesystem=out_fs)
    return {
        "index": task["index"],
        "rows": len(images),
        "bad": decoded.bad_images(task["split"]),
        "digest": sum(digests),
        "hashes": layout.pixel_digests(decoded.images),
        "ok": decoded.ok,
        **layout.pixel_sums(images if task["stats"] else images[:0]),
    }


def hash_file(task: dict) -> dict:
    """A source file's share of the checksum, the file streamed (never held whole)."""
    fs, _ = storage.resolve(task["source"])
    digest = storage.stream_sha256(fs, task["path"]).digest()
    return {"rows": 0, "bad": [], "digest": file_digest(task["rel"], None, digest)}


def stage_rows(task: dict) -> dict:
    """Decode a run of a Parquet file's rows and write each into the staging bucket of its output shard."""
    fs, _ = storage.resolve(task["source"])
    resize = ResizeSpec.from_record(task["resize"], task["resize"]["size"])
    n, shown = task["take"], storage.display(task["source"], task["path"])
    codes, positions = np.asarray(task["dest_split"]), np.asarray(task["dest_pos"])
    rows = image_rows(fs, task["path"], task["groups"], task["skip"], n, task["image_column"])
    try:
        decoded = layout.decode_batch(
            itertools.chain.from_iterable(rows),
            resize,
            task["on_bad_image"],
            lambda i: f"{shown}: row {task['first_row'] + i}",
            count=n,
        )
    except DataError as exc:
        return {"error": str(exc)}
    read = int(decoded.ok.sum()) + len(decoded.bad)
    if read != n:
        raise RuntimeError(f"{task['path']}: read {read} rows of row groups {task['groups']}, expected {n}")
    bad = [
        {
            "split": task["splits"][codes[b.index]],
            "file": b.file,
            "reason": b.reason,
            "position": int(positions[b.index]),
        }
        for b in decoded.bad
    ]
    _write_buckets(task, decoded, codes, positions)
    return {
        "rows": int(decoded.ok.sum()),
        "bad": bad,
        "digest": 0,
        "hashes": layout.pixel_digests(decoded.images),
        "ok": decoded.ok,
    }


def _write_buckets(task: dict, decoded: layout.Decoded, codes: np.ndarray, positions: np.ndarray) -> None:
    """Every decoded row of a stage task into the staging bucket of its output shard (split code, shard number)."""
    ok, shard = decoded.ok, positions // task["rows_per_shard"]
    labels, coarse = np.asarray(task["labels"]), task["coarse"]
    for code, number in sorted(set(zip(codes[ok].tolist(), shard[ok].tolist()))):
        rows = np.flatnonzero(ok & (codes == code) & (shard == number))
        columns = {
            "position": pa.array(positions[rows]),
            "image": layout.pixel_column(decoded.images[rows]),
            "label": pa.array(labels[rows]),
        }
        if coarse is not None:
            columns["coarse_label"] = pa.array(np.asarray(coarse)[rows])
        out_fs, out = storage.resolve(
            storage.join(task["staging"], task["splits"][code], f"{number:05d}", f"{task['chunk']:06d}.parquet")
        )
        out_fs.create_dir(out.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.table(columns), out, filesystem=out_fs)


def gather_shard(task: dict) -> dict:
    """Read one output shard's staging bucket, order it by position and write the shard."""
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
        images = layout.pixel_array(table.column("image"), size)
        labels = table.column("label").to_numpy()
        coarse = table.column("coarse_label").to_numpy() if "coarse_label" in table.column_names else None
        first = int(positions[0]) - int(np.searchsorted(np.asarray(task["bad_positions"]), positions[0]))
    else:  # every row of this shard was a bad image (or the split is empty)
        images, labels, first = np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), 0
        coarse = np.zeros(0, np.int64) if task["has_coarse"] else None
    out_fs, out = storage.resolve(task["out"])
    pq.write_table(layout.split_table(images, labels, coarse, first), out, filesystem=out_fs)
    return {
        "index": task["index"],
        "rows": len(labels),
        "bad": [],
        "digest": 0,
        **layout.pixel_sums(images if task["stats"] else images[:0]),
    }


TASKS = {"image_shard": write_shard, "hash": hash_file, "stage": stage_rows, "gather": gather_shard}


def run_task(task: dict) -> dict:
    """One task of any kind (see TASKS); its result carries the task's index."""
    result = TASKS[task["kind"]](task)
    result.setdefault("index", task["index"])
    return result
