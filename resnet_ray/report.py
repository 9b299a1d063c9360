"""Render a ``metrics.classification_report`` dict to files and the terminal.

``write_outputs`` writes, atomically (``storage.write_bytes``: a temporary
sibling, then a move), into a local folder:

* ``report.json`` - the whole report dict (numpy values converted, non-finite
  floats written as ``null``), with ``calibration_bins`` when calibration
  counts are given,
* ``per_class.csv`` - ``class,index,precision,recall,f1,support`` and the
  95% interval bounds of precision and recall,
* ``report.md`` - human-readable Markdown (numbers to 4 decimals, intervals
  in brackets),
* ``confusion_matrix.png`` - row-normalised heatmap,
* ``reliability.png`` - the calibration diagram behind the ECE (when
  calibration counts are given),
* ``per_class_f1.png`` - per-class F1 sorted worst-first (more than 20 classes),
* ``coarse_per_class.csv`` / ``coarse_confusion_matrix.png`` when a ``coarse``
  sub-report / ``coarse_cm`` are given.

``write_history_plot`` draws a training run's ``history.png``. The
``print_*`` functions print rich tables; where the output is not a terminal
(a file, a pipe, a job log) tables keep their natural width instead of being
cut to 80 columns. No ray/torch imports; matplotlib is imported lazily with
the Agg backend.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from resnet_ray import storage
from resnet_ray.metrics import calibration_bins, expected_calibration_error, most_confused_pairs

__all__ = [
    "write_outputs",
    "write_history_plot",
    "write_reliability_plot",
    "print_summary",
    "print_training_summary",
    "print_search_summary",
    "print_table",
    "default_console",
    "to_jsonable",
    "md_table",
    "fmt",
    "fmt_ci",
]

_AVERAGES = ("macro avg", "weighted avg", "micro avg")
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
_UNBOUNDED = 100_000  # columns: the width a table may take where the output is not a terminal
F1_CHART_MIN_CLASSES = 21  # per_class_f1.png for more classes than a confusion matrix shows legibly


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples and non-finite floats
    (-> ``None``) so that ``json.dumps(..., allow_nan=False)`` succeeds."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    return str(obj)


def fmt(value: Any) -> str:
    """Scores to 4 decimals; ints as ints; missing/non-finite as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{f:.4f}" if math.isfinite(f) else "n/a"


def fmt_ci(pair: Any) -> str:
    """An interval ``[low, high]`` as ``[0.8034, 0.8501]``; ``n/a`` when missing or undefined."""
    if not pair or any(v is None or not math.isfinite(float(v)) for v in pair):
        return "n/a"
    return f"[{fmt(float(pair[0]))}, {fmt(float(pair[1]))}]"


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


def _identity(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _pairs_for(report: dict, cm: Optional[np.ndarray], names: Sequence[str]) -> list[dict]:
    pairs = report.get("confused_pairs")
    if pairs is None and cm is not None:
        pairs = most_confused_pairs(cm, names, k=10)
    return list(pairs or [])[:10]


def _report_sections(report: dict, cm: Optional[np.ndarray], names: Sequence[str], level: str) -> list[str]:
    lines: list[str] = [f"{level} Averages", ""]
    rows = []
    for key in _AVERAGES:
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
            lines.append(f"- **{label}:** {_md_cell(_identity(report[key]))}")
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


@contextlib.contextmanager
def _figure(path: str, **subplots: Any) -> Iterator[tuple]:
    """``(fig, axes)`` from ``plt.subplots(**subplots)`` (Agg backend); on a clean exit the figure is saved as
    PNG to ``path`` (local path or URI, written atomically); the figure is always closed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        storage.write_bytes(path, buffer.getvalue())
    finally:
        plt.close(fig)


def _plot_confusion(path: str, cm: np.ndarray, names: Sequence[str], title: str) -> None:
    cm = np.asarray(cm, dtype=np.float64)
    C = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    side = float(np.clip(0.2 * C + 3.0, 6.0, 40.0))  # inches; ~0.2 in per class
    cell_pt = 72.0 * (side - 2.5) / C
    tick_fs = float(np.clip(0.7 * cell_pt, 3.0, 10.0))
    dpi = 150 if C <= 30 else 100

    with _figure(path, figsize=(side + 1.5, side), dpi=dpi) as (fig, ax):
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
        ticks = np.arange(C)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(
            [str(n) for n in names], rotation=90 if C > 12 else 45, ha="center" if C > 12 else "right", fontsize=tick_fs
        )
        ax.set_yticklabels([str(n) for n in names], fontsize=tick_fs)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(title)
        if C <= 20:
            for i in range(C):
                for j in range(C):
                    v = norm[i, j]
                    if v > 0:
                        ax.text(
                            j,
                            i,
                            f"{v:.2f}",
                            ha="center",
                            va="center",
                            fontsize=max(tick_fs - 1, 5),
                            color="white" if v > 0.5 else "black",
                        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class")


def _plot_f1(path: str, report: dict) -> None:
    """Horizontal bars of per-class F1, worst class on top, with the macro-F1 as a line."""
    rows = sorted(report["per_class"], key=lambda r: (r["f1"] if math.isfinite(r["f1"]) else -1.0, r["index"]))
    C = len(rows)
    fontsize = 7 if C > 60 else 9
    with _figure(path, figsize=(8, max(4.0, 0.16 * C + 1.5)), dpi=110) as (fig, ax):
        y = np.arange(C)
        f1 = np.array([r["f1"] for r in rows], dtype=np.float64)
        ax.barh(y, np.nan_to_num(f1), color=_score_colors(f1), height=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r['class']} ({r['support']})" for r in rows], fontsize=fontsize)
        ax.invert_yaxis()  # worst first, at the top
        ax.set_ylim(C - 0.5, -0.5)
        macro = report.get("macro avg", {}).get("f1")
        if macro is not None and math.isfinite(macro):
            ax.axvline(macro, color="black", linestyle="--", linewidth=1, label=f"macro-F1 {macro:.3f}")
            ax.legend(loc="upper right")
        ax.set_xlim(0, 1)
        ax.set_xlabel("F1")
        ax.set_title(f"Per-class F1, worst first ({C} classes; support in parentheses)")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labeltop=True)


def _score_colors(scores: np.ndarray) -> list:
    """Red (0) to green (1) bar colours for scores in [0, 1]."""
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"]
    return [cmap(float(v)) for v in np.clip(np.nan_to_num(scores), 0.0, 1.0)]


def write_reliability_plot(calibration: Any, path: str) -> str:
    """Draw the reliability diagram behind the ECE into ``path`` (PNG; local path or URI).

    Args:
        calibration: ``(n_bins, 3)`` summed ``metrics.calibration_counts`` (count, sum confidence, sum correct).
        path: where to write the PNG.

    Top: accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap to the
    bin's mean confidence shaded; bottom: the number of predictions per bin (log scale). Returns ``path``.
    """
    bins = calibration_bins(calibration)
    ece = expected_calibration_error(calibration)
    low = np.array([b["low"] for b in bins])
    width = np.array([b["high"] - b["low"] for b in bins])
    count = np.array([b["count"] for b in bins], dtype=np.float64)
    used = count > 0
    acc = np.array([b["accuracy"] for b in bins])[used]
    conf = np.array([b["confidence"] for b in bins])[used]
    with _figure(path, nrows=2, figsize=(6, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}) as (
        fig,
        (top, bottom),
    ):
        top.bar(
            low[used],
            acc,
            width=width[used],
            align="edge",
            color="tab:blue",
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        top.bar(
            low[used],
            conf - acc,
            bottom=acc,
            width=width[used],
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            hatch="//",
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("Accuracy")
        top.set_title(f"Reliability diagram: ECE {fmt(ece)} over {int(count.sum())} predictions")
        top.legend(loc="upper left")
        top.grid(alpha=0.3)
        bottom.bar(low, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
        if count.max(initial=0) > 0:
            bottom.set_yscale("log")
        bottom.set_xlabel("Confidence (max softmax probability)")
        bottom.set_ylabel("Predictions")
    return path


def _history_series(history: Sequence[dict], key: str) -> tuple[list, list]:
    points = [
        (row["epoch"], row[key]) for row in history if row.get(key) is not None and math.isfinite(float(row[key]))
    ]
    return [e for e, _ in points], [float(v) for _, v in points]


def write_history_plot(history: Sequence[dict], path: str) -> str:
    """Draw a training run's curves into ``path`` (PNG; local path or URI): loss, top-1 and learning rate per epoch.

    Args:
        history: one dict per epoch with ``epoch`` and any of ``train_loss``, ``val_loss``, ``train_acc``,
            ``val_top1``, ``val_top5``, ``lr`` (fractions; missing or non-finite values are skipped).
        path: where to write the PNG.

    Returns ``path``. Raises ValueError on an empty history or rows without ``epoch``.
    """
    if not history:
        raise ValueError("history is empty: no epoch to plot")
    missing = [i for i, row in enumerate(history) if "epoch" not in row]
    if missing:
        raise ValueError(f"history row {missing[0]} has no 'epoch'")
    panels = (
        ("Loss", (("train_loss", "train"), ("val_loss", "validation"))),
        (
            "Accuracy",
            (("train_acc", "train top-1"), ("val_top1", "validation top-1"), ("val_top5", "validation top-5")),
        ),
        ("Learning rate", (("lr", "lr"),)),
    )
    from matplotlib.ticker import MaxNLocator

    with _figure(path, ncols=3, figsize=(15, 4.2), dpi=110) as (fig, axes):
        for ax, (title, series) in zip(axes, panels):
            for key, label in series:
                epochs, values = _history_series(history, key)
                if epochs:
                    ax.plot(
                        epochs,
                        values,
                        marker="o",
                        markersize=3,
                        linestyle=":" if key == "val_top5" else "-",
                        label=label,
                    )
            ax.set_title(title)
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.has_data() and title != "Learning rate":  # one curve needs no legend
                ax.legend()
        _, lrs = _history_series(history, "lr")
        if lrs and min(lrs) > 0 and max(lrs) / min(lrs) > 20:
            axes[2].set_yscale("log")
        fig.suptitle(f"Training history ({len(history)} epochs)")
    return path


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
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
    _plot_confusion(paths["png"], cm, names, "Confusion matrix (row-normalised)")
    if calibration is not None:
        paths["reliability_png"] = write_reliability_plot(calibration, os.path.join(out_dir, "reliability.png"))
    if len(names) >= F1_CHART_MIN_CLASSES and report.get("per_class"):
        paths["f1_png"] = os.path.join(out_dir, "per_class_f1.png")
        _plot_f1(paths["f1_png"], report)
    if has_coarse and coarse_cm is not None:
        coarse_names = [r["class"] for r in coarse["per_class"]]
        paths["coarse_png"] = os.path.join(out_dir, "coarse_confusion_matrix.png")
        _plot_confusion(
            paths["coarse_png"], np.asarray(coarse_cm), coarse_names, "Coarse confusion matrix (row-normalised)"
        )
    return paths


def _summary_table(report: dict, title: str, worst: int) -> Any:
    from rich import box
    from rich.table import Table

    per_class = list(report.get("per_class", []))
    # worst by F1 among classes that actually have samples (zero-support F1 is a convention)
    candidates = [r for r in per_class if r.get("support", 0) > 0] or per_class
    ranked = sorted(candidates, key=lambda r: (r["f1"] if math.isfinite(r["f1"]) else math.inf, r["index"]))
    worst_idx = {r["index"] for r in ranked[: max(int(worst), 0)]}

    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_lines=False,
        pad_edge=False,
        caption=f"red = {len(worst_idx)} lowest-F1 classes" if worst_idx else None,
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("Class", overflow="fold")
    for col in ("Precision", "95% CI", "Recall", "95% CI", "F1", "Support"):
        table.add_column(col, justify="right", style="dim" if col == "95% CI" else None)
    for r in per_class:
        table.add_row(
            str(r["index"]),
            str(r["class"]),
            fmt(r["precision"]),
            fmt_ci(r.get("precision_ci")),
            fmt(r["recall"]),
            fmt_ci(r.get("recall_ci")),
            fmt(r["f1"]),
            fmt(r["support"]),
            style="bold red" if r["index"] in worst_idx else None,
        )
    table.add_section()
    for key in _AVERAGES:
        if key in report:
            a = report[key]
            table.add_row(
                "", key, fmt(a["precision"]), "", fmt(a["recall"]), "", fmt(a["f1"]), fmt(a["support"]), style="bold"
            )
    return table


def print_table(table: Any, console: Any) -> None:
    """Print a rich table; where the output is not a terminal (a file, a pipe, a job log) at its natural
    width, so that names and numbers are never cut to fit 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    table.width = Measurement.get(console, console.options.update_width(_UNBOUNDED), table).maximum
    console.print(table, crop=False)


def logging_console() -> Any:
    """The rich Console that the root logger's RichHandler writes to (jobs on a terminal), else None."""
    return next((h.console for h in logging.getLogger().handlers if hasattr(h, "console")), None)


def default_console(console: Any = None) -> Any:
    """``console`` itself, or a new rich Console on stdout."""
    from rich.console import Console

    return console if console is not None else Console()


def print_summary(report: dict, console: Any = None, worst: int = 5) -> None:
    """Print per-class rows, averages (and the coarse report if present) as rich tables.

    The ``worst`` classes by F1 (among classes with support > 0) are shown in
    red, with 95% intervals next to precision and recall, followed by one
    line with accuracy and macro-F1 (with their intervals) / top-5 / ECE /
    total support.
    """
    console = default_console(console)
    bits = [_identity(report[k]) for k in ("model", "dataset", "split") if report.get(k) is not None]
    title = "Per-class metrics" + (" - " + " / ".join(bits) if bits else "")
    print_table(_summary_table(report, title, worst), console)

    coarse = report.get("coarse")
    if isinstance(coarse, dict) and "per_class" in coarse:
        print_table(_summary_table(coarse, "Coarse (superclass) metrics", worst), console)

    parts = [
        f"accuracy {fmt(report.get('accuracy'))}"
        + (f" {fmt_ci(report['accuracy_ci'])}" if "accuracy_ci" in report else "")
    ]
    macro = report.get("macro avg", {})
    if "f1_ci" in macro:
        parts.append(f"macro-F1 {fmt(macro['f1'])} {fmt_ci(macro['f1_ci'])}")
    if "top5_accuracy" in report:
        parts.append(f"top-5 {fmt(report['top5_accuracy'])}")
    if "ece" in report:
        parts.append(f"ECE {fmt(report['ece'])}")
    if isinstance(coarse, dict) and "accuracy" in coarse:
        parts.append(f"coarse accuracy {fmt(coarse['accuracy'])}")
    parts.append(f"total support {fmt(report.get('total_support'))}")
    console.print("[bold]" + " | ".join(parts) + "[/bold]", highlight=False, soft_wrap=True)
    if "accuracy_ci" in report:
        console.print(
            "[dim]\\[low, high] = 95% interval (Wilson; macro-F1: bootstrap of the rows)[/dim]",
            highlight=False,
            soft_wrap=True,
        )


def print_training_summary(result: Any, console: Any = None) -> None:
    """Per-epoch table of a training run (``train.FitResult``), the best epoch in bold, then where things are."""
    from rich import box
    from rich.table import Table

    console = default_console(console)
    best_epoch = result.best.get("epoch")
    table = Table(title=f"Training run {result.run_dir}", box=box.SIMPLE_HEAD)
    columns = [
        ("epoch", "Epoch", "{}"),
        ("train_loss", "Train loss", "{:.4f}"),
        ("train_acc", "Train acc", "{:.4f}"),
        ("val_loss", "Val loss", "{:.4f}"),
        ("val_top1", "Val top-1", "{:.4f}"),
        ("val_top5", "Val top-5", "{:.4f}"),
        ("lr", "LR", "{:.2e}"),
        ("images_per_s", "img/s", "{:.0f}"),
        ("epoch_s", "Time (s)", "{:.1f}"),
    ]
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in result.history:
        table.add_row(
            *(pattern.format(row[key]) if key in row else "-" for key, _, pattern in columns),
            style="bold green" if row["epoch"] == best_epoch else None,
        )
    print_table(table, console)
    if "val_top1" in result.best:
        chosen = f"best epoch {best_epoch}: val top-1 {result.best['val_top1']:.4f}"
    else:
        chosen = f"refit on train+val (no validation): the last epoch, {best_epoch}, is exported"
    console.print(f"{chosen}; model exported to {result.model_dir}", soft_wrap=True)
    if result.evaluation:
        print_summary(result.evaluation["report"], console)
        console.print(f"evaluation report: {result.evaluation['output']}", soft_wrap=True)


def print_search_summary(result: Any, console: Any = None) -> None:
    """All trials of a search (``tune.SearchResult``) with the best in bold, then where the outputs are."""
    from rich import box
    from rich.table import Table

    console = default_console(console)
    keys = sorted({k for row in result.trials for k in row["params"]})
    metric = result.metric
    table = Table(title=f"Search {result.experiment_dir}", box=box.SIMPLE_HEAD)
    for header in ("Trial", "Status", "Epochs", "Best epoch", metric, *keys):
        table.add_column(header, justify="right")
    for row in sorted(result.trials, key=lambda r: -(r[metric] if r[metric] is not None else -math.inf)):
        table.add_row(
            row["trial_id"],
            row["status"],
            str(row["epochs"]),
            str(row["best_epoch"]),
            fmt(row[metric]),
            *(
                f"{row['params'].get(k):.3g}" if isinstance(row["params"].get(k), float) else str(row["params"].get(k))
                for k in keys
            ),
            style="bold green" if row is result.best else None,
        )
    print_table(table, console)
    console.print(f"best trial {result.best['trial_id']}: {metric} {fmt(result.best[metric])}", soft_wrap=True)
    console.print(
        f"best config: {result.best_config_path}  (python jobs/train.py --config {result.best_config_path})",
        soft_wrap=True,
    )
    if result.evaluation:
        console.print(
            f"test accuracy of the best model: {fmt(result.evaluation['report']['accuracy'])} "
            f"(report in {result.evaluation['output']})",
            soft_wrap=True,
        )


@contextlib.contextmanager
def progress_bar(description: str, console: Any = None) -> Iterator[tuple]:
    """A rich progress bar on stderr with the images/s rate: yields (start(total), advance(n)) callbacks.

    The bar appears at start() (work that never starts shows none) and only on a terminal: in a job log or a
    file the caller's closing summary line says it all.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = None

    def start(total: int) -> None:
        nonlocal task
        if console.is_terminal and task is None:
            progress.start()
            task = progress.add_task(description, total=total, rate="")

    def advance(n: int) -> None:
        if task is not None:
            progress.advance(task, n)
            state = progress.tasks[task]  # the average since start: rich's speed is of the last few updates only
            progress.update(task, rate=f"{state.completed / state.elapsed:.0f} img/s" if state.elapsed else "")

    try:
        yield start, advance
    finally:
        if task is not None:
            progress.stop()
