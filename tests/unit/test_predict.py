"""The prediction job's pure parts: input listing (folder, glob, Parquet, URI), read + decode, the exactly-once
and bad-image checks of the consumer, the default output. No Ray."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_ray import predict
from resnet_ray.data.layout import DataError
from resnet_ray.images import ResizeSpec
from resnet_ray.predict import (
    Inputs,
    PredictionError,
    _consume,
    default_output,
    glob_regex,
    list_inputs,
    read_image_files,
    read_row_groups,
)

SPEC = ResizeSpec(8, "stretch").record()


def _png(h=10, w=12, value=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    for rel in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.png", ".hidden/e.png", "notes.txt"):
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "in"


def test_glob_regex_keeps_star_within_a_folder():
    assert glob_regex("/d/*.png").match("/d/a.png") and not glob_regex("/d/*.png").match("/d/s/a.png")
    assert glob_regex("/d/**/*.png").match("/d/s/t/a.png") and glob_regex("/d/**/*.png").match("/d/a.png")
    assert glob_regex("/d/im?[0-9].jpg").match("/d/img7.jpg") and not glob_regex("/d/im?[0-9].jpg").match("/d/img.jpg")


def test_folder_lists_images_recursively_in_order_skipping_hidden(folder):
    inputs = list_inputs(str(folder))
    assert inputs.kind == "files" and inputs.rows == 4
    assert [i["path"] for i in inputs.items] == [
        str(folder / r) for r in ("a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.png")
    ]
    assert [i["row_id"] for i in inputs.items] == [0, 1, 2, 3]


def test_glob_and_file_uri(folder, monkeypatch):
    assert [i["path"] for i in list_inputs(str(folder / "*.png")).items] == [str(folder / "b.png")]
    assert list_inputs(str(folder / "**" / "*.png")).rows == 2
    monkeypatch.chdir(folder)
    assert [i["path"] for i in list_inputs("*.png").items] == [str(folder / "b.png")]  # relative, no folder part
    uri = list_inputs(folder.as_uri())
    assert [i["path"] for i in uri.items][0] == f"file://{folder}/a.JPG"
    with pytest.raises(DataError, match="no file matches"):
        list_inputs(str(folder / "*.gif"))
    with pytest.raises(DataError, match="not found"):
        list_inputs(str(folder / "missing"))


def test_parquet_inputs_by_row_group_and_mixed_folders_refused(tmp_path, folder, monkeypatch):
    pq.write_table(pa.table({"image": pa.array([_png()] * 5, pa.binary())}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"image": pa.array([_png()] * 3, pa.binary())}), tmp_path / "b.parquet")
    inputs = list_inputs(str(tmp_path / "*.parquet"))
    assert inputs.kind == "parquet" and inputs.rows == 8
    assert [(i["row_id"], i["row_group"], i["row"]) for i in inputs.items] == [
        (0, 0, 0),
        (2, 1, 2),
        (4, 2, 4),
        (5, 0, 0),
    ]
    monkeypatch.setattr(predict, "ROWS_PER_READ", 2)  # b.parquet's one row group of 3 in two slices
    assert [(i["row_id"], i["row"], i["skip"], i["take"]) for i in list_inputs(str(tmp_path / "b.parquet")).items] == [
        (0, 0, 0, 2),
        (2, 2, 2, 1),
    ]
    with pytest.raises(DataError, match="no image column 'pixels'"):
        list_inputs(str(tmp_path / "a.parquet"), image_column="pixels")
    (folder / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="holds both Parquet files"):
        list_inputs(str(folder))


def test_read_image_files_decodes_and_marks_bad_ones(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(value=9))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    paths = [str(tmp_path / "ok.png"), str(tmp_path / "bad.png"), str(tmp_path / "gone.png")]
    out = read_image_files({"row_id": np.arange(3), "path": np.asarray(paths, dtype=object)}, SPEC, "/")
    assert out["image"].shape == (3, 8, 8, 3) and (out["image"][0] == 9).all()
    assert out["error"][0] == "" and "cannot decode image" in out["error"][1] and "cannot read" in out["error"][2]


def test_read_row_groups_expands_rows_and_handles_nulls(tmp_path):
    pq.write_table(
        pa.table({"img": pa.array([_png(value=1), None, _png(value=3)], pa.binary())}),
        tmp_path / "a.parquet",
        row_group_size=2,
    )
    batch = {
        "row_id": np.array([10]),
        "path": np.array([str(tmp_path / "a.parquet")], dtype=object),
        "row_group": np.array([1]),
        "row": np.array([2]),
        "skip": np.array([0]),
        "take": np.array([1]),
    }
    out = read_row_groups(batch, SPEC, "/", "img")
    assert out["row_id"].tolist() == [10] and out["row"].tolist() == [2] and (out["image"][0] == 3).all()
    batch.update(row_id=np.array([0]), row_group=np.array([0]), row=np.array([0]), take=np.array([2]))
    assert read_row_groups(batch, SPEC, "/", "img")["error"].tolist() == ["", "image is null"]
    batch.update(row_id=np.array([1]), row=np.array([1]), skip=np.array([1]), take=np.array([1]))  # a slice
    out = read_row_groups(batch, SPEC, "/", "img")
    assert out["row_id"].tolist() == [1] and out["error"].tolist() == ["image is null"]


def _batch(ids, bad=()):
    n = len(ids)
    pred = np.array([-1 if i in bad else i % 3 for i in ids], np.int64)
    return {
        "row_id": np.asarray(ids, np.int64),
        "path": np.array([f"/x/{i}.png" for i in ids], dtype=object),
        "row": np.full(n, -1),
        "error": np.array(["broken" if i in bad else "" for i in ids], dtype=object),
        "pred": pred,
        "top5": np.stack([pred, pred]).T,
        "top_probs": np.full((n, 2), 0.4),
    }


def _inputs(rows):
    return Inputs("files", [], rows)


def test_consume_checks_every_row_exactly_once(tmp_path):
    out = str(tmp_path / "p.parquet")
    skipped = _consume(
        iter([_batch([2, 0]), _batch([1, 3], bad=(3,))]), out, _inputs(4), ["a", "b", "c"], "s", "skip", None
    )
    assert skipped == [{"file": "/x/3.png", "reason": "broken"}]
    table = pq.read_table(out).to_pydict()
    assert table["row_id"] == [2, 0, 1, 3] and table["class"] == ["c", "a", "b", None]
    assert table["error"] == [None, None, None, "broken"] and table["top_classes"][3] == []
    with pytest.raises(PredictionError, match="1 of 4 input rows were never predicted"):
        _consume(iter([_batch([0, 1, 2])]), out, _inputs(4), ["a", "b", "c"], "s", "skip", None)
    with pytest.raises(PredictionError, match="predicted twice"):
        _consume(iter([_batch([0, 1]), _batch([1, 2])]), out, _inputs(3), ["a", "b", "c"], "s", "skip", None)
    with pytest.raises(DataError, match=r"/x/1.png: broken \(data.on_bad_image=error"):
        _consume(iter([_batch([0, 1], bad=(1,))]), out, _inputs(2), ["a", "b", "c"], "s", "error", None)


def test_default_output_sits_beside_the_run_evaluations(tmp_path):
    assert default_output(str(tmp_path / "run" / "model"), "/data/new photos/") == str(
        tmp_path / "run" / "predict-new_photos.parquet"
    )
    assert default_output("s3://b/runs/r", "s3://b/in/*.jpg") == "s3://b/runs/r/predict-in.parquet"
    assert default_output("s3://b/runs/r", "/x/batch.parquet") == "s3://b/runs/r/predict-batch.parquet"
