"""resnet_ray.compare and jobs/compare.py on tiny synthetic evaluation folders (no Ray)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from scipy.stats import binomtest

from resnet_ray import metrics as M
from resnet_ray.compare import (
    ComparisonError,
    compare_folders,
    mcnemar_exact,
    print_comparison,
    verdict_line,
    write_comparison,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ["airplane", "automobile", "bird", "cat"]


def write_eval(folder, labels, preds, dataset="digits", split="test", classes=CLASSES, shuffle_seed=0):
    """An evaluation folder as jobs/evaluate.py leaves it: report.json and predictions.parquet (rows shuffled)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    report = M.classification_report(M.confusion_matrix(labels, preds, len(classes)), classes, n_resamples=200)
    report.update(dataset=dataset, split=split, rows=len(labels))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f)
    order = np.random.default_rng(shuffle_seed).permutation(len(labels))
    pq.write_table(
        pa.table(
            {"row_id": order, "label": labels[order], "pred": preds[order], "confidence": np.full(len(labels), 0.9)}
        ),
        os.path.join(folder, "predictions.parquet"),
    )
    return str(folder)


def paired(n=1000, a_only=5, b_only=25, both_wrong=100, seed=0):
    """Labels and two prediction vectors with exactly the given discordant counts."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    wrong = (labels + 1) % len(CLASSES)
    kind = rng.permutation(np.repeat([0, 1, 2, 3], [n - a_only - b_only - both_wrong, a_only, b_only, both_wrong]))
    pred_a = np.where((kind == 0) | (kind == 1), labels, wrong)  # A right on "both" and "A only"
    pred_b = np.where((kind == 0) | (kind == 2), labels, wrong)
    return labels, pred_a, pred_b


@pytest.mark.parametrize("a_only,b_only", [(0, 10), (5, 25), (25, 5), (10, 12), (0, 1), (40, 40), (3, 200)])
def test_mcnemar_matches_scipy_binomtest(a_only, b_only):
    expected = binomtest(b_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_hand_values():
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(7, 7) == 1.0


def test_compare_counts_p_value_and_verdict(tmp_path):
    labels, pred_a, pred_b = paired(a_only=5, b_only=25)
    a = write_eval(tmp_path / "a", labels, pred_a, shuffle_seed=1)
    b = write_eval(tmp_path / "b", labels, pred_b, shuffle_seed=2)  # a different row order: pairing is by row id
    result = compare_folders(a, b)
    assert result["pairs"] == {"both_right": 870, "a_only": 5, "b_only": 25, "both_wrong": 100}
    assert result["accuracy"]["difference"] == pytest.approx(0.02)
    assert result["p_value"] == pytest.approx(binomtest(25, 30).pvalue, rel=1e-10)
    assert result["significant"]
    assert result["verdict"] == f"B is better than A: +2.00 points of accuracy, p = {result['p_value']:.3g}"
    # per-class F1 differences are those of the two reports, largest drop first
    f1_a = json.load(open(os.path.join(a, "report.json")))["per_class"]
    f1_b = json.load(open(os.path.join(b, "report.json")))["per_class"]
    for row in result["per_class"]:
        assert row["difference"] == pytest.approx(f1_b[row["index"]]["f1"] - f1_a[row["index"]]["f1"])
    assert [r["difference"] for r in result["per_class"]] == sorted(r["difference"] for r in result["per_class"])

    swapped = compare_folders(os.path.join(b, "report.json"), a)  # a report.json path works too
    assert swapped["verdict"].startswith("A is better than B: +2.00 points")


def test_compare_not_significant(tmp_path):
    labels, pred_a, pred_b = paired(a_only=10, b_only=12)
    result = compare_folders(write_eval(tmp_path / "a", labels, pred_a), write_eval(tmp_path / "b", labels, pred_b))
    assert not result["significant"]
    assert result["verdict"].startswith("no significant difference at the 5% level: B - A = +0.20 points")
    assert (
        verdict_line(0.0, 1.0) == "no significant difference at the 5% level: B - A = +0.00 points of accuracy, p = 1"
    )


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"dataset": "cifar10"}, "different datasets: A has 'digits'"),
        ({"split": "val"}, "different splits: A has 'test'"),
        ({"classes": ["a", "b", "c", "d"]}, "different classes"),
    ],
)
def test_refuses_different_datasets_splits_classes(tmp_path, change, needle):
    labels, pred_a, pred_b = paired()
    a = write_eval(tmp_path / "a", labels, pred_a)
    b = write_eval(tmp_path / "b", labels, pred_b, **change)
    with pytest.raises(ComparisonError, match=needle):
        compare_folders(a, b)


def test_refuses_different_rows_or_labels(tmp_path):
    labels, pred_a, pred_b = paired()
    a = write_eval(tmp_path / "a", labels, pred_a)
    with pytest.raises(ComparisonError, match="different row counts: A has 1000"):
        compare_folders(a, write_eval(tmp_path / "short", labels[:999], pred_b[:999]))
    shifted = write_eval(tmp_path / "shifted", labels, pred_b)
    table = pq.read_table(os.path.join(shifted, "predictions.parquet"))
    table = table.set_column(0, "row_id", pa.array(table.column("row_id").to_numpy() + 5))
    pq.write_table(table, os.path.join(shifted, "predictions.parquet"))
    with pytest.raises(ComparisonError, match="different rows: in row id order, A has row_id 0 where B has 5"):
        compare_folders(a, shifted)
    relabelled = labels.copy()
    relabelled[17] = (relabelled[17] + 2) % 4
    with pytest.raises(ComparisonError, match=f"row_id 17 has label {labels[17]} in A but {relabelled[17]} in B"):
        compare_folders(a, write_eval(tmp_path / "relabelled", relabelled, pred_b))


def test_refuses_unreadable_or_inconsistent_folders(tmp_path):
    labels, pred_a, pred_b = paired()
    a = write_eval(tmp_path / "a", labels, pred_a)
    with pytest.raises(ComparisonError, match="report.json not found"):
        compare_folders(a, str(tmp_path / "nowhere"))
    b = write_eval(tmp_path / "b", labels, pred_b)
    pq.write_table(pa.table({"row_id": np.arange(1000), "label": labels}), os.path.join(b, "predictions.parquet"))
    with pytest.raises(ComparisonError, match="no 'pred' column"):
        compare_folders(a, b)
    c = write_eval(tmp_path / "c", labels, pred_b)
    pq.write_table(
        pa.table({"row_id": np.arange(1000), "label": labels, "pred": pred_a}), os.path.join(c, "predictions.parquet")
    )  # predictions of another model
    with pytest.raises(ComparisonError, match="not from the same evaluation"):
        compare_folders(a, c)
    twice = np.arange(1000)
    twice[999] = 3
    pq.write_table(pa.table({"row_id": twice, "label": labels, "pred": pred_b}), os.path.join(c, "predictions.parquet"))
    with pytest.raises(ComparisonError, match="row_id 3 appears more than once"):
        compare_folders(a, c)
    with pytest.raises(ComparisonError, match="alpha"):
        compare_folders(a, a, alpha=5)


def test_write_and_print_comparison(tmp_path):
    labels, pred_a, pred_b = paired(a_only=5, b_only=25)
    result = compare_folders(write_eval(tmp_path / "a", labels, pred_a), write_eval(tmp_path / "b", labels, pred_b))
    paths = write_comparison(result, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["comparison.json", "comparison.md"]  # no temp files left
    data = json.load(open(paths["json"]))
    assert data["pairs"]["b_only"] == 25 and data["verdict"] == result["verdict"]
    md = open(paths["markdown"]).read()
    assert f"**Verdict: {result['verdict']}**" in md
    worst = result["per_class"][0]
    assert f"| {worst['index']} | {worst['class']} | {worst['f1_a']:.4f} | {worst['f1_b']:.4f} |" in md

    console = Console(record=True, width=60, force_terminal=False)
    print_comparison(result, console=console)
    text = console.export_text()
    assert result["verdict"] in text and "automobile" in text and "+2.00 points" in text


def test_job_script(tmp_path):
    labels, pred_a, pred_b = paired(a_only=5, b_only=25)
    a, b = write_eval(tmp_path / "a", labels, pred_a), write_eval(tmp_path / "b", labels, pred_b)
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "compare.py"), a, b, "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "B is better than A: +2.00 points of accuracy" in run.stdout
    assert (tmp_path / "out" / "comparison.md").is_file()
    other = write_eval(tmp_path / "val", labels, pred_b, split="val")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "compare.py"), a, other],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: the evaluations are of different splits")
    assert not (tmp_path / "comparison.json").exists()


def test_a_tta_evaluation_is_paired_with_a_plain_one_only_when_asked(tmp_path):
    labels, pred_a, pred_b = paired()
    plain = write_eval(tmp_path / "plain", labels, pred_a)  # an old report: no "tta" field at all
    flipped = write_eval(tmp_path / "flip", labels, pred_b)
    report = json.load(open(os.path.join(flipped, "report.json")))
    json.dump({**report, "tta": "flip"}, open(os.path.join(flipped, "report.json"), "w"))
    with pytest.raises(ComparisonError, match="B with eval.tta flip .* pass --allow-tta"):
        compare_folders(plain, flipped)
    result = compare_folders(plain, flipped, allow_tta=True)
    assert result["tta"] == {"a": "none", "b": "flip"} and result["pairs"]["b_only"] == 25
    write_comparison(result, str(tmp_path / "out"))
    assert "Test-time augmentation (eval.tta):** A none, B flip" in open(tmp_path / "out" / "comparison.md").read()
    assert compare_folders(plain, write_eval(tmp_path / "old", labels, pred_b))["tta"] == {"a": "none", "b": "none"}
    done = subprocess.run(
        [sys.executable, "jobs/compare.py", plain, flipped, "--output", str(tmp_path / "job")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--allow-tta" in done.stderr
