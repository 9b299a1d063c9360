import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_ray.config import DataConfig
from resnet_ray.data.load import load_split
from resnet_ray.data.prepare import ensure_prepared

pytestmark = pytest.mark.slow


def test_load_split_yields_uint8_images_and_every_row(ray_session, digits_prepared):
    cfg, prepared, meta = digits_prepared
    ds = load_split(cfg, "val", prepared)
    rows = 0
    seen = []
    for batch in ds.iter_torch_batches(batch_size=50):
        assert batch["image"].dtype.is_floating_point is False and str(batch["image"].dtype) == "torch.uint8"
        assert tuple(batch["image"].shape[1:]) == (32, 32, 3)
        rows += len(batch["label"])
        seen.extend(batch["row_id"].tolist())
    assert rows == meta["counts"]["val"] and sorted(seen) == list(range(rows))


def test_limit_caps_rows(ray_session, digits_prepared):
    cfg, prepared, _ = digits_prepared
    limited = DataConfig(source="digits", root=cfg.root, limit=37)
    assert load_split(limited, "train", prepared).count() == 37


def test_limit_takes_the_first_rows_of_a_split_in_several_files(ray_session, tmp_path, monkeypatch):
    """A limited split read from several Parquet files: always the same rows (row ids 0..limit-1), so that
    an evaluation of a run trained with data.limit covers exactly that run's rows."""
    from resnet_ray.data import layout

    monkeypatch.setattr(layout, "ROWS_PER_SHARD", 300)  # the 1,293 training rows in 5 files
    cfg = DataConfig(source="digits", root=str(tmp_path), limit=250)
    prepared, _ = ensure_prepared(cfg)
    ids = np.concatenate([b["row_id"] for b in load_split(cfg, "train", prepared).iter_batches(batch_size=64)])
    assert sorted(ids.tolist()) == list(range(250))


@pytest.mark.parametrize("limit", [None, 650])
def test_a_small_cached_split_read_in_memory_equals_the_materialized_ray_data_read(
    ray_session, tmp_path, monkeypatch, limit
):
    """The local mode's fast path (no Ray Data read job): the same blocks, rows in the same order, same
    columns and types as load_split(...).materialize(), also with a limit that ends inside the third file."""
    from resnet_ray.data import layout
    from resnet_ray.data.load import load_split_in_memory

    monkeypatch.setattr(layout, "ROWS_PER_SHARD", 300)  # the 1,293 training rows in 5 files
    cfg = DataConfig(source="digits", root=str(tmp_path), limit=limit)
    prepared, _ = ensure_prepared(cfg)
    read = load_split(cfg, "train", prepared)
    read.context.execution_options.preserve_order = True
    expected, got = read.materialize(), load_split_in_memory(cfg, "train", prepared)
    assert got.schema() == expected.schema()
    assert got.num_blocks() == (5 if limit is None else 3)
    a, b = expected.take_batch(2000), got.take_batch(2000)
    assert len(b["row_id"]) == (limit or 1293)
    for column in ("row_id", "label", "image"):
        np.testing.assert_array_equal(a[column], b[column])


def test_shared_cifar10_subset_prepares_and_loads(ray_session, shared_cifar10, tmp_path):
    """1,000 shuffled real CIFAR-10 training images (+200 test) through the parquet source and Ray Data."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 1000), ("test", 200)):
        table = pq.read_table(os.path.join(shared_cifar10, f"{split}.parquet"))
        pq.write_table(
            table.take(pa.array(np.sort(rng.choice(table.num_rows, n, replace=False)))), src / f"{split}.parquet"
        )
    (src / "classes.json").write_bytes(open(os.path.join(shared_cifar10, "classes.json"), "rb").read())

    cfg = DataConfig(source="parquet", path=str(src), name="cifar10-subset", root=str(tmp_path / "prepared"))
    prepared, meta = ensure_prepared(cfg)
    assert meta["classes"][:3] == ["airplane", "automobile", "bird"] and len(meta["classes"]) == 10
    assert meta["counts"]["train"] + meta["counts"]["val"] == 1000 and meta["counts"]["test"] == 200
    assert abs(meta["mean"][0] - 0.49) < 0.03  # real CIFAR-10 statistics, not noise

    # pixel-exact against a direct PNG decode of the same test rows
    direct = pq.read_table(src / "test.parquet").to_pydict()
    by_label_and_pixels = {}
    for png, label in zip(direct["image"], direct["label"]):
        by_label_and_pixels.setdefault(np.asarray(Image.open(io.BytesIO(png))).tobytes(), label)
    loaded = load_split(cfg, "test", prepared).take_all()
    assert len(loaded) == 200
    for row in loaded:
        assert by_label_and_pixels[row["image"].tobytes()] == row["label"]
    assert json.load(open(os.path.join(prepared, "metadata.json")))["source"] == "parquet"
