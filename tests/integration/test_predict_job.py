"""jobs/predict.py on the session's Ray: a folder of image files (with a corrupt one) and a Parquet file, made from
the first test rows of the tiny run's data; each prediction must equal the evaluation job's for the same image."""

import glob
import io
import json
import os
import runpy
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_ray import cli
from resnet_ray.data.load import table_to_batch
from resnet_ray.data.prepare import dataset_dir
from resnet_ray.predict import predict

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 12


@pytest.fixture(scope="module")
def test_images(tiny_run):
    """(row ids, uint8 images, the evaluation's top-1 per row id) of the first N rows of the evaluated split."""
    cfg, result = tiny_run
    files = sorted(glob.glob(os.path.join(dataset_dir(cfg.data), "test", "*.parquet")))
    batch = table_to_batch(pq.read_table(files[0]).slice(0, N), 32)
    evaluated = pq.read_table(os.path.join(result.evaluation["output"], "predictions.parquet")).to_pydict()
    pred = dict(zip(evaluated["row_id"], evaluated["pred"]))
    return batch["row_id"], batch["image"], [pred[i] for i in batch["row_id"]]


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check(table: dict, expected_pred: list, sha: str, classes: list) -> None:
    assert table["pred"] == expected_pred  # the evaluation job's top-1 for the same images
    assert all(0 < sum(p) <= 1 + 1e-9 for p in table["top_probs"])  # top-5 of 10 classes: at most 1
    assert all(len(c) == 5 and c[0] == classes[p] for c, p in zip(table["top_classes"], table["pred"]))
    assert all(p == sorted(p, reverse=True) for p in table["top_probs"])
    assert set(table["model_sha256"]) == {sha} and table["class"] == [classes[p] for p in table["pred"]]


def test_predict_job_on_a_folder_with_a_corrupt_file(tiny_run, test_images, tmp_path, monkeypatch, capsys):
    cfg, result = tiny_run
    row_ids, images, expected_pred = test_images
    folder = tmp_path / "unlabeled"
    (folder / "sub").mkdir(parents=True)
    for i, image in zip(row_ids, images):
        (folder / ("sub" if i % 2 else "") / f"img-{i:03d}.png").write_bytes(_png(image))
    (folder / "zz-broken.png").write_bytes(_png(images[0])[:100])
    out = tmp_path / "out" / "predictions.parquet"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "jobs/predict.py",
            "--local",
            "--model",
            result.run_dir,
            "--input",
            str(folder),
            "--output",
            str(out),
            "--data.on_bad_image",
            "skip",
            "--no-calibration",
        ],
    )
    # the job ends its process with os._exit after its work (cli.finish): here, in pytest's process, a plain exit
    monkeypatch.setattr(cli, "finish", sys.exit)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "jobs", "predict.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed
    assert f"{N + 1} images, 1 skipped (unreadable) in " in printed and f"predictions in {out}" in printed
    assert "raw (T = 1) probabilities, eval.tta none" in printed
    assert os.listdir(out.parent) == ["predictions.parquet"]  # written atomically: no temporary file left
    table = pq.read_table(out).to_pydict()
    assert sorted(table["row_id"]) == list(range(N + 1))  # every input exactly once
    by_path = {p: i for i, p in enumerate(table["path"])}
    broken = by_path.pop(str(folder / "zz-broken.png"))
    assert table["pred"][broken] is None and "cannot decode image" in table["error"][broken]
    good = [by_path[str(folder / ("sub" if i % 2 else "") / f"img-{i:03d}.png")] for i in row_ids]
    rows = {key: [values[j] for j in good] for key, values in table.items()}
    assert set(rows["error"]) == {None}
    info = json.load(open(os.path.join(result.model_dir, "model.json")))
    assert info["resize"]["policy"] == "center_crop" and info["resize"]["size"] == 32
    _check(rows, expected_pred, info["sha256"], info["classes"])


def test_predict_on_a_parquet_file(tiny_run, test_images, tmp_path):
    cfg, result = tiny_run
    row_ids, images, expected_pred = test_images
    source = tmp_path / "images.parquet"
    pq.write_table(
        pa.table({"img": pa.array([{"bytes": _png(im), "path": f"{i}.png"} for i, im in zip(row_ids, images)])}),
        source,
        row_group_size=5,
    )
    out = predict(cfg, result.run_dir, str(source), output=str(tmp_path / "p.parquet"), image_column="img")
    assert out["rows"] == N and out["predicted"] == N and out["skipped"] == []
    table = pq.read_table(tmp_path / "p.parquet").sort_by("row_id").to_pydict()
    assert table["row_id"] == list(range(N)) and table["row"] == list(range(N))  # 3 row groups, in order
    assert set(table["path"]) == {str(source)}
    info = json.load(open(os.path.join(result.model_dir, "model.json")))
    _check(table, expected_pred, info["sha256"], info["classes"])
    # calibrated by default (the run's temperature), raw with calibrated=False: the same classes, in the same order
    assert out["calibrated"] and set(table["temperature"]) == {info["temperature"]} != {1.0}
    raw = predict(
        cfg, result.run_dir, str(source), output=str(tmp_path / "raw.parquet"), image_column="img", calibrated=False
    )
    untempered = pq.read_table(tmp_path / "raw.parquet").sort_by("row_id").to_pydict()
    assert raw["temperature"] == 1.0 and set(untempered["temperature"]) == {1.0}
    assert untempered["pred"] == table["pred"] and untempered["top_classes"] == table["top_classes"]
    assert untempered["top_probs"] != table["top_probs"]
