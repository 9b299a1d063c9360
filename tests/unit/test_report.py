"""resnet_ray.report: files written, formats agree, rich summary renders."""
import csv
import json
import os
import re

import numpy as np
import pytest
from rich.console import Console

from resnet_ray import metrics as M
from resnet_ray.report import print_summary, write_outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make(c, n=2000, seed=0, coarse_k=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, c, n))
    names = [f"cls_{i}" for i in range(c)]
    cm = M.confusion_matrix(y, p, c)
    report = M.classification_report(cm, names)
    report.update(
        model={"arch": "resnet50", "checkpoint": "ckpt/epoch_3"},
        dataset="cifar100" if c == 100 else "cifar10",
        split="test",
        config={"optim": {"lr": 0.01}, "seed": seed},
        top5_accuracy=np.float64(0.9321),  # numpy scalars must serialise
        ece=0.0456,
        confused_pairs=M.most_confused_pairs(cm, names, k=10),
    )
    coarse_cm = None
    if coarse_k:
        f2c = np.arange(c) % coarse_k
        coarse_cm = M.coarse_confusion_matrix(cm, f2c, coarse_k)
        cnames = [f"super_{i}" for i in range(coarse_k)]
        report["coarse"] = M.classification_report(coarse_cm, cnames)
        report["coarse"]["confused_pairs"] = M.most_confused_pairs(coarse_cm, cnames)
    return report, cm, names, coarse_cm


def _md_value(md, label):
    m = re.search(rf"\*\*{re.escape(label)}:\*\* ([0-9.]+)", md)
    assert m, label
    return m.group(1)


@pytest.mark.parametrize("c,coarse_k", [(10, None), (100, 20)])
def test_write_outputs(tmp_path, c, coarse_k):
    report, cm, names, coarse_cm = _make(c, coarse_k=coarse_k)
    out = tmp_path / "nested" / "eval"
    paths = write_outputs(report, cm, names, str(out), coarse_cm=coarse_cm)

    for name in ("report.json", "per_class.csv", "report.md", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    # atomic writes leave no temp files behind
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    if coarse_k:
        assert (out / "coarse_confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
        assert paths["coarse_png"].endswith("coarse_confusion_matrix.png")

    data = json.loads((out / "report.json").read_text())
    assert data["total_support"] == int(cm.sum())
    assert data["top5_accuracy"] == pytest.approx(0.9321)
    assert len(data["per_class"]) == c
    assert data["model"]["arch"] == "resnet50"

    with open(out / "per_class.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["class", "index", "precision", "recall", "f1", "support"]
    assert len(rows) == c + 1
    assert rows[1][0] == "cls_0" and int(rows[-1][1]) == c - 1
    assert float(rows[3][4]) == pytest.approx(data["per_class"][2]["f1"], abs=1e-12)

    md = (out / "report.md").read_text()
    assert _md_value(md, "Accuracy (top-1)") == f"{data['accuracy']:.4f}"
    assert _md_value(md, "Top-5 accuracy") == "0.9321"
    assert _md_value(md, "ECE") == "0.0456"
    assert _md_value(md, "Total support") == str(data["total_support"])
    assert "resnet50" in md and "cifar" in md and "test" in md
    # macro average row and one per-class row agree with the JSON
    macro = data["macro avg"]
    assert (f"| macro avg | {macro['precision']:.4f} | {macro['recall']:.4f} | "
            f"{macro['f1']:.4f} | {macro['support']} |") in md
    r = data["per_class"][c - 1]
    assert (f"| {c - 1} | {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | "
            f"{r['f1']:.4f} | {r['support']} |") in md
    top = data["confused_pairs"][0]
    assert f"| {top['true']} | {top['predicted']} | {top['count']} | {top['fraction']:.4f} |" in md
    if coarse_k:
        assert "Coarse (superclass) level" in md
        assert "super_0" in md
        cmacro = data["coarse"]["macro avg"]
        assert f"| macro avg | {cmacro['precision']:.4f} |" in md


def test_write_outputs_overwrites_and_handles_nan(tmp_path):
    report, cm, names, _ = _make(10, n=50)
    report["ece"] = float("nan")
    write_outputs(report, cm, names, str(tmp_path))
    write_outputs(report, cm, names, str(tmp_path))  # second run replaces files
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ece"] is None
    assert "**ECE:** n/a" in (tmp_path / "report.md").read_text()


def test_write_outputs_without_optional_keys(tmp_path):
    names = ["a", "b", "c"]
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    report = M.classification_report(cm, names)
    write_outputs(report, cm, names, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "Top-5" not in md and "| a | c |" not in md and "| a | b | 1 | 0.2500 |" in md
    with pytest.raises(ValueError):
        write_outputs(report, cm, names[:2], str(tmp_path))


@pytest.mark.parametrize("c", [10, 100])
def test_print_summary(c):
    report, cm, names, _ = _make(c, coarse_k=5 if c == 100 else None)
    console = Console(record=True, width=120, force_terminal=False)
    print_summary(report, console=console, worst=5)
    text = console.export_text()
    assert "cls_0" in text and f"cls_{c - 1}" in text
    assert "macro avg" in text and "weighted avg" in text
    assert f"accuracy {report['accuracy']:.4f}" in text
    assert "top-5 0.9321" in text and f"total support {report['total_support']}" in text
    if c == 100:
        assert "super_0" in text


def test_print_summary_highlights_worst():
    names = ["good", "bad", "ok"]
    cm = np.array([[10, 0, 0], [5, 1, 4], [1, 1, 8]])
    report = M.classification_report(cm, names)
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    print_summary(report, console=console, worst=1)
    html = console.export_html(inline_styles=True)
    bad_line = next(line for line in html.splitlines() if "bad" in line)
    good_line = next(line for line in html.splitlines() if "good" in line)
    assert "color: #800000" in bad_line or "color: #ff0000" in bad_line
    assert "#800000" not in good_line and "#ff0000" not in good_line
