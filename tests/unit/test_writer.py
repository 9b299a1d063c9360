"""Streaming prepare of image folders and Parquet sources (resnet_ray.data.writer) on local threads: the same
dataset, row for row, as reading everything into memory; only names and labels in the calling thread; contiguous
row ids after skipped images."""

import glob
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder as make_folder
from conftest import make_parquet_source

from resnet_ray.config import DataConfig
from resnet_ray.data import imagefolder, layout, parquet, shard_tasks, writer
from resnet_ray.data import prepare as prep
from resnet_ray.data.load import table_to_batch

S = 16


def read_split(prepared, split):
    parts = sorted(glob.glob(os.path.join(prepared, split, "*.parquet")))
    return parts, table_to_batch(pa.concat_tables([pq.read_table(p) for p in parts]), S)


@pytest.fixture(autouse=True)
def local_threads(monkeypatch):
    """The local thread pool even where an earlier test of the session connected to Ray."""
    monkeypatch.setattr(writer, "_ray_connected", lambda: False)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(layout, "rows_per_shard", lambda size: 4)  # several shards per split


def test_streamed_prepare_equals_the_in_memory_dataset(tmp_path, small_shards, monkeypatch):
    source = make_folder(tmp_path / "src")
    cfg = DataConfig(source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S)
    reads = []
    real_read = shard_tasks.read_file
    monkeypatch.setattr(
        shard_tasks, "read_file", lambda fs, p: reads.append(threading.current_thread().name) or real_read(fs, p)
    )
    progress = []
    prepared = prep.prepare(cfg, on_start=lambda n: progress.append(("start", n)), on_rows=lambda n: progress.append(n))
    meta = prep.read_metadata(prepared)
    # the image bytes are read in the worker threads only: the caller holds names and labels
    assert len(reads) == 36 and all(name.startswith("prepare") for name in reads)
    assert progress[0] == ("start", 36) and sum(progress[1:]) == 36

    raw = imagefolder.read_imagefolder(cfg)
    expected = prep.carve_splits(raw, cfg)
    assert meta["source_checksum"] == raw.checksum
    assert meta["counts"] == {name: len(split.labels) for name, split in expected.items()}
    for name, split in expected.items():
        parts, batch = read_split(prepared, name)
        assert len(parts) == -(-len(split.labels) // 4)
        np.testing.assert_array_equal(batch["image"], split.images)
        np.testing.assert_array_equal(batch["label"], split.labels)
        assert batch["row_id"].tolist() == list(range(len(split.labels)))
    pixels = expected["train"].images.reshape(-1, 3) / 255.0
    mean, std = pixels.mean(0), pixels.std(0)
    np.testing.assert_allclose(meta["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(meta["std"], std, rtol=1e-10)


def test_skipped_images_leave_contiguous_row_ids_across_shards(tmp_path, small_shards):
    source = make_folder(tmp_path / "src", corrupt={(0, 3), (2, 5)})
    cfg = DataConfig(
        source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S, on_bad_image="skip"
    )
    meta = prep.read_metadata(prep.prepare(cfg))
    assert meta["bad_images"]["count"] == 2
    assert [b["file"] for b in meta["bad_images"]["files"]] == [
        str(source / "train" / "class0" / "03.png"),
        str(source / "train" / "class2" / "05.png"),
    ]
    assert sum(meta["counts"].values()) == 36 - 2
    for name, count in meta["counts"].items():
        _, batch = read_split(prep.dataset_dir(cfg), name)
        assert batch["row_id"].tolist() == list(range(count))


def test_file_uri_source_names_files_by_uri(tmp_path):
    source = make_folder(tmp_path / "src", corrupt={(1, 0)})
    cfg = DataConfig(source="imagefolder", path=source.as_uri(), root=str(tmp_path / "root"), image_size=S)
    with pytest.raises(Exception, match=f"file://{source}/train/class1/00.png: cannot decode image"):
        prep.prepare(cfg)
    assert not glob.glob(str(tmp_path / "root" / "*" / "*.tmp-*"))


def test_streamed_parquet_equals_the_in_memory_dataset(tmp_path, small_shards):
    source = make_parquet_source(tmp_path / "src")
    cfg = DataConfig(
        source="parquet",
        path=str(source),
        root=str(tmp_path / "root"),
        image_size=S,
        coarse_label_column="coarse",
        val_fraction=0.25,
    )
    prepared = prep.prepare(cfg)
    meta = prep.read_metadata(prepared)
    raw = parquet.read_parquet_source(cfg)
    expected = prep.carve_splits(raw, cfg)
    assert meta["source_checksum"] == raw.checksum and meta["fine_to_coarse"] == [0, 0, 1]
    assert meta["counts"] == {name: len(split.labels) for name, split in expected.items()}
    for name, split in expected.items():
        _, batch = read_split(prepared, name)
        np.testing.assert_array_equal(batch["image"], split.images)
        np.testing.assert_array_equal(batch["label"], split.labels)
        np.testing.assert_array_equal(batch["coarse_label"], split.coarse_labels)
        assert batch["row_id"].tolist() == list(range(len(split.labels)))
    assert not glob.glob(os.path.join(prepared, "_staging"))  # the staging buckets are gone


def test_streamed_parquet_skips_bad_rows_with_contiguous_row_ids(tmp_path, small_shards):
    source = make_parquet_source(tmp_path / "src", corrupt_rows={4, 15})
    cfg = DataConfig(
        source="parquet",
        path=str(source),
        root=str(tmp_path / "root"),
        image_size=S,
        on_bad_image="skip",
        val_fraction=0.25,
    )
    meta = prep.read_metadata(prep.prepare(cfg))
    assert sorted(b["file"] for b in meta["bad_images"]["files"]) == [
        f"{source / 'train-00000.parquet'}: row 4",
        f"{source / 'train-00001.parquet'}: row 2",
    ]
    assert sum(meta["counts"].values()) == 30 - 2
    for name, count in meta["counts"].items():
        _, batch = read_split(prep.dataset_dir(cfg), name)
        assert batch["row_id"].tolist() == list(range(count))
    with pytest.raises(Exception, match=r"train-0000[01]\.parquet: row [42]: cannot decode image"):
        prep.prepare(DataConfig(source="parquet", path=str(source), root=str(tmp_path / "root2"), image_size=S))
