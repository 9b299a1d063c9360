import csv
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from resnet_ray.checkpoint import CheckpointError
from resnet_ray.compare import ComparisonError, compare_folders
from resnet_ray.config_files import replace
from resnet_ray.data.layout import read_rows
from resnet_ray.data.load import read_split
from resnet_ray.data.prepare import dataset_dir
from resnet_ray.evaluate import calibrate, check_model_fits, evaluate
from resnet_ray.saved_model import SavedModel

pytestmark = pytest.mark.slow


def test_training_ends_with_a_complete_test_report(tiny_run):
    cfg, result = tiny_run
    out = result.evaluation["output"]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["total_support"] == report["rows"] == 240  # data.limit rows of the test split, each once
    assert sum(r["support"] for r in report["per_class"]) == 240
    assert {
        "report.json",
        "report.md",
        "per_class.csv",
        "confusion_matrix.png",
        "reliability.png",
        "predictions.parquet",
        "errors.png",
    } <= set(os.listdir(out))
    predictions = pq.read_table(os.path.join(out, "predictions.parquet")).to_pydict()
    assert sorted(predictions["row_id"]) == list(range(240))
    accuracy = sum(p == y for p, y in zip(predictions["pred"], predictions["label"])) / 240
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert all(len(t) == 5 and t[0] == p for t, p in zip(predictions["top5"], predictions["pred"]))
    # the Markdown shows the same numbers as the JSON
    md = open(os.path.join(out, "report.md")).read()
    assert f"{report['accuracy']:.4f}" in md
    assert f"{report['macro avg']['f1']:.4f}" in md
    rows = list(csv.DictReader(open(os.path.join(out, "per_class.csv"))))
    assert [float(r["f1"]) for r in rows] == pytest.approx([r["f1"] for r in report["per_class"]])
    assert open(os.path.join(out, "confusion_matrix.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_gallery_shows_exactly_the_most_confident_mistakes_from_the_stored_pixels(tiny_run):
    cfg, result = tiny_run
    out = result.evaluation["output"]
    report = json.load(open(os.path.join(out, "report.json")))
    predictions = pq.read_table(os.path.join(out, "predictions.parquet")).to_pydict()
    wrong = sorted(
        (-c, r) for r, y, p, c in zip(*(predictions[k] for k in ("row_id", "label", "pred", "confidence"))) if p != y
    )
    errors = report["errors"]
    assert [r["row_id"] for r in errors["rows"]] == [r for _, r in wrong[: cfg.eval.errors_shown]]
    assert errors["wrong"] == len(wrong) and errors["rows"][0]["confidence"] == -wrong[0][0]
    assert open(os.path.join(out, "errors.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(out, "per_class_errors"))) == sorted(
        os.path.basename(e["file"]) for e in errors["per_class"]
    )
    md = open(os.path.join(out, "report.md")).read()
    assert "[errors.png](errors.png)" in md and all(f"({e['file']})" in md for e in errors["per_class"])
    # the pixels drawn are the stored ones, read by row id without a second inference
    prepared = dataset_dir(cfg.data)
    shown = read_rows(prepared, "test", [r["row_id"] for r in errors["rows"]], 32)
    stored = {int(i): im for b in read_split(cfg.data, "test", prepared) for i, im in zip(b["row_id"], b["image"])}
    assert all((shown[i] == stored[i]).all() for i in shown) and len(shown) == len(errors["rows"])


def test_the_run_fits_a_temperature_on_val_and_the_report_shows_before_and_after(tiny_run, tmp_path):
    cfg, result = tiny_run
    info = json.load(open(os.path.join(result.model_dir, "model.json")))
    record = info["calibration"]
    assert record["fitted"] and record["split"] == "val" and record["rows"] == 144
    assert info["temperature"] == record["temperature"] == result.calibration["temperature"]
    assert record["nll_after"] <= record["nll_before"] + 1e-9
    report = result.evaluation["report"]
    calibration = report["calibration"]
    assert calibration["temperature"] == info["temperature"] and calibration["fitted_on"] == "val"
    assert report["ece"] == calibration["after"]["ece"] and report["nll"] == calibration["after"]["nll"]
    bins = json.load(open(os.path.join(result.evaluation["output"], "report.json")))["calibration_bins_uncalibrated"]
    assert sum(b["count"] for b in bins) == 240
    predictions = pq.read_table(os.path.join(result.evaluation["output"], "predictions.parquet")).to_pydict()
    assert all(0 < c <= 1 for c in predictions["confidence_raw"])
    # a refit on train+val has no validation split: it says so and keeps T = 1 (on a copy of the model)
    copy = shutil.copytree(result.model_dir, tmp_path / "model")
    refit = calibrate(replace(cfg, {"train.refit_on_val": True}), str(copy))
    assert refit["fitted"] is False and "no validation split" in refit["reason"]
    assert json.load(open(copy / "model.json"))["temperature"] == 1.0


def test_flip_tta_changes_the_report_only_where_it_says_so(tiny_run, tmp_path):
    cfg, result = tiny_run
    tta = evaluate(replace(cfg, {"eval.tta": "flip"}), result.run_dir, split="test", output=str(tmp_path / "tta"))
    plain, flipped = result.evaluation["report"], tta["report"]
    assert (plain["tta"], flipped["tta"]) == ("none", "flip")
    assert "Test-time augmentation (eval.tta):** flip" in open(tmp_path / "tta" / "report.md").read()
    for key in ("dataset", "split", "rows", "total_support", "model_info", "num_classes"):
        assert plain[key] == flipped[key], key
    assert flipped["calibration"]["temperature"] == plain["calibration"]["temperature"]
    with pytest.raises(ComparisonError, match="--allow-tta"):
        compare_folders(result.evaluation["output"], str(tmp_path / "tta"))
    gain = compare_folders(result.evaluation["output"], str(tmp_path / "tta"), allow_tta=True)
    assert gain["tta"] == {"a": "none", "b": "flip"} and 0 <= gain["p_value"] <= 1
    assert gain["accuracy"]["difference"] == pytest.approx(flipped["accuracy"] - plain["accuracy"])


def test_evaluate_other_split_with_two_actors(tiny_run, tmp_path):
    cfg, result = tiny_run
    out = evaluate(cfg, result.run_dir, split="val", output=str(tmp_path / "val"))
    assert out["report"]["total_support"] == 144 and out["report"]["split"] == "val"
    assert json.load(open(tmp_path / "val" / "report.json"))["total_support"] == 144


def test_on_a_local_instance_the_job_process_predicts_and_gives_the_actors_report(tiny_run, tmp_path, monkeypatch):
    """eval.in_process_rows null (the default) on the local Ray instance that this process started: no actor
    starts, and the report and every prediction equal those of the Ray Data actors."""
    import resnet_ray.evaluate as ev

    cfg, result = tiny_run
    monkeypatch.setattr(ev, "predict_stream", lambda *a, **k: pytest.fail("started Ray Data actors"))
    here = evaluate(
        replace(cfg, {"eval.in_process_rows": None}), result.run_dir, split="test", output=str(tmp_path / "here")
    )
    actors = result.evaluation
    for key in ("accuracy", "total_support", "top5_accuracy", "ece"):
        assert here["report"][key] == pytest.approx(actors["report"][key]), key
    assert [r["f1"] for r in here["report"]["per_class"]] == pytest.approx(
        [r["f1"] for r in actors["report"]["per_class"]]
    )
    a, b = (
        pq.read_table(os.path.join(out, "predictions.parquet")).sort_by("row_id").to_pydict()
        for out in (actors["output"], here["output"])
    )
    assert a["pred"] == b["pred"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)


def test_bad_model_inputs_fail_before_inference(tiny_run, tmp_path, data_root):
    cfg, result = tiny_run
    with pytest.raises(CheckpointError, match="no such model folder"):
        evaluate(cfg, str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "model.pt"):
        (broken / name).write_bytes(open(os.path.join(result.model_dir, name), "rb").read())
    with open(broken / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="SHA-256"):
        evaluate(cfg, str(broken))
    with pytest.raises(CheckpointError, match="has 10 classes, dataset tiny4 has 4"):
        check_model_fits(SavedModel("m", {"num_classes": 10}, True), {"name": "tiny4", "classes": list("abcd")}, "m")
