"""Render a ``metrics.classification_report`` dict to files.

``write_outputs`` writes, atomically (``storage.write_bytes``: a temporary sibling, then a move), into a local
folder:

* ``report.json`` - the whole report dict (numpy values converted, non-finite floats written as ``null``), with
  ``calibration_bins`` when calibration counts are given,
* ``per_class.csv`` - ``class,index,precision,recall,f1,support`` and the 95% interval bounds of precision and
  recall,
* ``report.md`` - human-readable Markdown (numbers to 4 decimals, intervals in brackets),
* the figures of :mod:`resnet_ray.plots`: ``confusion_matrix.png`` (row-normalised), ``reliability.png`` (when
  calibration counts are given; before and after the temperature when both are), ``per_class_f1.png`` (more
  than 20 classes), and ``coarse_per_class.csv`` / ``coarse_confusion_matrix.png`` when a ``coarse`` sub-report /
  ``coarse_cm`` are given,
* ``errors.png`` and ``per_class_errors/<index>-<class>.png`` when the report has an ``errors`` selection
  (:func:`error_selection`: the most confidently wrong rows of the split, and each class's, for up to 20 classes)
  and their images are given.

The terminal tables are in :mod:`resnet_ray.console`. No ray/torch imports.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from resnet_ray import storage
from resnet_ray.calibration import calibration_bins
from resnet_ray.formatting import AVERAGES, fmt, fmt_ci, identity, per_class_cells, to_jsonable
from resnet_ray.metrics import most_confused_pairs
from resnet_ray.plots import plot_confusion, plot_f1, write_error_gallery, write_reliability_plot

_CSV_FIELDS = (
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
)

F1_CHART_MIN_CLASSES = 21  # per_class_f1.png for more classes than a confusion matrix shows legibly
ERRORS_FILE = "errors.png"
PER_CLASS_ERRORS = "per_class_errors"
PER_CLASS_SHOWN = 8  # mistakes per class in per_class_errors/
PER_CLASS_MAX = 20  # classes with a per_class_errors/ picture: those with the most mistakes


# ---------------------------------------------------------------------------
# the most confident mistakes (errors.png, per_class_errors/)


def _worst(row_id: np.ndarray, confidence: np.ndarray, wrong: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` wrong rows of highest confidence, most confident first (ties: lower row id)."""
    positions = np.flatnonzero(wrong)
    order = np.lexsort((row_id[positions], -confidence[positions]))
    return positions[order[:n]]


def error_selection(predictions: Any, classes: Sequence[str], shown: int = 32) -> dict:
    """The report's ``errors``: which rows errors.png and per_class_errors/ show, from the predictions table.

    Args:
        predictions: table or dict of columns ``row_id``, ``label``, ``pred``, ``confidence`` (predictions.parquet).
        classes: class names, by index.
        shown: rows of errors.png: the ``shown`` wrong rows with the highest confidence, most confident first.

    Returns:
        ``{"file", "shown", "wrong", "rows": [{"row_id", "label", "pred", "confidence"}], "per_class": [{"index",
        "class", "file", "wrong", "rows"}]}``: per_class for the classes (by true label) with the most mistakes, at
        most PER_CLASS_MAX of them, each with its PER_CLASS_SHOWN most confident mistakes.
    """
    columns = {
        key: np.asarray(predictions[key] if isinstance(predictions, dict) else predictions.column(key).to_numpy())
        for key in ("row_id", "label", "pred", "confidence")
    }
    wrong = columns["pred"] != columns["label"]

    def rows(positions: np.ndarray) -> list[dict]:
        return [
            {
                "row_id": int(columns["row_id"][i]),
                "label": int(columns["label"][i]),
                "pred": int(columns["pred"][i]),
                "confidence": float(columns["confidence"][i]),
            }
            for i in positions
        ]

    per_class_wrong = np.bincount(columns["label"][wrong], minlength=len(classes))
    ranked = [int(c) for c in np.lexsort((np.arange(len(classes)), -per_class_wrong)) if per_class_wrong[c] > 0]
    per_class = [
        {
            "index": c,
            "class": str(classes[c]),
            "file": f"{PER_CLASS_ERRORS}/{c:03d}-{_file_name(classes[c])}.png",
            "wrong": int(per_class_wrong[c]),
            "rows": rows(
                _worst(columns["row_id"], columns["confidence"], wrong & (columns["label"] == c), PER_CLASS_SHOWN)
            ),
        }
        for c in ranked[:PER_CLASS_MAX]
    ]
    return {
        "file": ERRORS_FILE,
        "shown": int(shown),
        "wrong": int(wrong.sum()),
        "rows": rows(_worst(columns["row_id"], columns["confidence"], wrong, int(shown))),
        "per_class": per_class,
    }


def _file_name(name: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))[:40] or "class"


def error_rows(selection: dict) -> list[int]:
    """Every row id that errors.png and per_class_errors/ show (the pixels to read)."""
    ids = {r["row_id"] for r in selection["rows"]}
    for entry in selection["per_class"]:
        ids.update(r["row_id"] for r in entry["rows"])
    return sorted(ids)


def _write_galleries(out_dir: str, selection: dict, images: dict, names: Sequence[str]) -> dict:
    """errors.png and per_class_errors/*.png from the selection and {row id: image}; {kind: path}."""

    def caption(r: dict) -> str:
        return f"true {names[r['label']]}\npred {names[r['pred']]} {r['confidence']:.2f}\nrow {r['row_id']}"

    def draw(path: str, rows: list, title: str) -> None:
        write_error_gallery(path, [images[r["row_id"]] for r in rows], [caption(r) for r in rows], title)

    paths = {"errors_png": os.path.join(out_dir, selection["file"])}
    draw(
        paths["errors_png"],
        selection["rows"],
        f"The {len(selection['rows'])} most confident mistakes of {selection['wrong']}",
    )
    if selection["per_class"]:
        os.makedirs(os.path.join(out_dir, PER_CLASS_ERRORS), exist_ok=True)
        paths["per_class_errors"] = os.path.join(out_dir, PER_CLASS_ERRORS)
    for entry in selection["per_class"]:
        draw(
            os.path.join(out_dir, entry["file"]),
            entry["rows"],
            f"{entry['class']}: the {len(entry['rows'])} most confident of its {entry['wrong']} mistakes",
        )
    return paths


def _with_ci(value: Any, pair: Any) -> str:
    return fmt(value) + ("" if pair is None else f" (95% CI {fmt_ci(pair)})")


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines; text columns (Class, Measure, ...) left-aligned, numbers right."""
    lines = ["| " + " | ".join(headers) + " |"]
    text_cols = ("Class", "Average", "True", "Predicted", "Measure", "Confidence bin")
    lines.append("|" + "|".join(":---" if h in text_cols else "---:" for h in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return lines


def _pairs_for(report: dict, cm: Optional[np.ndarray], names: Sequence[str]) -> list[dict]:
    pairs = report.get("confused_pairs")
    if pairs is None and cm is not None:
        pairs = most_confused_pairs(cm, names, k=10)
    return list(pairs or [])[:10]


def _report_sections(report: dict, cm: Optional[np.ndarray], names: Sequence[str], level: str) -> list[str]:
    lines: list[str] = [f"{level} Averages", ""]
    rows = []
    for key in AVERAGES:
        if key in report:
            a = report[key]
            rows.append(
                [
                    key,
                    fmt(a.get("precision")),
                    fmt(a.get("recall")),
                    fmt(a.get("f1")),
                    fmt_ci(a["f1_ci"]) if "f1_ci" in a else "",
                    fmt(a.get("support")),
                ]
            )
    lines += md_table(["Average", "Precision", "Recall", "F1", "F1 95% CI", "Support"], rows)
    lines += ["", f"{level} Per-class", ""]
    rows = [per_class_cells(r) for r in report.get("per_class", [])]
    lines += md_table(
        ["Index", "Class", "Precision", "Precision 95% CI", "Recall", "Recall 95% CI", "F1", "Support"], rows
    )
    pairs = _pairs_for(report, cm, names)
    lines += ["", f"{level} Most confused pairs (top 10)", ""]
    if pairs:
        rows = [[p["true"], p["predicted"], fmt(p["count"]), fmt(p["fraction"])] for p in pairs]
        lines += md_table(["True", "Predicted", "Count", "Fraction of true class"], rows)
    else:
        lines.append("No off-diagonal confusions.")
    lines.append("")
    return lines


def _intervals_note(report: dict) -> list[str]:
    spec = report.get("intervals")
    if not spec:
        return []
    text = f"Intervals: {spec.get('confidence', 0.95):.0%} Wilson score intervals for accuracy, precision and recall"
    if "resamples" in spec:
        text += (
            f"; macro-F1: percentile bootstrap of the rows ({spec['resamples']} resamples of the confusion "
            f"counts, seed {spec['seed']})"
        )
    return [text + ".", ""]


def _bins_table(bins: Sequence[dict]) -> list[str]:
    rows = [
        [f"({b['low']:.3f}, {b['high']:.3f}]", fmt(b["count"]), fmt(b["confidence"]), fmt(b["accuracy"])]
        for b in bins
        if b["count"] > 0
    ]
    return md_table(["Confidence bin", "Count", "Mean confidence", "Accuracy"], rows)


def _calibration_section(report: dict) -> list[str]:
    lines = ["## Calibration (reliability.png)", ""]
    calibration = report.get("calibration")
    if calibration:
        lines += [_calibration_line(calibration), ""]
    lines += _bins_table(report["calibration_bins"]) + [""]
    if report.get("calibration_bins_uncalibrated"):
        lines += ["Before the temperature (T = 1):", ""] + _bins_table(report["calibration_bins_uncalibrated"])
        lines.append("")
    return lines


def _calibration_line(calibration: dict) -> str:
    """Temperature, where it was fitted, NLL and ECE before -> after, as one Markdown line."""
    where = (
        f"fitted on {calibration['fitted_on']}" if calibration.get("fitted_on") else "not fitted: the raw probabilities"
    )
    before, after = calibration["before"], calibration["after"]
    return (
        f"Temperature {calibration['temperature']:.4g} ({where}): NLL {fmt(before['nll'])} -> {fmt(after['nll'])}, "
        f"ECE {fmt(before['ece'])} -> {fmt(after['ece'])} (before -> after; top-1 is the same)"
    )


def _errors_section(selection: dict) -> list[str]:
    lines = [
        f"## Most confident mistakes ([{selection['file']}]({selection['file']}))",
        "",
        f"{selection['wrong']} of the split's rows are wrong; [{selection['file']}]({selection['file']}) shows the "
        f"{len(selection['rows'])} with the highest confidence, from the stored pixels.",
        "",
    ]
    if selection["per_class"]:
        links = ", ".join(f"[{e['class']}]({e['file']}) ({e['wrong']})" for e in selection["per_class"])
        lines += [f"Per class ({PER_CLASS_ERRORS}/, the classes with the most mistakes): {links}", ""]
    return lines


def _markdown(report: dict, cm: np.ndarray, names: Sequence[str], coarse_cm: Optional[np.ndarray]) -> str:
    lines = ["# Evaluation report", ""]
    header = [
        ("Model", "model"),
        ("Dataset", "dataset"),
        ("Split", "split"),
    ]
    for label, key in header:
        if key in report:
            lines.append(f"- **{label}:** {_md_cell(identity(report[key]))}")
    lines.append(f"- **Total support:** {fmt(report.get('total_support'))}")
    if "accuracy" in report:
        lines.append(f"- **Accuracy (top-1):** {_with_ci(report['accuracy'], report.get('accuracy_ci'))}")
    macro = report.get("macro avg", {})
    if "f1" in macro:
        lines.append(f"- **Macro-F1:** {_with_ci(macro['f1'], macro.get('f1_ci'))}")
    for label, key in (("Top-5 accuracy", "top5_accuracy"), ("ECE", "ece"), ("NLL", "nll")):
        if key in report:
            lines.append(f"- **{label}:** {fmt(report[key])}")
    if report.get("calibration"):
        lines.append(f"- **Calibration:** {_calibration_line(report['calibration'])}")
    if "tta" in report:
        tta = "flip: the mean softmax of each image and its mirror" if report["tta"] == "flip" else "none"
        lines.append(f"- **Test-time augmentation (eval.tta):** {tta}")
    if report.get("errors"):
        lines.append(f"- **Most confident mistakes:** [{report['errors']['file']}]({report['errors']['file']})")
    lines.append("")
    lines += _intervals_note(report)
    lines += _report_sections(report, cm, names, "##")
    if report.get("calibration_bins"):
        lines += _calibration_section(report)
    if report.get("errors"):
        lines += _errors_section(report["errors"])

    coarse = report.get("coarse")
    if isinstance(coarse, dict) and "per_class" in coarse:
        coarse_names = [r["class"] for r in coarse["per_class"]]
        lines += ["## Coarse (superclass) level", ""]
        lines.append(f"- **Total support:** {fmt(coarse.get('total_support'))}")
        if "accuracy" in coarse:
            lines.append(f"- **Accuracy:** {_with_ci(coarse['accuracy'], coarse.get('accuracy_ci'))}")
        lines.append("")
        lines += _report_sections(coarse, coarse_cm, coarse_names, "###")

    if "config" in report:
        lines += [
            "## Configuration",
            "",
            "```json",
            json.dumps(to_jsonable(report["config"]), indent=2, sort_keys=True),
            "```",
            "",
        ]
    return "\n".join(lines)


def _csv_number(value: Any) -> str:
    return "" if value is None or not math.isfinite(float(value)) else repr(float(value))


def _write_csv(path: str, per_class: Sequence[dict]) -> None:
    fh = io.StringIO()
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(_CSV_FIELDS)
    for r in per_class:
        bounds = [b for key in ("precision_ci", "recall_ci") for b in (r.get(key) or (None, None))]
        w.writerow(
            [r["class"], int(r["index"])]
            + [repr(float(r[k])) for k in ("precision", "recall", "f1")]
            + [int(r["support"])]
            + [_csv_number(b) for b in bounds]
        )
    storage.write_text(path, fh.getvalue())


def write_outputs(
    report: dict,
    cm: np.ndarray,
    class_names: Sequence[str],
    out_dir: str,
    coarse_cm: Optional[np.ndarray] = None,
    calibration: Optional[np.ndarray] = None,
    calibration_before: Optional[np.ndarray] = None,
    error_images: Optional[dict] = None,
) -> dict:
    """Write report.json, per_class.csv, report.md, confusion_matrix.png and the other pictures.

    Args:
        report: dict from ``metrics.classification_report`` plus optional
            ``model``, ``dataset``, ``split``, ``config``, ``top5_accuracy``,
            ``ece``, ``confused_pairs`` and ``coarse`` (nested report).
        cm: ``(C, C)`` fine confusion matrix (rows = true, cols = predicted).
        class_names: ``C`` names, index-aligned with ``cm``.
        out_dir: local folder, created if missing.
        coarse_cm: optional ``(K, K)`` superclass matrix; if given and
            ``report["coarse"]`` exists, also writes
            ``coarse_confusion_matrix.png``.
        calibration: optional ``(n_bins, 3)`` summed ``calibration.calibration_counts``;
            if given, writes ``reliability.png`` and adds ``calibration_bins`` to
            report.json and a calibration table to report.md.
        calibration_before: the same counts before the temperature (T = 1): drawn beside them in
            reliability.png, ``calibration_bins_uncalibrated`` in report.json.
        error_images: ``{row id: (H, W, 3) uint8}`` of the rows of ``report["errors"]``
            (:func:`error_selection`): writes errors.png and per_class_errors/.

    With more than 20 classes, also writes ``per_class_f1.png`` (F1 sorted worst-first).

    Returns:
        ``{file kind: absolute path}`` of everything written.
    """
    cm = np.asarray(cm)
    names = [str(n) for n in class_names]
    if cm.ndim != 2 or cm.shape != (len(names), len(names)):
        raise ValueError(f"cm shape {cm.shape} does not match {len(names)} class names")
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    paths = {
        "json": os.path.join(out_dir, "report.json"),
        "csv": os.path.join(out_dir, "per_class.csv"),
        "markdown": os.path.join(out_dir, "report.md"),
        "png": os.path.join(out_dir, "confusion_matrix.png"),
    }

    if calibration is not None:
        report = {**report, "calibration_bins": calibration_bins(calibration)}
    if calibration_before is not None:
        report = {**report, "calibration_bins_uncalibrated": calibration_bins(calibration_before)}
    storage.write_text(paths["json"], json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    _write_csv(paths["csv"], report.get("per_class", []))
    coarse = report.get("coarse")
    has_coarse = isinstance(coarse, dict) and "per_class" in coarse
    if has_coarse:
        paths["coarse_csv"] = os.path.join(out_dir, "coarse_per_class.csv")
        _write_csv(paths["coarse_csv"], coarse["per_class"])
    storage.write_text(paths["markdown"], _markdown(report, cm, names, coarse_cm if has_coarse else None))
    plot_confusion(paths["png"], cm, names, "Confusion matrix (row-normalised)")
    if calibration is not None:
        temperature = (report.get("calibration") or {}).get("temperature")
        paths["reliability_png"] = write_reliability_plot(
            calibration, os.path.join(out_dir, "reliability.png"), before=calibration_before, temperature=temperature
        )
    if report.get("errors") and error_images is not None:
        paths.update(_write_galleries(out_dir, report["errors"], error_images, names))
    if len(names) >= F1_CHART_MIN_CLASSES and report.get("per_class"):
        paths["f1_png"] = os.path.join(out_dir, "per_class_f1.png")
        plot_f1(paths["f1_png"], report)
    if has_coarse and coarse_cm is not None:
        coarse_names = [r["class"] for r in coarse["per_class"]]
        paths["coarse_png"] = os.path.join(out_dir, "coarse_confusion_matrix.png")
        plot_confusion(
            paths["coarse_png"], np.asarray(coarse_cm), coarse_names, "Coarse confusion matrix (row-normalised)"
        )
    return paths
