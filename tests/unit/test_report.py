"""resnet_ray.report: files written, formats agree, rich summary renders."""

import csv
import io
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from resnet_ray import calibration as C
from resnet_ray import metrics as M
from resnet_ray.console import print_search_summary, print_summary, print_training_summary
from resnet_ray.plots import write_history_plot, write_reliability_plot
from resnet_ray.report import write_outputs

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
    assert rows[0] == [
        "class",
        "index",
        "precision",
        "recall",
        "f1",
        "support",
        "precision_ci_low",
        "precision_ci_high",
        "recall_ci_low",
        "recall_ci_high",
    ]
    assert len(rows) == c + 1
    assert rows[1][0] == "cls_0" and int(rows[-1][1]) == c - 1
    assert float(rows[3][4]) == pytest.approx(data["per_class"][2]["f1"], abs=1e-12)
    assert [float(v) for v in rows[3][6:]] == pytest.approx(
        data["per_class"][2]["precision_ci"] + data["per_class"][2]["recall_ci"], abs=1e-12
    )

    md = (out / "report.md").read_text()
    assert _md_value(md, "Accuracy (top-1)") == f"{data['accuracy']:.4f}"
    lo, hi = data["accuracy_ci"]
    assert f"**Accuracy (top-1):** {data['accuracy']:.4f} (95% CI [{lo:.4f}, {hi:.4f}])" in md
    lo, hi = data["macro avg"]["f1_ci"]
    assert f"**Macro-F1:** {data['macro avg']['f1']:.4f} (95% CI [{lo:.4f}, {hi:.4f}])" in md
    assert "Wilson score intervals" in md and "1000 resamples" in md
    assert _md_value(md, "Top-5 accuracy") == "0.9321"
    assert _md_value(md, "ECE") == "0.0456"
    assert _md_value(md, "Total support") == str(data["total_support"])
    assert "resnet50" in md and "cifar" in md and "test" in md
    # macro average row and one per-class row agree with the JSON
    macro = data["macro avg"]
    assert (
        f"| macro avg | {macro['precision']:.4f} | {macro['recall']:.4f} | "
        f"{macro['f1']:.4f} | [{lo:.4f}, {hi:.4f}] | {macro['support']} |"
    ) in md
    r = data["per_class"][c - 1]
    (plo, phi), (rlo, rhi) = r["precision_ci"], r["recall_ci"]
    assert (
        f"| {c - 1} | {r['class']} | {r['precision']:.4f} | [{plo:.4f}, {phi:.4f}] | {r['recall']:.4f} | "
        f"[{rlo:.4f}, {rhi:.4f}] | {r['f1']:.4f} | {r['support']} |"
    ) in md
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


def _png_size(path):
    """(width, height) in pixels from the PNG header."""
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_MAGIC, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("c", [10, 30])
def test_write_outputs_pictures(tmp_path, c):
    report, cm, names, _ = _make(c, n=3000)
    rng = np.random.default_rng(1)
    confidence = rng.random(3000)
    calibration = C.calibration_counts(confidence, rng.random(3000) < confidence, n_bins=10)
    paths = write_outputs(report, cm, names, str(tmp_path), calibration=calibration)

    assert paths["reliability_png"] == str(tmp_path / "reliability.png")
    assert _png_size(paths["reliability_png"])[1] > 400
    # the per-class F1 chart only where a confusion matrix is too big to read
    assert (tmp_path / "per_class_f1.png").exists() == (c > 20)
    if c > 20:
        width, height = _png_size(paths["f1_png"])
        assert height > 600 and width > 400  # one readable bar per class
    data = json.loads((tmp_path / "report.json").read_text())
    bins = data["calibration_bins"]
    assert [b["count"] for b in bins] == calibration[:, 0].astype(int).tolist()
    assert bins[9]["low"] == pytest.approx(0.9) and bins[9]["high"] == 1.0
    assert bins[9]["accuracy"] == pytest.approx(calibration[9, 2] / calibration[9, 0])
    md = (tmp_path / "report.md").read_text()
    assert "## Calibration (reliability.png)" in md
    assert f"| (0.900, 1.000] | {bins[9]['count']} | {bins[9]['confidence']:.4f} | {bins[9]['accuracy']:.4f} |" in md
    assert "calibration_bins" not in report  # the caller's dict is left alone


def _history(epochs):
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": 1 - 0.8 / e,
            "val_loss": 2.1 / e,
            "val_top1": 1 - 0.9 / e,
            "val_top5": 1 - 0.3 / e,
            "lr": 0.1 / e,
            "images_per_s": 50.0,
            "epoch_s": 12.5,
        }
        for e in range(1, epochs + 1)
    ]


def test_write_history_plot(tmp_path):
    path = write_history_plot(_history(5), str(tmp_path / "run" / "history.png"))
    width, height = _png_size(path)
    assert width > 2 * height  # three panels side by side
    one = _history(1)
    one[0]["val_loss"] = float("nan")  # a missing value is skipped, not plotted as a gap in the file
    assert _png_size(write_history_plot(one, str(tmp_path / "one.png")))
    with pytest.raises(ValueError, match="empty"):
        write_history_plot([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="row 1 has no 'epoch'"):
        write_history_plot([{"epoch": 1}, {"lr": 0.1}], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_write_reliability_plot_alone(tmp_path):
    counts = C.calibration_counts([0.95, 0.97, 0.6, 0.3], [1, 1, 0, 1], n_bins=15)
    assert _png_size(write_reliability_plot(counts, str(tmp_path / "r.png")))
    with pytest.raises(ValueError, match="n_bins, 3"):
        write_reliability_plot(np.zeros((15, 2)), str(tmp_path / "bad.png"))


LONG = "a_class_name_much_longer_than_usual_{}"


def _narrow_text(print_fn, *args):
    """What a job log (not a terminal) 60 columns wide receives."""
    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=False, color_system=None)
    print_fn(*args, console=console)
    return out.getvalue()


def test_print_summary_not_a_terminal_is_not_truncated():
    names = [LONG.format(i) for i in range(3)]
    cm = np.array([[50, 3, 1], [4, 40, 6], [2, 2, 44]])
    report = M.classification_report(cm, names)
    report.update(dataset="a_dataset_with_a_long_name", split="test", top5_accuracy=0.987654, ece=0.0123)

    text = _narrow_text(print_summary, report)
    for r in report["per_class"]:
        row = next(line for line in text.splitlines() if r["class"] in line)  # the whole name, on one line
        for value in (r["precision"], r["recall"], r["f1"]):
            assert f"{value:.4f}" in row
        assert f"[{r['precision_ci'][0]:.4f}, {r['precision_ci'][1]:.4f}]" in row
        assert f"[{r['recall_ci'][0]:.4f}, {r['recall_ci'][1]:.4f}]" in row
    lo, hi = report["accuracy_ci"]
    flo, fhi = report["macro avg"]["f1_ci"]
    assert (
        f"accuracy {report['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] | macro-F1 {report['macro avg']['f1']:.4f} "
        f"[{flo:.4f}, {fhi:.4f}] | top-5 0.9877 | ECE 0.0123 | total support 152"
    ) in text
    assert "…" not in text

    # the same console as a terminal keeps to its 60 columns (the check above is not vacuous)
    terminal = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    print_summary(report, console=terminal)
    assert LONG.format(0) not in terminal.file.getvalue()


def test_print_training_and_search_summaries_not_a_terminal():
    history = _history(3)
    training = SimpleNamespace(
        run_dir="/runs/" + "r" * 60, history=history, best=history[-1], model_dir="/runs/model", evaluation=None
    )
    text = _narrow_text(print_training_summary, training)
    assert "/runs/" + "r" * 60 in text
    last = next(line for line in text.splitlines() if line.strip().startswith("3 "))
    for value in ("0.6667", "0.7333", "0.7000", "0.9000", "3.33e-02", "50"):
        assert value in last

    trials = [
        {
            "trial_id": f"trial_{i:05d}",
            "status": "TERMINATED",
            "epochs": 2,
            "best_epoch": 2,
            "val_top1": 0.9 + i / 100,
            "params": {"optim.lr": 0.001 * (i + 1), "train.batch_size": 64},
        }
        for i in range(2)
    ]
    search = SimpleNamespace(
        experiment_dir="/exp",
        trials=trials,
        best=trials[1],
        metric="val_top1",
        best_config_path="/exp/" + "c" * 50 + "/best_config.yaml",
        curves_path="/exp/curves.png",
        evaluation=None,
    )
    text = _narrow_text(print_search_summary, search)
    assert "trial_00001" in text and "optim.lr" in text and "train.batch_size" in text and "0.9100" in text
    assert f"python jobs/train.py --config {search.best_config_path}" in text
    assert "curves: /exp/curves.png" in text


def test_progress_bar_shows_the_rate_on_a_terminal_only():
    import io

    from rich.console import Console

    from resnet_ray.console import progress_bar

    terminal = io.StringIO()
    with progress_bar("predicting", Console(file=terminal, force_terminal=True, width=120)) as (start, advance):
        start(10)
        advance(4)
        advance(6)
    assert "predicting" in terminal.getvalue() and "10/10" in terminal.getvalue()
    log = io.StringIO()
    with progress_bar("predicting", Console(file=log, force_terminal=False)) as (start, advance):
        start(10)
        advance(10)
    assert log.getvalue() == ""  # a job log gets the closing summary line instead
    with progress_bar("preparing", Console(file=terminal, force_terminal=True)) as (start, advance):
        pass  # work that never started (an already prepared dataset) shows no bar


def test_progress_bar_rate_is_the_average_since_the_start():
    """Not rich's speed over the last updates: two uneven batches must show the run's throughput."""
    import io

    from rich.console import Console

    from resnet_ray.console import progress_bar

    now = [0.0]
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=120, get_time=lambda: now[0])
    with progress_bar("predicting", console) as (start, advance):
        start(10)
        now[0] = 1.0
        advance(4)
        now[0] = 2.0
        advance(6)  # rich's own speed: 6 img/s (the last second)
    assert "10/10" in terminal.getvalue() and "5 img/s" in terminal.getvalue().split("10/10")[-1]


def test_search_curves_draw_every_trial(tmp_path):
    from resnet_ray.plots import write_search_curves

    trials = [
        {"label": f"arch resnet{d}", "epoch": [1, 2, 3], "train_error": [0.9, 0.6, 0.4], "val_error": [0.8, 0.6, None]}
        for d in (20, 56)
    ]
    path = write_search_curves(trials, str(tmp_path / "curves.png"))
    assert open(path, "rb").read()[:8] == PNG_MAGIC


def _predictions(n=300, c=4, seed=2):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.6, label, (label + 1 + rng.integers(0, c - 1, n)) % c)
    confidence = np.round(rng.random(n), 2)  # ties: the lower row id first
    return {"row_id": rng.permutation(n), "label": label, "pred": pred, "confidence": confidence}


def test_error_selection_is_exactly_the_top_wrong_rows_by_confidence():
    from resnet_ray.report import PER_CLASS_SHOWN, error_rows, error_selection

    p = _predictions()
    selection = error_selection(p, list("abcd"), shown=12)
    wrong = [(-p["confidence"][i], p["row_id"][i]) for i in range(300) if p["pred"][i] != p["label"][i]]
    expected = [int(r) for _, r in sorted(wrong)[:12]]
    assert [r["row_id"] for r in selection["rows"]] == expected
    assert selection["wrong"] == len(wrong) and selection["file"] == "errors.png"
    by_id = {int(r): i for i, r in enumerate(p["row_id"])}
    for r in selection["rows"]:
        i = by_id[r["row_id"]]
        assert (r["label"], r["pred"], r["confidence"]) == (p["label"][i], p["pred"][i], p["confidence"][i])
    counts = [sum(1 for i in range(300) if p["label"][i] == c and p["pred"][i] != c) for c in range(4)]
    assert [e["index"] for e in selection["per_class"]] == sorted(range(4), key=lambda c: (-counts[c], c))
    for entry in selection["per_class"]:
        mine = sorted(
            (-p["confidence"][i], p["row_id"][i])
            for i in range(300)
            if p["label"][i] == entry["index"] and p["pred"][i] != p["label"][i]
        )
        assert [r["row_id"] for r in entry["rows"]] == [int(r) for _, r in mine[:PER_CLASS_SHOWN]]
        assert entry["file"] == f"per_class_errors/{entry['index']:03d}-{'abcd'[entry['index']]}.png"
    assert set(error_rows(selection)) == {r["row_id"] for e in [selection, *selection["per_class"]] for r in e["rows"]}
    perfect = error_selection({**p, "pred": p["label"]}, list("abcd"))
    assert perfect["rows"] == [] and perfect["per_class"] == [] and perfect["wrong"] == 0


def test_write_outputs_with_galleries_and_calibration_before_and_after(tmp_path):
    from resnet_ray.report import error_rows, error_selection

    report, cm, names, _ = _make(4, n=300)
    p = _predictions()
    report["errors"] = error_selection(p, names, shown=10)
    report["calibration"] = {
        "temperature": 1.5,
        "fitted_on": "val",
        "before": {"nll": 0.9, "ece": 0.12},
        "after": {"nll": 0.7, "ece": 0.02},
    }
    report["tta"] = "flip"
    images = {i: np.full((8, 8, 3), i % 255, np.uint8) for i in error_rows(report["errors"])}
    rng = np.random.default_rng(0)
    conf = rng.random(300)
    after = C.calibration_counts(conf * 0.8, rng.random(300) < conf, 15)
    before = C.calibration_counts(conf, rng.random(300) < conf, 15)
    paths = write_outputs(
        report, cm, names, str(tmp_path), calibration=after, calibration_before=before, error_images=images
    )
    assert open(paths["errors_png"], "rb").read(8) == PNG_MAGIC
    files = sorted(os.listdir(tmp_path / "per_class_errors"))
    assert files == sorted(os.path.basename(e["file"]) for e in report["errors"]["per_class"]) and len(files) == 4
    md = (tmp_path / "report.md").read_text()
    assert "[errors.png](errors.png)" in md and "(per_class_errors/000-cls_0.png)" in md
    assert "Temperature 1.5 (fitted on val): NLL 0.9000 -> 0.7000, ECE 0.1200 -> 0.0200" in md
    assert "Test-time augmentation (eval.tta):** flip" in md and "Before the temperature (T = 1):" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert [b["count"] for b in data["calibration_bins_uncalibrated"]] == before[:, 0].astype(int).tolist()
    assert _png_size(paths["reliability_png"])[1] > 400
    out = io.StringIO()
    print_summary(data, console=Console(file=out, width=200, color_system=None), output="/runs/r/eval-test")
    text = out.getvalue()
    assert "ECE 0.1200 -> 0.0200" in text and "temperature 1.5 (fitted on val)" in text
    assert "test-time augmentation: flip" in text
    assert "most confident mistakes (10 of " in text and "/runs/r/eval-test/errors.png" in text


def test_error_gallery_without_mistakes(tmp_path):
    from resnet_ray.plots import write_error_gallery

    assert open(write_error_gallery(str(tmp_path / "e.png"), [], [], "none"), "rb").read(8) == PNG_MAGIC
