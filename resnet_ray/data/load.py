"""Prepared splits as Ray Data datasets of uint8 HWC images and int64 labels."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np
import pyarrow as pa

from resnet_ray import storage
from resnet_ray.config import DataConfig
from resnet_ray.data.layout import pixel_array, read_metadata, split_rows
from resnet_ray.data.prepare import dataset_dir


def table_to_batch(table: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    """A canonical Parquet table -> {"row_id", "image", "label"[, "coarse_label"]} numpy batch."""
    batch = {name: table.column(name).to_numpy() for name in table.column_names if name != "image"}
    batch["image"] = pixel_array(table.column("image"), image_size)
    return batch


def quiet_data_progress() -> None:
    """No Ray Data progress bars, per-execution banners or INFO/WARNING lines on this process's console (they
    stay in Ray Data's own log file, ray-data.log of the session): the jobs report progress themselves."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # Ray Data configures its own console handler on its logger, which does not propagate. Only Ray's own handler
    # is quietened: others on that logger belong to whoever put them there (pytest attaches its log capture to
    # every non-propagating logger; raising its level would hide every later test's warnings)
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__module__.startswith("ray.") and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def load_split(cfg: DataConfig, split: str, prepared: Optional[str] = None):
    """Ray Data dataset of a prepared split: columns row_id, image (uint8 N x H x W x 3), label[, coarse_label].

    ``cfg.limit`` caps the rows (the first rows of the seeded random order written by prepare).
    Images stay uint8 at the source resolution: resizing happens on the training device.
    """
    import ray.data

    prepared = prepared or dataset_dir(cfg)
    metadata = read_metadata(prepared)
    split_rows(metadata, split, None)
    fs, path = storage.resolve(storage.join(prepared, split))
    size = metadata["image_size"]
    ds = ray.data.read_parquet(path, filesystem=fs)
    if cfg.limit:  # the first rows in file order (prepare wrote them in a seeded random order), every time
        ds.context.execution_options.preserve_order = True
        ds = ds.limit(cfg.limit)
    return ds.map_batches(
        table_to_batch, batch_format="pyarrow", fn_kwargs={"image_size": size}, zero_copy_batch=True, batch_size=None
    )


IN_MEMORY_BYTES = 256 * 2**20  # cached splits up to this size skip Ray Data's read job (see load_split_in_memory)


def split_nbytes(metadata: dict, split: str, limit: Optional[int]) -> int:
    """Bytes of a split's decoded images (uint8 H x W x 3 per row)."""
    return split_rows(metadata, split, limit) * metadata["image_size"] ** 2 * 3


def read_split(cfg: DataConfig, split: str, prepared: Optional[str] = None) -> Iterator[dict]:
    """A prepared split read by this process, one numpy batch per Parquet file in file order, ``cfg.limit``
    rows: the rows and order of ``load_split``, without Ray."""
    import pyarrow.parquet as pq

    prepared = prepared or dataset_dir(cfg)
    metadata = read_metadata(prepared)
    left = split_rows(metadata, split, cfg.limit)
    fs, path = storage.resolve(storage.join(prepared, split))
    for name in storage.list_names(storage.join(prepared, split)):
        if left <= 0:
            return
        if name.endswith(".parquet"):
            table = pq.read_table(f"{path}/{name}", filesystem=fs).slice(0, left)
            left -= table.num_rows
            yield table_to_batch(table, metadata["image_size"])


def load_split_in_memory(cfg: DataConfig, split: str, prepared: Optional[str] = None):
    """The same rows, columns and block order as ``load_split(...).materialize()`` (one block per Parquet file),
    read by this process and put into the object store directly: no Ray Data job, so no read tasks and worker
    processes to start. For small splits (``IN_MEMORY_BYTES``).

    ``ray.data.from_blocks``, not ``from_arrow``: the latter runs a metadata task per block, which waits forever
    when the cluster's CPUs are all taken (this computes the metadata here)."""
    import ray.data
    from ray.data.block import BlockAccessor

    return ray.data.from_blocks([BlockAccessor.batch_to_block(b) for b in read_split(cfg, split, prepared)])
