"""Batch prediction for unlabeled images: inputs -> Ray Data (read + decode tasks, Predictor actors) -> Parquet.

Inputs are a folder or glob of image files, or a Parquet file or folder with an image column (encoded bytes, or
a ``{bytes, path}`` struct), local or URI. The driver holds only file names (and Parquet row-group sizes); reading
and decoding run as Ray Data tasks, prediction on an actor pool with the evaluation's ``Predictor``. Every image
is brought to the stored size by the resize policy of the model's training data (``model.json``), so new images
are seen exactly as the training images were.

The probabilities are calibrated by the model's temperature (model.json; ``calibrated=False``: the raw softmax;
the classes and their order are the same either way), and with ``eval.tta: flip`` they are the mean over each
image and its mirror. The output Parquet has one row per input row (``row_id`` = the input order), with the
temperature applied (column ``temperature``), written to a temporary file and published atomically only after
every row id came back exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from resnet_ray import run_folder, storage
from resnet_ray.config import Config
from resnet_ray.data.layout import DataError, decode_batch
from resnet_ray.data.load import quiet_data_progress
from resnet_ray.data.sources import walk
from resnet_ray.images import IMAGE_EXTENSIONS, BadImage, ResizeSpec
from resnet_ray.metrics import RowCoverage
from resnet_ray.resources import alive_nodes, size_actor_pool
from resnet_ray.saved_model import SavedModel

log = logging.getLogger(__name__)

FILES_PER_TASK = 64  # image files read and decoded per Ray Data task
ROWS_PER_READ = 1024  # Parquet rows read and decoded per Ray Data task (a bigger row group is read in slices)
_GLOB_CHARS = re.compile(r"[*?\[]")


class PredictionError(RuntimeError):
    """The prediction did not cover its input exactly once."""


@dataclass(frozen=True)
class Inputs:
    """What the driver knows of an input: its kind and one item per image file or Parquet row group."""

    kind: str  # "files" | "parquet"
    items: list  # files: {"row_id", "path"}; parquet: {"row_id", "path", "row_group", "row", "skip", "take"} of
    # a slice of a row group (row_id and row: of its first row)
    rows: int  # input rows (images) in all


# ---------------------------------------------------------------------------
# listing (driver: names only)


def _inner(path: str) -> str:
    """A displayed path -> the path inside its filesystem."""
    return path.split("://", 1)[1] if storage.is_uri(path) else path


def glob_regex(pattern: str) -> re.Pattern:
    """A glob -> regex: ``*`` and ``?`` stay within one folder, ``**/`` spans any number of folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out, i = out + re.escape("["), i + 1
            else:
                out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _files_below(fs: pafs.FileSystem, base: str) -> list[str]:
    """Every visible file below ``base`` (hidden entries and ``_*`` skipped), links to folders not followed (they
    could lead into a loop: :func:`resnet_ray.data.sources.walk`), in path order."""
    try:
        return [e.path for e in walk(fs, base, hidden=(".", "_")) if e.kind == "file"]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DataError(f"--input {base}: cannot list ({exc})") from None


def _list_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted file paths inside it) that ``path`` names: a file, a folder (recursively, hidden
    entries skipped) or a glob."""
    match = _GLOB_CHARS.search(path)
    if match:
        head = path[: match.start()]
        base, rest = (head.rsplit("/", 1)[0], path[len(head.rsplit("/", 1)[0]) :]) if "/" in head else (".", path)
        fs, fs_base = storage.resolve(base or "/")
        fs_pattern = fs_base.rstrip("/") + "/" + rest.lstrip("/")
        regex = glob_regex(fs_pattern)
        found = [p for p in _files_below(fs, fs_base) if regex.match(p)]
        if not found:
            raise DataError(f"--input {path}: no file matches")
        return fs, sorted(found)
    fs, fs_path = storage.resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--input {path}: not found")
    if info.type == pafs.FileType.File:
        return fs, [fs_path]
    return fs, _files_below(fs, fs_path)


def _row_groups(fs: pafs.FileSystem, files: list[str], path: str, image_column: str) -> tuple[list[dict], int]:
    """(one item per non-empty row group of each Parquet file, total rows), from the footers only; checks that
    every file has the image column."""
    items, row_id = [], 0
    for file in files:
        shown = storage.display(path, file)
        try:
            with fs.open_input_file(file) as f:
                pf = pq.ParquetFile(f)
                names, meta = pf.schema_arrow.names, pf.metadata
        except Exception as exc:
            raise DataError(f"{shown}: not a readable Parquet file ({exc})") from None
        if image_column not in names:
            raise DataError(f"{shown}: no image column {image_column!r} (--image-column); columns: {', '.join(names)}")
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            for skip in range(0, rows, ROWS_PER_READ):  # a big row group is read in slices by several tasks
                items.append(
                    {
                        "row_id": row_id + skip,
                        "path": shown,
                        "row_group": group,
                        "row": first + skip,
                        "skip": skip,
                        "take": min(ROWS_PER_READ, rows - skip),
                    }
                )
            row_id, first = row_id + rows, first + rows
    return items, row_id


def list_inputs(path: str, image_column: str = "image") -> Inputs:
    """The images ``path`` names: image files (a folder, a glob, one file) or Parquet file(s), not both."""
    fs, files = _list_files(path)
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if parquet and images:
        raise DataError(
            f"--input {path}: holds both Parquet files ({storage.display(path, parquet[0])}, ...) and image "
            f"files ({storage.display(path, images[0])}, ...); point it at one kind"
        )
    if parquet:
        items, rows = _row_groups(fs, parquet, path, image_column)
        return Inputs("parquet", items, rows)
    if not images:
        raise DataError(
            f"--input {path}: no image files ({', '.join(IMAGE_EXTENSIONS[:6])}, ...) or Parquet files found"
        )
    return Inputs("files", [{"row_id": i, "path": storage.display(path, f)} for i, f in enumerate(images)], len(images))


# ---------------------------------------------------------------------------
# read + decode (Ray Data tasks)


def _decoded(blobs: list, spec: dict) -> tuple[np.ndarray, list]:
    """(images (N, S, S, 3) uint8, error strings: "" where the image is fine) of encoded blobs (None: missing)."""
    decoded = decode_batch(blobs, ResizeSpec.from_record(spec, spec["size"]), on_bad_image="skip")
    errors = [""] * len(blobs)
    for bad in decoded.bad:
        errors[bad.index] = bad.reason
    return decoded.images, errors


def read_image_files(batch: dict, spec: dict, base: str) -> dict:
    """Ray Data batch function: {row_id, path} -> {row_id, path, row, image, error}."""
    fs, _ = storage.resolve(base)
    blobs = []
    for path in batch["path"]:
        try:
            with fs.open_input_stream(_inner(str(path))) as f:
                blobs.append(f.readall())
        except Exception as exc:  # vanished, unreadable: the bad-image policy decides
            blobs.append(BadImage(f"cannot read ({type(exc).__name__}: {exc})"))
    images, errors = _decoded(blobs, spec)
    return {
        "row_id": np.asarray(batch["row_id"], dtype=np.int64),
        "path": np.asarray(batch["path"], dtype=object),
        "row": np.full(len(blobs), -1, dtype=np.int64),
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }


def read_row_groups(batch: dict, spec: dict, base: str, image_column: str) -> dict:
    """Ray Data batch function: slices of Parquet row groups {row_id, path, row_group, row, skip, take} -> one
    output row per image."""
    from resnet_ray.data.parquet import image_rows

    fs, _ = storage.resolve(base)
    parts = []
    for row_id, path, group, first, skip, take in zip(
        batch["row_id"], batch["path"], batch["row_group"], batch["row"], batch["skip"], batch["take"]
    ):
        blobs = [
            b
            for chunk in image_rows(fs, _inner(str(path)), [int(group)], int(skip), int(take), image_column)
            for b in chunk
        ]
        images, errors = _decoded([BadImage("image is null") if b is None else b for b in blobs], spec)
        n = len(errors)
        parts.append(
            {
                "row_id": int(row_id) + np.arange(n, dtype=np.int64),
                "path": np.full(n, str(path), dtype=object),
                "row": int(first) + np.arange(n, dtype=np.int64),
                "image": images,
                "error": np.asarray(errors, dtype=object),
            }
        )
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------
# prediction (Ray Data actors)


class ImagePredictor:
    """The evaluation's Predictor on the decodable rows of a batch; rows with an error pass through unpredicted."""

    def __init__(self, model_path: str, threads: int, k: int, calibrated: bool = True, tta: str = "none"):
        from resnet_ray.predictor import Predictor

        self.predictor = Predictor(model_path, threads=threads, k=k, probabilities=True, calibrated=calibrated, tta=tta)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        n, k = len(ok), self.predictor.k
        out = {key: batch[key] for key in ("row_id", "path", "row", "error")}
        out["pred"] = np.full(n, -1, dtype=np.int64)
        out["top5"] = np.full((n, k), -1, dtype=np.int64)
        out["top_probs"] = np.zeros((n, k), dtype=np.float64)
        if ok.any():
            predicted = self.predictor({"image": batch["image"][ok]})
            for key in ("pred", "top5", "top_probs"):
                out[key][ok] = predicted[key]
        return out


def default_output(model_path: str, input_path: str) -> str:
    """<run>/predict-<input name>.parquet (beside eval-<split>), else <model folder>/predict-<input name>.parquet."""
    name = re.sub(
        r"[^A-Za-z0-9_.-]+",
        "_",
        posixpath.basename(_GLOB_CHARS.split(input_path.rstrip("/"))[0].rstrip("/")) or "input",
    )
    return run_folder.default_output(model_path, f"predict-{name.removesuffix('.parquet') or 'input'}.parquet")


def _stream(
    cfg: Config,
    inputs: Inputs,
    model_folder: str,
    spec: ResizeSpec,
    base: str,
    k: int,
    image_column: str,
    calibrated: bool = True,
):
    import ray.data

    fn_kwargs = {"spec": spec.record(), "base": base}
    blocks = max(1, math.ceil(len(inputs.items) / FILES_PER_TASK)) if inputs.kind == "files" else len(inputs.items)
    # no more actors than input blocks: an actor without a block would only load the model
    pool = size_actor_pool(
        min(cfg.eval.num_actors, blocks), cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor, alive_nodes()
    )
    if inputs.kind == "files":
        decoded = ray.data.from_items(inputs.items, override_num_blocks=blocks).map_batches(
            read_image_files, fn_kwargs=fn_kwargs, batch_size=FILES_PER_TASK, batch_format="numpy"
        )
    else:
        decoded = ray.data.from_items(inputs.items, override_num_blocks=blocks).map_batches(
            read_row_groups, fn_kwargs={**fn_kwargs, "image_column": image_column}, batch_size=1, batch_format="numpy"
        )
    from resnet_ray.predictor import on_actor_pool

    kwargs = {"model_path": model_folder, "k": k, "calibrated": calibrated, "tta": cfg.eval.tta}
    return on_actor_pool(decoded, ImagePredictor, kwargs, cfg.eval, pool, "prediction")


def _where(batch: dict, i: int, kind: str) -> str:
    return f"{batch['path'][i]}: row {batch['row'][i]}" if kind == "parquet" else str(batch["path"][i])


def _table(batch: dict, classes: list, sha: str, kind: str, temperature: float = 1.0) -> pa.Table:
    ok = batch["pred"] >= 0
    names = np.asarray(classes, dtype=object)
    top = [list(names[t]) if good else [] for t, good in zip(batch["top5"], ok)]
    probs = [list(p) if good else [] for p, good in zip(batch["top_probs"], ok)]
    n = len(ok)
    columns = {
        "row_id": pa.array(batch["row_id"], pa.int64()),
        "path": pa.array(list(batch["path"]), pa.string()),
        "row": pa.array(batch["row"], pa.int64(), mask=np.full(n, kind != "parquet")),
        "pred": pa.array(batch["pred"], pa.int64(), mask=~ok),
        "class": pa.array([names[p] if good else None for p, good in zip(batch["pred"], ok)], pa.string()),
        "top_classes": pa.array(top, pa.list_(pa.string())),
        "top_probs": pa.array(probs, pa.list_(pa.float64())),
        "error": pa.array([None if good else str(e) for e, good in zip(batch["error"], ok)], pa.string()),
        "model_sha256": pa.array([sha] * n, pa.string()),
        "temperature": pa.array(np.full(n, temperature), pa.float64()),
    }
    return pa.table(columns)


def _consume(
    batches,
    path: str,
    inputs: Inputs,
    classes: list,
    sha: str,
    on_bad_image: str,
    on_rows: Optional[Callable[[int], None]],
    temperature: float = 1.0,
) -> list[dict]:
    """Write prediction batches to the local Parquet file ``path``; returns the skipped rows [{file, reason}].

    Raises DataError at the first bad image under on_bad_image=error, PredictionError unless every row id
    0..rows-1 came back exactly once.
    """
    coverage = RowCoverage(inputs.rows, PredictionError, "input row", "input")
    skipped, writer = [], None
    try:
        for batch in batches:
            ids = batch["row_id"]
            coverage.add(ids)
            for i in np.flatnonzero(batch["pred"] < 0):
                if on_bad_image == "error":
                    raise DataError(
                        f"{_where(batch, i, inputs.kind)}: {batch['error'][i]} (data.on_bad_image=error; "
                        f"--data.on_bad_image skip leaves such images out of the predictions)"
                    )
                skipped.append({"file": _where(batch, i, inputs.kind), "reason": str(batch["error"][i])})
            table = _table(batch, classes, sha, inputs.kind, temperature)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            if on_rows:
                on_rows(len(ids))
    finally:
        if writer:
            writer.close()
    coverage.finish()
    if writer is None:  # an input of zero rows (empty Parquet files): an empty table of the same schema
        pq.write_table(
            _table(
                {
                    "row_id": np.zeros(0, np.int64),
                    "path": [],
                    "row": np.zeros(0, np.int64),
                    "pred": np.zeros(0, np.int64),
                    "top5": [],
                    "top_probs": [],
                    "error": [],
                },
                classes,
                sha,
                inputs.kind,
                temperature,
            ),
            path,
        )
    return skipped


def predict(
    cfg: Config,
    model_path: str,
    input_path: str,
    output: Optional[str] = None,
    k: int = 5,
    image_column: Optional[str] = None,
    calibrated: bool = True,
    on_start: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[int], None]] = None,
) -> dict:
    """Predict the top-k classes of every image of ``input_path`` with the model at ``model_path``.

    ``cfg``: the model's config (eval.* sizes the actor pool, eval.tta, data.on_bad_image decides about
    undecodable images). ``calibrated``: probabilities at the model's temperature (model.json), else the raw
    softmax. ``on_start(rows)`` / ``on_rows(n)`` report progress. Returns {"output", "rows", "predicted",
    "skipped" ([{file, reason}]), "seconds", "images_per_s", "model_sha256", "resize", "calibrated",
    "temperature" (the one applied), "tta"}.
    """
    saved = SavedModel.verified(model_path)  # local weights checked before the actors load them
    folder, spec = saved.folder, saved.resize(cfg)
    if saved.info.get("resize") and cfg.data.resize != spec.policy:
        log.warning(
            "data.resize %s ignored: images are resized like the model's training data (%s, recorded in "
            "its model.json)",
            cfg.data.resize,
            spec.policy,
        )
    sha = saved.sha256
    temperature = saved.temperature if calibrated else 1.0
    classes = saved.classes
    if k < 1:
        raise DataError(f"--top-k must be >= 1, got {k}")
    inputs = list_inputs(input_path, image_column or cfg.data.image_column)
    output = output or default_output(model_path, input_path)
    log.info(
        "predicting %d images of %s with %s (%s at %d px) -> %s",
        inputs.rows,
        input_path,
        folder,
        spec.policy,
        spec.size,
        output,
    )
    if on_start:
        on_start(inputs.rows)
    # where the read tasks open their filesystem: the input's folder part (a URI keeps its scheme and options)
    base = _GLOB_CHARS.split(input_path)[0] if storage.is_uri(input_path) else "/"
    quiet_data_progress()  # the caller shows progress (on_start / on_rows); Ray Data's own lines go to its log
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resnet_ray-predict-") as tmp:
        local = os.path.join(tmp, "predictions.parquet")
        column = image_column or cfg.data.image_column
        stream = (
            _stream(cfg, inputs, storage.normalize(folder), spec, base, k, column, calibrated)
            if inputs.rows
            else iter(())
        )
        skipped = _consume(stream, local, inputs, classes, sha, cfg.data.on_bad_image, on_rows, temperature)
        seconds = time.perf_counter() - start
        storage.upload_file(local, output)
    if skipped:
        log.warning(
            "%d image(s) could not be read and have no prediction (data.on_bad_image=skip), e.g. %s: %s; "
            "their rows in %s say why (column error)",
            len(skipped),
            skipped[0]["file"],
            skipped[0]["reason"],
            output,
        )
    return {
        "output": output,
        "rows": inputs.rows,
        "predicted": inputs.rows - len(skipped),
        "skipped": skipped,
        "seconds": seconds,
        "images_per_s": inputs.rows / seconds if seconds > 0 else 0.0,
        "model_sha256": sha,
        "resize": spec.record(),
        "calibrated": calibrated,
        "temperature": temperature,
        "tta": cfg.eval.tta,
    }
