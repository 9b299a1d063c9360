import glob
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_ray.config import DataConfig
from resnet_ray.data import digits
from resnet_ray.data import prepare as prep
from resnet_ray.data.layout import DataError, split_rows
from resnet_ray.data.load import table_to_batch
from resnet_ray.data.sources import RawDataset, RawSplit


def fake_source(n_per_class=20, classes=4, with_test=True, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.repeat(np.arange(classes), n)
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        return RawSplit(images, labels.astype(np.int64), (labels // 2).astype(np.int64))

    splits = {"train": split(n_per_class)}
    if with_test:
        splits["test"] = split(5)
    return RawDataset(
        splits=splits,
        classes=[f"c{i}" for i in range(classes)],
        checksum="abc",
        coarse_classes=["low", "high"],
        fine_to_coarse=[i // 2 for i in range(classes)],
    )


@pytest.fixture
def fake(monkeypatch):
    raw = fake_source()
    monkeypatch.setitem(prep.READERS, "digits", lambda cfg: raw)
    return raw


def read_split(prepared, split):
    files = sorted(glob.glob(os.path.join(prepared, split, "*.parquet")))
    return table_to_batch(pa.concat_tables([pq.read_table(f) for f in files]), 32)


def data_files(root):
    """Every file below root except the lock files that prepare keeps beside its datasets."""
    return [
        p for p in glob.glob(os.path.join(root, "**"), recursive=True) if os.path.isfile(p) and not p.endswith(".lock")
    ]


def rows_by_content(images):
    return sorted(img.tobytes() for img in images)


def test_round_trip_is_pixel_exact_and_splits_partition_train(tmp_path, fake):
    cfg = DataConfig(source="digits", root=str(tmp_path), val_fraction=0.25)
    prepared = prep.prepare(cfg)
    meta = prep.read_metadata(prepared)
    train, val, test = (read_split(prepared, s) for s in ("train", "val", "test"))
    # train + val is exactly the source train split, test is the source test split (as multisets of images)
    assert rows_by_content(np.concatenate([train["image"], val["image"]])) == rows_by_content(
        fake.splits["train"].images
    )
    assert rows_by_content(test["image"]) == rows_by_content(fake.splits["test"].images)
    # labels travel with their image
    source = {img.tobytes(): lab for img, lab in zip(fake.splits["train"].images, fake.splits["train"].labels)}
    assert all(source[img.tobytes()] == lab for img, lab in zip(train["image"], train["label"]))
    assert (train["coarse_label"] == train["label"] // 2).all()
    # stratified: every class has the same share in val
    assert np.bincount(val["label"]).tolist() == [5, 5, 5, 5]
    assert meta["counts"] == {"test": 20, "train": 60, "val": 20}
    assert list(train["row_id"]) == list(range(60))
    assert meta["classes"] == fake.classes and meta["fine_to_coarse"] == [0, 0, 1, 1]
    pixels = train["image"].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["mean"], pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(meta["std"], pixels.std(0), atol=1e-9)


def test_second_prepare_does_nothing_and_says_so(tmp_path, fake, caplog):
    cfg = DataConfig(source="digits", root=str(tmp_path))
    prepared = prep.prepare(cfg)
    stamp = os.path.getmtime(os.path.join(prepared, "metadata.json"))
    with caplog.at_level(logging.DEBUG, logger="resnet_ray.data.prepare"):  # DEBUG: jobs' output stays quiet
        assert prep.prepare(cfg) == prepared
    assert "nothing to do" in caplog.text
    assert os.path.getmtime(os.path.join(prepared, "metadata.json")) == stamp


def test_changed_settings_prepare_beside_and_never_rewrite(tmp_path, fake):
    first = prep.prepare(DataConfig(source="digits", root=str(tmp_path), val_fraction=0.25))
    before = {p: os.path.getmtime(p) for p in data_files(first)}
    prepared = prep.prepare(DataConfig(source="digits", root=str(tmp_path), val_fraction=0.1))
    assert prepared != first and prep.read_metadata(prepared)["val_fraction"] == 0.1
    assert {p: os.path.getmtime(p) for p in data_files(first)} == before  # the first one is untouched
    folders = sorted(e for e in os.listdir(tmp_path / "digits") if not e.endswith(".lock"))
    assert folders == sorted([os.path.basename(first), os.path.basename(prepared)])  # no temporary folders


def test_test_split_is_carved_only_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(prep.READERS, "digits", lambda cfg: fake_source(n_per_class=25, with_test=False))
    meta = prep.read_metadata(prep.prepare(DataConfig(source="digits", root=str(tmp_path), test_fraction=0.2)))
    assert meta["counts"]["test"] == 20 and meta["counts"]["train"] + meta["counts"]["val"] == 80


def test_failed_prepare_leaves_nothing_behind(tmp_path, fake, monkeypatch):
    calls = []
    real = pq.write_table

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(prep.pq, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        prep.prepare(DataConfig(source="digits", root=str(tmp_path)))
    assert data_files(tmp_path) == []
    with pytest.raises(DataError, match="not a prepared dataset"):
        prep.read_metadata(prep.dataset_dir(DataConfig(source="digits", root=str(tmp_path))))


def test_bad_labels_stop_before_writing(tmp_path, monkeypatch):
    raw = fake_source()
    raw.splits["train"].labels[7] = 9
    monkeypatch.setitem(prep.READERS, "digits", lambda cfg: raw)
    with pytest.raises(DataError, match="row 7 has label 9, outside"):
        prep.prepare(DataConfig(source="digits", root=str(tmp_path)))
    assert data_files(tmp_path) == []


def test_wrong_image_size_is_an_error(tmp_path, monkeypatch):
    raw = fake_source()
    raw.splits["train"].images = raw.splits["train"].images[:, :28, :28]
    monkeypatch.setitem(prep.READERS, "digits", lambda cfg: raw)
    with pytest.raises(DataError, match=r"expected \(32, 32, 3\)"):
        prep.prepare(DataConfig(source="digits", root=str(tmp_path)))


def test_file_uri_root_goes_through_the_same_code(tmp_path, fake):
    prepared = prep.prepare(DataConfig(source="digits", root=f"file://{tmp_path}/uri"))
    assert prepared.startswith(f"file://{tmp_path}/uri/digits/")
    local = prepared[len("file://") :]
    assert json.load(open(os.path.join(local, "metadata.json")))["counts"]["train"] == 72


def test_split_rows_names_missing_split():
    meta = {"name": "x", "counts": {"train": 10, "val": 2}}
    assert split_rows(meta, "train", 4) == 4 and split_rows(meta, "val", None) == 2
    with pytest.raises(DataError, match="split 'test' does not exist in x"):
        split_rows(meta, "test", None)


def test_digits_source_is_real_32px_rgb(tmp_path):
    raw = digits.read_digits(DataConfig())
    split = raw.splits["train"]
    assert split.images.shape == (1797, 32, 32, 3) and split.images.dtype == np.uint8
    assert (split.images[..., 0] == split.images[..., 2]).all() and split.images.max() == 255
    assert np.bincount(split.labels).min() >= 170


def test_fingerprint_covers_source_files_seed_and_fractions(tmp_path):
    source = tmp_path / "src"
    (source / "train").mkdir(parents=True)
    part = source / "train" / "part-0.parquet"
    part.write_bytes(b"x" * 10)
    cfg = DataConfig(source="parquet", path=str(source), root=str(tmp_path / "root"))
    first = prep.request_fingerprint(cfg)
    assert prep.request_fingerprint(cfg) == first  # the same files and settings: the same dataset
    assert prep.dataset_dir(cfg) == os.path.join(tmp_path, "root", "parquet", first)
    for changed in ({"seed": 1}, {"val_fraction": 0.2}, {"test_fraction": 0.3}):
        assert prep.request_fingerprint(DataConfig(**{**cfg.__dict__, **changed})) != first, changed
    part.write_bytes(b"y" * 11)  # new content
    second = prep.request_fingerprint(cfg)
    assert second != first
    os.utime(part, ns=(1, 1))  # same size, other modification time
    assert prep.request_fingerprint(cfg) not in (first, second)
    (source / "train" / "part-1.parquet").write_bytes(b"")  # one more file
    assert len({first, second, prep.request_fingerprint(cfg)}) == 3


def test_leftovers_of_a_killed_prepare_are_deleted_by_the_next(tmp_path, fake):
    cfg = DataConfig(source="digits", root=str(tmp_path))
    final = prep.dataset_dir(cfg)
    os.makedirs(f"{final}.tmp-deadbeef/train")
    os.makedirs(final)  # an object-store commit that stopped before metadata.json
    open(os.path.join(final, "stale.parquet"), "w").close()
    prepared = prep.prepare(cfg)
    assert prepared == final and not os.path.exists(os.path.join(final, "stale.parquet"))
    name = os.path.basename(final)
    assert sorted(os.listdir(tmp_path / "digits")) == [name, f"{name}.lock"]


def test_a_data_root_inside_the_source_folder_is_refused_before_writing(tmp_path):
    """data.root/<name> inside data.path would add the prepared shards to the source (a new fingerprint every
    time, and Parquet files the source reader rejects)."""
    source = tmp_path / "photos"
    (source / "cat").mkdir(parents=True)
    cfg = DataConfig(source="imagefolder", path=str(source), root=str(tmp_path), name="photos")
    with pytest.raises(DataError, match=r"data.root .*inside the source data.path"):
        prep.prepare(cfg)
    assert sorted(os.listdir(tmp_path)) == ["photos"] and os.listdir(source) == ["cat"]
