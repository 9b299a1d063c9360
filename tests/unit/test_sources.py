"""Source readers: CIFAR archives/folders, Parquet folders and image folders, on tiny data made here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_ray.config import DataConfig
from resnet_ray.data import cifar, imagefolder, parquet
from resnet_ray.data.layout import DataError
from resnet_ray.data.prepare import read_source

REAL_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------
# fake official CIFAR archives


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, like the official (Python 2 cPickle) CIFAR batches:
    loaded with encoding="latin1" the keys come back as str, with encoding="bytes" as b'data' etc."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dumps(obj, style: str) -> bytes:
    if style == "py3":  # a Python 3 pickle of the same byte-string keys
        return pickle.dumps(obj, protocol=4)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _rand_images(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official CHW-flattened (N, 3072) rows."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _tar(path: Path, members: dict) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar10(root: Path, style: str = "py2", per_class: int = 1):
    """A tiny archive in the official layout: data_batch_1..5 + test_batch + batches.meta."""
    rng = np.random.default_rng(0)
    names = [n.encode() for n in CIFAR10_NAMES]
    members, expected = {}, {"train": ([], []), "test": ([], [])}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.permutation(np.repeat(np.arange(10), per_class))]
        images = _rand_images(rng, len(labels))
        split = "test" if batch == "test_batch" else "train"
        expected[split][0].append(images)
        expected[split][1].append(labels)
        members[f"cifar-10-batches-py/{batch}"] = _dumps(
            {
                b"batch_label": f"{batch} of 5".encode(),
                b"labels": labels,
                b"data": _rows(images),
                b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            },
            style,
        )
    members["cifar-10-batches-py/batches.meta"] = _dumps(
        {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}, style
    )
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    archive = root / "cifar-10-python.tar.gz"
    md5 = _tar(archive, members)
    expected = {s: (np.concatenate(i), np.concatenate(lab).astype(np.int64)) for s, (i, lab) in expected.items()}
    return archive, md5, expected, members


def make_cifar100(root: Path, style: str = "py2", fine_to_coarse=None):
    rng = np.random.default_rng(1)
    fine_to_coarse = list(fine_to_coarse or [i % 20 for i in range(100)])
    members, expected = {}, {}
    for split, per_class in (("train", 2), ("test", 1)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        coarse = np.asarray(fine_to_coarse)[fine]
        images = _rand_images(rng, len(fine))
        expected[split] = (images, fine.astype(np.int64), coarse.astype(np.int64))
        members[f"cifar-100-python/{split}"] = _dumps(
            {
                b"filenames": [b"x.png"] * len(fine),
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": [int(x) for x in fine],
                b"coarse_labels": [int(x) for x in coarse],
                b"data": _rows(images),
            },
            style,
        )
    members["cifar-100-python/meta"] = _dumps(
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
        style,
    )
    archive = root / "cifar-100-python.tar.gz"
    md5 = _tar(archive, members)
    return archive, md5, expected, fine_to_coarse


@pytest.fixture
def no_unpickling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pickle.loads called on unverified bytes")

    monkeypatch.setattr(pickle, "loads", fail)


@pytest.fixture
def no_download(monkeypatch):
    import torchvision.datasets.utils as tvu

    def fail(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(tvu, "download_url", fail)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_archive_roundtrip(tmp_path, style, no_download):
    archive, md5, expected, _ = make_cifar10(tmp_path, style)
    raw = read_source(DataConfig(source="cifar10", path=str(archive), md5=md5, download=False))
    assert raw.classes == CIFAR10_NAMES
    assert raw.checksum == md5
    assert set(raw.splits) == {"train", "test"}
    for split, (images, labels) in expected.items():
        got = raw.splits[split]
        assert got.images.shape == (len(labels), 32, 32, 3) and got.images.dtype == np.uint8
        assert got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.images, images)
        np.testing.assert_array_equal(got.labels, labels)
    # a folder holding the archive works the same
    raw2 = cifar.read_cifar10(DataConfig(source="cifar10", path=str(tmp_path), md5=md5, download=False))
    np.testing.assert_array_equal(raw2.splits["train"].images, expected["train"][0])


def test_cifar10_hwc_layout(tmp_path):
    """Row layout is R plane, G plane, B plane (CHW flattened): check one pixel by hand."""
    archive, md5, expected, _ = make_cifar10(tmp_path)
    raw = cifar.read_cifar10(DataConfig(source="cifar10", path=str(archive), md5=md5))
    row = _rows(expected["test"][0])[3]
    img = raw.splits["test"].images[3]
    assert (img[5, 7, 0], img[5, 7, 1], img[5, 7, 2]) == (
        row[5 * 32 + 7],
        row[1024 + 5 * 32 + 7],
        row[2048 + 5 * 32 + 7],
    )


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar100_archive_roundtrip(tmp_path, style):
    archive, md5, expected, f2c = make_cifar100(tmp_path, style)
    raw = read_source(DataConfig(source="cifar100", path=str(archive), md5=md5, download=False))
    assert raw.classes == [f"fine{i}" for i in range(100)]
    assert raw.coarse_classes == [f"coarse{i}" for i in range(20)]
    assert raw.fine_to_coarse == f2c and all(isinstance(c, int) for c in raw.fine_to_coarse)
    assert raw.checksum == md5
    for split, (images, fine, coarse) in expected.items():
        got = raw.splits[split]
        np.testing.assert_array_equal(got.images, images)
        np.testing.assert_array_equal(got.labels, fine)
        np.testing.assert_array_equal(got.coarse_labels, coarse)
        assert got.coarse_labels.dtype == np.int64


def test_cifar100_inconsistent_coarse_raises(tmp_path):
    archive, md5, _, _ = make_cifar100(tmp_path)
    # rewrite the test batch so that fine label 0 gets a second coarse label
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    test = pickle.loads(members["cifar-100-python/test"], encoding="bytes")
    i = test[b"fine_labels"].index(0)
    test[b"coarse_labels"][i] = 7
    members["cifar-100-python/test"] = _dumps(test, "py2")
    md5 = _tar(archive, members)
    with pytest.raises(DataError, match=r"fine label 0 maps to two coarse labels"):
        cifar.read_cifar100(DataConfig(source="cifar100", path=str(archive), md5=md5))


def test_cifar_md5_mismatch_raises_before_unpickling(tmp_path, no_unpickling, no_download):
    archive, md5, _, _ = make_cifar10(tmp_path)
    wrong = "0" * 32
    with pytest.raises(DataError, match=rf"MD5 {md5} does not match the expected {wrong}"):
        cifar.read_cifar10(DataConfig(source="cifar10", path=str(archive), md5=wrong))
    # without data.md5 the official checksum applies, which a fake archive cannot match
    with pytest.raises(DataError, match=cifar._release("cifar10").archive_md5):
        cifar.read_cifar10(DataConfig(source="cifar10", path=str(archive)))
    archive100, _, _, _ = make_cifar100(tmp_path)
    with pytest.raises(DataError, match="does not match"):
        cifar.read_cifar100(DataConfig(source="cifar100", path=str(archive100), md5=wrong))


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def test_cifar_extracted_folder_wrong_checksums_raise(tmp_path, no_unpickling, no_download):
    archive, md5, _, _ = make_cifar10(tmp_path)
    _extract(archive, tmp_path / "x")
    folder = tmp_path / "x" / "cifar-10-batches-py"
    official = dict(cifar._release("cifar10").files)
    for path in (folder, tmp_path / "x"):  # the folder itself or a folder holding it
        with pytest.raises(DataError) as err:
            cifar.read_cifar10(DataConfig(source="cifar10", path=str(path), md5=md5, download=False))
        msg = str(err.value)
        bad = next(name for name in official if name in msg)
        actual = hashlib.md5((folder / bad).read_bytes()).hexdigest()
        assert official[bad] in msg and actual in msg and str(folder / bad) in msg


def test_cifar_extracted_folder_roundtrip(tmp_path, monkeypatch):
    """With torchvision's per-file list pointing at the fake files, a folder reads like the archive."""
    from torchvision.datasets import CIFAR10

    archive, _, expected, members = make_cifar10(tmp_path)
    _extract(archive, tmp_path / "x")
    md5s = {name.split("/")[1]: hashlib.md5(data).hexdigest() for name, data in members.items()}
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(
        CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5s["batches.meta"]}
    )
    raw = cifar.read_cifar10(DataConfig(source="cifar10", path=str(tmp_path / "x"), download=False))
    np.testing.assert_array_equal(raw.splits["train"].images, expected["train"][0])
    np.testing.assert_array_equal(raw.splits["test"].labels, expected["test"][1])
    assert len(raw.checksum) == 64 and raw.checksum != hashlib.md5(archive.read_bytes()).hexdigest()
    (tmp_path / "x" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="missing file test_batch"):
        cifar.read_cifar10(DataConfig(source="cifar10", path=str(tmp_path / "x"), download=False))


def test_cifar_no_archive_without_download_raises(tmp_path, monkeypatch, no_download, no_unpickling):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data\.download is false.*cifar-10-python\.tar\.gz") as err:
        cifar.read_cifar10(DataConfig(source="cifar10", path=str(empty), download=False))
    assert str(empty / "cifar-10-python.tar.gz") in str(err.value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match="cifar-100-python.tar.gz") as err:
        cifar.read_cifar100(DataConfig(source="cifar100", download=False))
    assert str(tmp_path / "home" / ".cache" / "resnet_ray" / "downloads") in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        cifar.read_cifar10(DataConfig(source="cifar10", path=str(tmp_path / "nope.tar.gz")))


def test_cifar_download_goes_through_download_url(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    src = tmp_path / "src"
    src.mkdir()
    archive, md5, expected, _ = make_cifar10(src)
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kwargs):
        calls.append((url, root, filename, md5))
        shutil.copy(archive, os.path.join(root, filename))

    monkeypatch.setattr(tvu, "download_url", fake_download)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = cifar.read_cifar10(DataConfig(source="cifar10", md5=md5))
    cache = tmp_path / "home" / ".cache" / "resnet_ray" / "downloads"
    assert calls == [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(cache), "cifar-10-python.tar.gz", md5)
    ]
    np.testing.assert_array_equal(raw.splits["test"].images, expected["test"][0])
    cifar.read_cifar10(DataConfig(source="cifar10", md5=md5))  # second time: cached, no download
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# Parquet


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, images, labels, struct_layout=False, blobs=None, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = blobs if blobs is not None else [_png(im) for im in images]
    if struct_layout:  # Hugging Face datasets' Image feature
        column = pa.array(
            [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        column = pa.array(blobs, pa.binary())
    cols = {"image": column, "label": pa.array(labels, pa.int64())}
    cols.update({k: pa.array(v, pa.int64()) for k, v in extra.items()})
    pq.write_table(pa.table(cols), path)


def _data(n: int, seed: int = 0, classes: int = 3, size: int = 32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), [int(i) % classes for i in range(n)]


def test_parquet_binary_roundtrip(tmp_path):
    train, test = _data(7, 0), _data(4, 1)
    _write_parquet(tmp_path / "train.parquet", *train)
    _write_parquet(tmp_path / "test.parquet", *test)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    raw = read_source(DataConfig(source="parquet", path=str(tmp_path)))
    assert raw.classes == ["a", "b", "c"]
    for split, (images, labels) in (("train", train), ("test", test)):
        np.testing.assert_array_equal(raw.splits[split].images, images)
        np.testing.assert_array_equal(raw.splits[split].labels, labels)
        assert raw.splits[split].labels.dtype == np.int64 and raw.splits[split].coarse_labels is None
    # the checksum: sha256(name, sha256(bytes)) of each file, summed mod 2**256 (order-free, for parallel tasks)
    total = 0
    for name in ("test.parquet", "train.parquet"):
        inner = hashlib.sha256((tmp_path / name).read_bytes()).digest()
        total += int.from_bytes(hashlib.sha256(len(name).to_bytes(8, "little") + name.encode() + inner).digest(), "big")
    assert raw.checksum == f"{total % (1 << 256):064x}"
    # the same folder as a file:// URI
    uri = read_source(DataConfig(source="parquet", path=tmp_path.as_uri()))
    np.testing.assert_array_equal(uri.splits["train"].images, train[0])
    assert uri.checksum == raw.checksum


def test_parquet_hf_struct_layout_roundtrip(tmp_path):
    train = _data(6, 2, classes=4)
    _write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", train[0][:4], train[1][:4], struct_layout=True)
    _write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", train[0][4:], train[1][4:], struct_layout=True)
    (tmp_path / "README.md").write_text("no classes.json here")
    raw = parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path), classes=("w", "x", "y", "z")))
    assert set(raw.splits) == {"train"} and raw.classes == ["w", "x", "y", "z"]
    np.testing.assert_array_equal(raw.splits["train"].images, train[0])
    np.testing.assert_array_equal(raw.splits["train"].labels, train[1])


def test_parquet_split_folders_coarse_and_default_classes(tmp_path):
    train, test = _data(5, 3, classes=4), _data(4, 4, classes=4)
    _write_parquet(tmp_path / "train" / "part-0.parquet", *train, coarse=[label // 2 for label in train[1]])
    _write_parquet(tmp_path / "test" / "part-0.parquet", *test, coarse=[label // 2 for label in test[1]])
    (tmp_path / "other.parquet").write_bytes(b"ignored: belongs to no split")
    raw = parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path), coarse_label_column="coarse"))
    assert raw.classes == ["0", "1", "2", "3"]
    assert raw.coarse_classes == ["0", "1"] and raw.fine_to_coarse == [0, 0, 1, 1]
    np.testing.assert_array_equal(raw.splits["test"].images, test[0])
    np.testing.assert_array_equal(raw.splits["test"].coarse_labels, [label // 2 for label in test[1]])


def test_parquet_classes_json_object_form(tmp_path):
    _write_parquet(tmp_path / "train.parquet", *_data(3, 5, classes=2))
    (tmp_path / "classes.json").write_text(json.dumps({"dataset": "x", "label_names": ["cat", "dog"]}))
    assert parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path))).classes == ["cat", "dog"]


def test_parquet_missing_train_raises(tmp_path):
    _write_parquet(tmp_path / "test.parquet", *_data(2))
    with pytest.raises(DataError, match="no train split"):
        parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path)))


def test_parquet_missing_label_column_raises(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": pa.array([_png(_data(1)[0][0])]), "target": pa.array([0])}), path)
    with pytest.raises(DataError) as err:
        parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path)))
    msg = str(err.value)
    assert str(path) in msg and "'label'" in msg and "columns: image, target" in msg


def _bad_row(tmp_path, bad_blob: bytes, row: int = 2):
    images, labels = _data(4)
    blobs = [_png(im) for im in images]
    blobs[row] = bad_blob
    path = tmp_path / "train.parquet"
    _write_parquet(path, images, labels, blobs=blobs)
    with pytest.raises(DataError) as err:
        parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path)))
    msg = str(err.value)
    assert str(path) in msg and f"row {row}" in msg, msg
    return msg


def test_parquet_corrupt_bytes_raise(tmp_path):
    assert "cannot decode" in _bad_row(tmp_path, b"\x89PNG\r\n\x1a\n definitely not a png")


def test_parquet_truncated_png_raises(tmp_path):
    png = _png(_data(1, 9)[0][0])
    assert "cannot decode" in _bad_row(tmp_path, png[: len(png) // 2], row=1)


def test_parquet_other_sizes_and_grayscale_are_converted(tmp_path):
    """Any size and mode becomes data.image_size RGB (resnet_ray.images; checked pixel for pixel there)."""
    images, labels = _data(3)
    blobs = [_png(np.full((28, 40, 3), 7, np.uint8)), _png(np.full((32, 32), 9, np.uint8)), _png(images[2])]
    _write_parquet(tmp_path / "train.parquet", images, labels, blobs=blobs)
    raw = parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path)))
    assert raw.splits["train"].images.shape == (3, 32, 32, 3)
    assert (raw.splits["train"].images[0] == 7).all() and (raw.splits["train"].images[1] == 9).all()
    np.testing.assert_array_equal(raw.splits["train"].images[2], images[2])


def test_parquet_null_label_raises(tmp_path):
    images, _ = _data(3)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": pa.array([_png(im) for im in images]), "label": pa.array([0, None, 1])}), path)
    with pytest.raises(DataError, match=r"train\.parquet: row 1: label is null"):
        parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path)))


def test_parquet_label_outside_classes_raises(tmp_path):
    images, _ = _data(3)
    _write_parquet(tmp_path / "train.parquet", images, [0, 1, 5])
    with pytest.raises(DataError, match=r"train\.parquet: row 2: label 5 is outside \[0, 2\)"):
        parquet.read_parquet_source(DataConfig(source="parquet", path=str(tmp_path), classes=("a", "b")))


@pytest.mark.skipif(not (REAL_CIFAR10 / "train.parquet").exists(), reason="shared CIFAR-10 parquet not present")
def test_parquet_real_cifar10_subset(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 1000), ("test", 200)):
        table = pq.read_table(REAL_CIFAR10 / f"{name}.parquet")
        pq.write_table(table.take(rng.permutation(table.num_rows)[:n]), tmp_path / f"{name}.parquet")
    shutil.copy(REAL_CIFAR10 / "classes.json", tmp_path / "classes.json")
    raw = read_source(DataConfig(source="parquet", path=str(tmp_path)))
    assert raw.classes == CIFAR10_NAMES
    assert raw.splits["train"].images.shape == (1000, 32, 32, 3)
    assert raw.splits["test"].images.shape == (200, 32, 32, 3)
    assert set(raw.splits["train"].labels.tolist()) == set(range(10))
    assert set(raw.splits["test"].labels.tolist()) <= set(range(10))
    first = pq.read_table(tmp_path / "test.parquet").slice(0, 1).to_pylist()[0]
    np.testing.assert_array_equal(raw.splits["test"].images[0], np.asarray(Image.open(io.BytesIO(first["image"]))))
    assert raw.splits["test"].labels[0] == first["label"]


# ---------------------------------------------------------------------------
# image folders


def _save(path: Path, img: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt)


def test_imagefolder_roundtrip(tmp_path):
    images, _ = _data(6, 7)
    _save(tmp_path / "train" / "cat" / "b.png", images[0])
    _save(tmp_path / "train" / "cat" / "a.PNG", images[1])
    _save(tmp_path / "train" / "dog" / "x.bmp", images[2], "BMP")
    _save(tmp_path / "train" / "dog" / "zz" / "y.webp", images[3], "WEBP")  # lossy by default: check shape only
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    _save(tmp_path / "test" / "cat" / "c.png", images[4])
    _save(tmp_path / "test" / "dog" / "d.png", images[5])
    raw = read_source(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert raw.classes == ["cat", "dog"]
    train = raw.splits["train"]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(train.images[:3], images[[1, 0, 2]])  # sorted: a.PNG, b.png, x.bmp, zz/y.webp
    assert train.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(raw.splits["test"].images, images[4:])
    np.testing.assert_array_equal(raw.splits["test"].labels, [0, 1])
    again = imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert again.checksum == raw.checksum and len(raw.checksum) == 64
    (tmp_path / "test" / "dog" / "d.png").rename(tmp_path / "test" / "dog" / "e.png")
    assert imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path))).checksum != raw.checksum


def test_imagefolder_flat_layout(tmp_path):
    images, _ = _data(2, 8)
    _save(tmp_path / "b" / "1.png", images[0])
    _save(tmp_path / "a" / "1.jpeg", images[1], "JPEG")
    raw = imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert set(raw.splits) == {"train"} and raw.classes == ["a", "b"]
    np.testing.assert_array_equal(raw.splits["train"].images[1], images[0])


def test_imagefolder_empty_class_raises(tmp_path):
    _save(tmp_path / "train" / "cat" / "a.png", _data(1)[0][0])
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="empty class folder") as err:
        imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert str(tmp_path / "train" / "dog") in str(err.value)


def test_imagefolder_corrupt_raises_or_is_skipped_and_other_sizes_are_resized(tmp_path):
    _save(tmp_path / "cat" / "a.png", _data(1)[0][0])
    bad = tmp_path / "cat" / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="cannot decode") as err:
        imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert str(bad) in str(err.value)
    skipped = imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path), on_bad_image="skip"))
    assert skipped.bad_images == [{"split": "train", "file": str(bad), "reason": skipped.bad_images[0]["reason"]}]
    assert "cannot decode" in skipped.bad_images[0]["reason"] and len(skipped.splits["train"].labels) == 1
    _save(bad, np.zeros((28, 28, 3), np.uint8), "JPEG")  # another size: resized, not refused
    assert imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path))).splits[
        "train"
    ].images.shape == (2, 32, 32, 3)


def test_imagefolder_test_classes_must_match(tmp_path):
    img = _data(1)[0][0]
    for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "cow")):
        _save(tmp_path / split / cls / "a.png", img)
    with pytest.raises(DataError, match="extra: cow; missing: dog") as err:
        imagefolder.read_imagefolder(DataConfig(source="imagefolder", path=str(tmp_path)))
    assert str(tmp_path / "test") in str(err.value)
