import csv
import json
import os

import pyarrow.parquet as pq
import pytest

from resnet_ray.checkpoint import CheckpointError
from resnet_ray.evaluate import check_model_fits, evaluate

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


def test_evaluate_other_split_with_two_actors(tiny_run, tmp_path):
    cfg, result = tiny_run
    out = evaluate(cfg, result.run_dir, split="val", output=str(tmp_path / "val"))
    assert out["report"]["total_support"] == 144 and out["report"]["split"] == "val"
    assert json.load(open(tmp_path / "val" / "report.json"))["total_support"] == 144


def test_on_a_local_instance_the_job_process_predicts_and_gives_the_actors_report(tiny_run, tmp_path, monkeypatch):
    """eval.in_process_rows null (the default) on the local Ray instance that this process started: no actor
    starts, and the report and every prediction equal those of the Ray Data actors."""
    import resnet_ray.evaluate as ev
    from resnet_ray.config import replace

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
        check_model_fits({"num_classes": 10, "classes": None}, {"name": "tiny4", "classes": list("abcd")}, "m")
