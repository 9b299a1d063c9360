"""Honest splits (issue 23): links in an image folder neither multiply nor relabel images, and exact duplicates
(equal stored pixels) never stand in two splits, in memory and streamed alike, counted in metadata.json."""

import glob
import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder, make_parquet_source
from PIL import Image

from resnet_ray.config import DataConfig
from resnet_ray.data import imagefolder, layout, parquet, shard_tasks, writer
from resnet_ray.data import prepare as prep
from resnet_ray.data.layout import DataError, SplitRows
from resnet_ray.data.load import table_to_batch
from resnet_ray.data.sources import RawDataset, RawSplit

S = 16


@pytest.fixture(autouse=True)
def local_threads(monkeypatch):
    monkeypatch.setattr(writer, "_ray_connected", lambda: False)
    monkeypatch.setattr(layout, "rows_per_shard", lambda size: 4)  # several shards per split


def read_split(prepared, split):
    parts = sorted(glob.glob(os.path.join(prepared, split, "*.parquet")))
    return table_to_batch(pa.concat_tables([pq.read_table(p) for p in parts]), S)


def split_digests(prepared) -> dict:
    """{split: set of the pixel digests of its rows}."""
    meta = prep.read_metadata(prepared)
    return {
        split: {bytes(d) for d in layout.pixel_digests(read_split(prepared, split)["image"])}
        for split in meta["counts"]
    }


def assert_no_image_in_two_splits(prepared):
    digests = split_digests(prepared)
    names = list(digests)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not digests[a] & digests[b], f"an image stands in {a} and {b}"


def listing_of(path) -> dict:
    listing = imagefolder.list_imagefolder(DataConfig(source="imagefolder", path=str(path)))
    return {split: (paths, labels.tolist()) for split, (paths, labels) in listing.splits.items()}


# ---------------------------------------------------------------------------
# links


def test_a_link_loop_and_a_link_out_of_the_source_neither_multiply_nor_relabel(tmp_path, caplog):
    source = make_image_folder(tmp_path / "src")
    before = listing_of(source)
    outside = tmp_path / "elsewhere"
    shutil.copytree(source / "train" / "class2", outside)
    os.symlink(source / "train", source / "train" / "class0" / "loop")  # the class folder's parent: a loop
    os.symlink(outside, source / "train" / "class1" / "more")  # out of the source
    assert listing_of(source) == before
    assert "not following 2 link(s) to folders" in caplog.text
    cfg = DataConfig(source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S)
    meta = prep.read_metadata(prep.prepare(cfg))
    assert sum(meta["counts"].values()) == 36  # 30 train + 6 test images, each once
    np.testing.assert_array_equal(
        np.sort(np.concatenate([read_split(prep.dataset_dir(cfg), s)["label"] for s in ("train", "val")])),
        np.repeat([0, 1, 2], [9, 11, 10]),
    )
    assert [e for e in prep.source_files(str(source)) if "/loop/" in e[0] or "/more/" in e[0]] == []


def test_a_class_folder_that_is_a_link_is_refused_in_one_line(tmp_path):
    source = make_image_folder(tmp_path / "src")
    shutil.move(source / "test" / "class2", tmp_path / "class2")
    os.symlink(tmp_path / "class2", source / "test" / "class2")
    with pytest.raises(DataError) as error:
        imagefolder.list_imagefolder(DataConfig(source="imagefolder", path=str(source)))
    assert f"{source / 'test' / 'class2'} is a link to a folder" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_link_to_a_file_is_read_once_by_its_target(tmp_path, caplog):
    source = make_image_folder(tmp_path / "src")
    before = listing_of(source)
    # another name of a class0 image in class1: the image stays in class0, once
    os.symlink(source / "train" / "class0" / "00.png", source / "train" / "class1" / "zz-link.png")
    os.link(source / "train" / "class0" / "01.png", source / "train" / "class2" / "zz-hard.png")
    assert listing_of(source) == before
    assert "2 image(s) are other names (links) of images already listed" in caplog.text
    # a link to a file outside the source is an image of the source, read by its target
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(outside)
    os.symlink(outside, source / "train" / "class1" / "zz-outside.png")
    paths, labels = listing_of(source)["train"]
    assert paths.count(str(source / "train" / "class1" / "zz-outside.png")) == 1
    assert labels[paths.index(str(source / "train" / "class1" / "zz-outside.png"))] == 1
    raw = imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(source), image_size=S))
    assert len(raw.splits["train"].labels) == 31
    assert (raw.splits["train"].images == 200).all(axis=(1, 2, 3)).sum() == 1


# ---------------------------------------------------------------------------
# exact duplicates


def _copy(path, to):
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, to)


def duplicated_folder(root):
    """make_image_folder plus exact duplicates: 8 byte-identical copies within and across classes, 2 images saved
    again as BMP (other bytes, equal pixels) and a training copy of a test image."""
    source = make_image_folder(root)
    train = source / "train"
    for k in range(4):
        _copy(train / "class0" / f"{k:02d}.png", train / "class0" / f"dup{k}.png")
        _copy(train / "class1" / f"{k:02d}.png", train / "class2" / f"dup{k}.png")  # the same image, another class
    for k in range(2):
        Image.open(train / "class2" / f"{k:02d}.png").save(train / "class2" / f"again{k}.bmp")
    _copy(source / "test" / "class1" / "t0.png", train / "class1" / "copy-of-test.png")
    return source


def test_streamed_image_folder_keeps_duplicates_in_one_split_and_equals_the_in_memory_dataset(tmp_path, monkeypatch):
    source = duplicated_folder(tmp_path / "src")
    cfg = DataConfig(
        source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S, val_fraction=0.3
    )
    prepared = prep.prepare(cfg)
    meta = prep.read_metadata(prepared)
    assert_no_image_in_two_splits(prepared)
    record = meta["duplicates"]
    assert (record["groups"], record["extra_rows"], record["label_conflicts"]) == (11, 11, 4)
    assert sum(record["moved_rows"].values()) > 0  # the label-only carve had spread some groups
    assert sum(meta["counts"].values()) == 36 + 11  # every row kept
    assert meta["counts"]["test"] < 6  # the test image that has a training copy left test, for train
    expected, in_memory_record = prep.carve_with_duplicates(imagefolder.read_imagefolder(cfg), cfg)
    assert in_memory_record == {**record}
    for name, split in expected.items():
        batch = read_split(prepared, name)
        np.testing.assert_array_equal(batch["image"], split.images)
        np.testing.assert_array_equal(batch["label"], split.labels)
        assert batch["row_id"].tolist() == list(range(len(split.labels)))
    pixels = expected["train"].images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["mean"], pixels.mean(0), rtol=1e-12)


def test_streamed_parquet_keeps_duplicates_in_one_split_and_equals_the_in_memory_dataset(tmp_path):
    source = make_parquet_source(tmp_path / "src")
    train = pq.read_table(source / "train-00000.parquet")
    test = pq.read_table(source / "test.parquet")
    extra = pa.concat_tables([train.slice(0, 5), test.slice(0, 2)])  # copies of train and of test rows
    pq.write_table(extra, source / "train-00002.parquet", row_group_size=3)
    cfg = DataConfig(
        source="parquet",
        path=str(source),
        root=str(tmp_path / "root"),
        image_size=S,
        coarse_label_column="coarse",
        val_fraction=0.3,
    )
    prepared = prep.prepare(cfg)
    meta = prep.read_metadata(prepared)
    assert_no_image_in_two_splits(prepared)
    assert (meta["duplicates"]["groups"], meta["duplicates"]["extra_rows"]) == (7, 7)
    assert sum(meta["counts"].values()) == 30 + 7
    expected, record = prep.carve_with_duplicates(parquet.read_parquet_source(cfg), cfg)
    assert record == meta["duplicates"] and sum(record["moved_rows"].values()) > 0
    for name, split in expected.items():
        batch = read_split(prepared, name)
        np.testing.assert_array_equal(batch["image"], split.images)
        np.testing.assert_array_equal(batch["coarse_label"], split.coarse_labels)
        assert batch["row_id"].tolist() == list(range(len(split.labels)))
    assert not glob.glob(os.path.join(prepared, "_staging"))


def test_without_duplicates_the_carve_is_the_label_carve_and_nothing_is_written_twice(tmp_path, monkeypatch):
    source = make_image_folder(tmp_path / "src")
    cfg = DataConfig(source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S)
    reads = []
    real = shard_tasks.read_file
    monkeypatch.setattr(shard_tasks, "read_file", lambda fs, p: reads.append(p) or real(fs, p))
    meta = prep.read_metadata(prep.prepare(cfg))
    assert len(reads) == 36  # one decoding pass
    assert meta["format_version"] == layout.FORMAT_VERSION == 2
    assert meta["duplicates"] == {**meta["duplicates"], "groups": 0, "extra_rows": 0, "moved_rows": {}}
    listing = imagefolder.list_imagefolder(cfg)
    labels = {split: labels for split, (_, labels) in listing.splits.items()}
    order = layout.carve_order(labels, cfg)
    for name, rows in order.items():  # the label-only carve, as format 1 wrote it
        paths = [listing.splits[str(s)][0][i] for s, i in zip(rows.source, rows.index)]
        assert read_split(prep.dataset_dir(cfg), name)["label"].tolist() == [
            listing.splits[str(s)][1][i] for s, i in zip(rows.source, rows.index)
        ]
        assert len(paths) == meta["counts"][name]


def test_keep_together_moves_groups_to_the_first_split_and_test_never_gains_a_row():
    order = {
        "test": SplitRows(np.array(["test"] * 3), np.array([2, 0, 1])),
        "train": SplitRows(np.array(["train"] * 4), np.array([3, 0, 2, 1])),
        "val": SplitRows(np.array(["train"] * 2), np.array([5, 4])),
    }
    groups = {"train": np.array([0, 1, 2, 3, 4, 5]), "test": np.array([6, 4, 0])}  # test 2 = train 0, test 1 = val 4
    labels = {"train": np.array([0, 1, 0, 1, 0, 1]), "test": np.array([0, 1, 1])}
    new, record = layout.keep_together(order, groups, labels)
    assert new["train"].index.tolist() == [3, 0, 2, 1, 2] and new["train"].source.tolist()[-1] == "test"
    assert new["val"].index.tolist() == [5, 4, 1] and new["val"].source.tolist() == ["train", "train", "test"]
    assert new["test"].index.tolist() == [0]
    assert record["groups"] == 2 and record["extra_rows"] == 2 and record["label_conflicts"] == 2
    assert record["moved_rows"] == {"train": 1, "val": 1}
    unchanged, none = layout.keep_together(order, {"train": np.arange(6), "test": np.arange(6, 9)}, labels)
    assert all(np.array_equal(unchanged[n].index, order[n].index) for n in order) and none["groups"] == 0


def test_in_memory_sources_keep_duplicates_together(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, S, S, 3), dtype=np.uint8)
    images[30:40] = images[0:10]  # ten exact copies
    labels = np.arange(60) % 3
    raw = RawDataset({"train": RawSplit(images, labels)}, ["a", "b", "c"], "x")
    monkeypatch.setitem(prep.READERS, "digits", lambda cfg: raw)
    prepared = prep.prepare(DataConfig(source="digits", root=str(tmp_path), image_size=S))
    assert_no_image_in_two_splits(prepared)
    meta = prep.read_metadata(prepared)
    assert meta["duplicates"]["extra_rows"] == 10 and sum(meta["counts"].values()) == 60
    assert "10 exact duplicate image(s) in 10 group(s)" in layout.duplicates_summary(meta["duplicates"])
    assert layout.duplicates_summary(None).startswith("duplicates not checked")


def test_read_rows_by_id(tmp_path):
    source = make_image_folder(tmp_path / "src")
    cfg = DataConfig(source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=S)
    prepared = prep.prepare(cfg)
    batch = read_split(prepared, "train")
    found = layout.read_rows(prepared, "train", [5, 0, 17, 5], S)
    assert sorted(found) == [0, 5, 17]
    for i in (0, 5, 17):
        np.testing.assert_array_equal(found[i], batch["image"][batch["row_id"].tolist().index(i)])
    png = io.BytesIO()
    Image.fromarray(found[5]).save(png, format="PNG")  # plain uint8 arrays
