"""Render a ``metrics.classification_report`` dict to files.

``write_outputs`` writes, atomically (``storage.write_bytes``: a temporary sibling, then a move), into a local
folder:

* ``report.json`` - the whole report dict (numpy values converted, non-finite floats written as ``null``), with
  ``calibration_bins`` when calibration counts are given,
* ``per_class.csv`` - ``class,index,precision,recall,f1,support`` and the 95% interval bounds of precision and
  recall,
* ``report.md`` - human-readable Markdown (numbers to 4 decimals, intervals in brackets),
* the figures of :mod:`resnet_ray.plots`: ``confusion_matrix.png`` (row-normalised), ``reliability.png`` (when
  calibration counts are given), ``per_class_f1.png`` (more than 20 classes), and ``coarse_per_class.csv`` /
  ``coarse_confusion_matrix.png`` when a ``coarse`` sub-report / ``coarse_cm`` are given.

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
from resnet_ray.formatting import AVERAGES, fmt, fmt_ci, identity, to_jsonable
from resnet_ray.metrics import calibration_bins, most_confused_pairs
from resnet_ray.plots import plot_confusion, plot_f1, write_reliability_plot

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
    rows = [
        [
            fmt(r["index"]),
            r["class"],
            fmt(r["precision"]),
            fmt_ci(r.get("precision_ci")),
            fmt(r["recall"]),
            fmt_ci(r.get("recall_ci")),
            fmt(r["f1"]),
            fmt(r["support"]),
        ]
        for r in report.get("per_class", [])
    ]
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


def _calibration_section(bins: Sequence[dict]) -> list[str]:
    rows = [
        [f"({b['low']:.3f}, {b['high']:.3f}]", fmt(b["count"]), fmt(b["confidence"]), fmt(b["accuracy"])]
        for b in bins
        if b["count"] > 0
    ]
    return (
        ["## Calibration (reliability.png)", ""]
        + md_table(["Confidence bin", "Count", "Mean confidence", "Accuracy"], rows)
        + [""]
    )


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
    for label, key in (("Top-5 accuracy", "top5_accuracy"), ("ECE", "ece")):
        if key in report:
            lines.append(f"- **{label}:** {fmt(report[key])}")
    lines.append("")
    lines += _intervals_note(report)
    lines += _report_sections(report, cm, names, "##")
    if report.get("calibration_bins"):
        lines += _calibration_section(report["calibration_bins"])

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
        calibration: optional ``(n_bins, 3)`` summed ``metrics.calibration_counts``;
            if given, writes ``reliability.png`` and adds ``calibration_bins`` to
            report.json and a calibration table to report.md.

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
        paths["reliability_png"] = write_reliability_plot(calibration, os.path.join(out_dir, "reliability.png"))
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
