"""Render a ``metrics.classification_report`` dict to files and the terminal.

``write_outputs`` writes, atomically (temp file in the same folder, then
``os.replace``), into a local folder:

* ``report.json`` - the whole report dict (numpy values converted, non-finite
  floats written as ``null``),
* ``per_class.csv`` - ``class,index,precision,recall,f1,support``,
* ``report.md`` - human-readable Markdown (numbers to 4 decimals),
* ``confusion_matrix.png`` - row-normalised heatmap,
* ``coarse_per_class.csv`` / ``coarse_confusion_matrix.png`` when a ``coarse``
  sub-report / ``coarse_cm`` are given.

``print_summary`` prints a rich table. No ray/torch imports; matplotlib is
imported lazily with the Agg backend.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import numpy as np

from resnet_ray.metrics import most_confused_pairs

__all__ = ["write_outputs", "print_summary", "to_jsonable"]

_AVERAGES = ("macro avg", "weighted avg", "micro avg")
_CSV_FIELDS = ("class", "index", "precision", "recall", "f1", "support")


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


def _atomic_write(path: str, writer: Callable[[Any], None], binary: bool = False) -> None:
    """Call ``writer(fileobj)`` on a temp file next to ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        mode = "wb" if binary else "w"
        kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; make outputs readable like normal files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fmt(value: Any) -> str:
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


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |"]
    text_cols = ("Class", "Average", "True", "Predicted")
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
            rows.append([key, _fmt(a.get("precision")), _fmt(a.get("recall")), _fmt(a.get("f1")), _fmt(a.get("support"))])
    lines += _md_table(["Average", "Precision", "Recall", "F1", "Support"], rows)
    lines += ["", f"{level} Per-class", ""]
    rows = [
        [_fmt(r["index"]), r["class"], _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), _fmt(r["support"])]
        for r in report.get("per_class", [])
    ]
    lines += _md_table(["Index", "Class", "Precision", "Recall", "F1", "Support"], rows)
    pairs = _pairs_for(report, cm, names)
    lines += ["", f"{level} Most confused pairs (top 10)", ""]
    if pairs:
        rows = [[p["true"], p["predicted"], _fmt(p["count"]), _fmt(p["fraction"])] for p in pairs]
        lines += _md_table(["True", "Predicted", "Count", "Fraction of true class"], rows)
    else:
        lines.append("No off-diagonal confusions.")
    lines.append("")
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
            lines.append(f"- **{label}:** {_md_cell(_identity(report[key]))}")
    lines.append(f"- **Total support:** {_fmt(report.get('total_support'))}")
    for label, key in (("Accuracy (top-1)", "accuracy"), ("Top-5 accuracy", "top5_accuracy"), ("ECE", "ece")):
        if key in report:
            lines.append(f"- **{label}:** {_fmt(report[key])}")
    lines.append("")
    lines += _report_sections(report, cm, names, "##")

    coarse = report.get("coarse")
    if isinstance(coarse, dict) and "per_class" in coarse:
        coarse_names = [r["class"] for r in coarse["per_class"]]
        lines += ["## Coarse (superclass) level", ""]
        lines.append(f"- **Total support:** {_fmt(coarse.get('total_support'))}")
        if "accuracy" in coarse:
            lines.append(f"- **Accuracy:** {_fmt(coarse['accuracy'])}")
        lines.append("")
        lines += _report_sections(coarse, coarse_cm, coarse_names, "###")

    if "config" in report:
        lines += ["## Configuration", "", "```json",
                  json.dumps(to_jsonable(report["config"]), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _write_csv(path: str, per_class: Sequence[dict]) -> None:
    def writer(fh: Any) -> None:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(_CSV_FIELDS)
        for r in per_class:
            w.writerow([r["class"], int(r["index"])] + [repr(float(r[k])) for k in ("precision", "recall", "f1")] + [int(r["support"])])

    _atomic_write(path, writer)


def _plot_confusion(path: str, cm: np.ndarray, names: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    C = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    side = float(np.clip(0.2 * C + 3.0, 6.0, 40.0))  # inches; ~0.2 in per class
    cell_pt = 72.0 * (side - 2.5) / C
    tick_fs = float(np.clip(0.7 * cell_pt, 3.0, 10.0))
    dpi = 150 if C <= 30 else 100

    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=dpi)
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
        ticks = np.arange(C)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels([str(n) for n in names], rotation=90 if C > 12 else 45,
                           ha="center" if C > 12 else "right", fontsize=tick_fs)
        ax.set_yticklabels([str(n) for n in names], fontsize=tick_fs)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(title)
        if C <= 20:
            for i in range(C):
                for j in range(C):
                    v = norm[i, j]
                    if v > 0:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=max(tick_fs - 1, 5),
                                color="white" if v > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class")
        fig.tight_layout()
        _atomic_write(path, lambda fh: fig.savefig(fh, format="png"), binary=True)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def write_outputs(
    report: dict,
    cm: np.ndarray,
    class_names: Sequence[str],
    out_dir: str,
    coarse_cm: Optional[np.ndarray] = None,
) -> dict:
    """Write report.json, per_class.csv, report.md and confusion_matrix.png.

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

    payload = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    _atomic_write(paths["json"], lambda fh: fh.write(payload))
    _write_csv(paths["csv"], report.get("per_class", []))
    coarse = report.get("coarse")
    has_coarse = isinstance(coarse, dict) and "per_class" in coarse
    if has_coarse:
        paths["coarse_csv"] = os.path.join(out_dir, "coarse_per_class.csv")
        _write_csv(paths["coarse_csv"], coarse["per_class"])
    md = _markdown(report, cm, names, coarse_cm if has_coarse else None)
    _atomic_write(paths["markdown"], lambda fh: fh.write(md))
    _plot_confusion(paths["png"], cm, names, "Confusion matrix (row-normalised)")
    if has_coarse and coarse_cm is not None:
        coarse_names = [r["class"] for r in coarse["per_class"]]
        paths["coarse_png"] = os.path.join(out_dir, "coarse_confusion_matrix.png")
        _plot_confusion(paths["coarse_png"], np.asarray(coarse_cm), coarse_names,
                        "Coarse confusion matrix (row-normalised)")
    return paths


def _summary_table(report: dict, title: str, worst: int) -> Any:
    from rich import box
    from rich.table import Table

    per_class = list(report.get("per_class", []))
    # worst by F1 among classes that actually have samples (zero-support F1 is a convention)
    candidates = [r for r in per_class if r.get("support", 0) > 0] or per_class
    ranked = sorted(candidates, key=lambda r: (r["f1"] if math.isfinite(r["f1"]) else math.inf, r["index"]))
    worst_idx = {r["index"] for r in ranked[: max(int(worst), 0)]}

    table = Table(title=title, box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False,
                  caption=f"red = {len(worst_idx)} lowest-F1 classes" if worst_idx else None)
    table.add_column("#", justify="right", style="dim")
    table.add_column("Class", overflow="fold")
    for col in ("Precision", "Recall", "F1", "Support"):
        table.add_column(col, justify="right")
    for r in per_class:
        table.add_row(str(r["index"]), str(r["class"]), _fmt(r["precision"]), _fmt(r["recall"]),
                      _fmt(r["f1"]), _fmt(r["support"]),
                      style="bold red" if r["index"] in worst_idx else None)
    table.add_section()
    for key in _AVERAGES:
        if key in report:
            a = report[key]
            table.add_row("", key, _fmt(a["precision"]), _fmt(a["recall"]), _fmt(a["f1"]),
                          _fmt(a["support"]), style="bold")
    return table


def print_summary(report: dict, console: Any = None, worst: int = 5) -> None:
    """Print per-class rows, averages (and the coarse report if present) as rich tables.

    The ``worst`` classes by F1 (among classes with support > 0) are shown in
    red, followed by one line with accuracy / top-5 / ECE / total support.
    """
    from rich.console import Console

    console = console if console is not None else Console()
    bits = [_identity(report[k]) for k in ("model", "dataset", "split") if report.get(k) is not None]
    title = "Per-class metrics" + (" - " + " / ".join(bits) if bits else "")
    console.print(_summary_table(report, title, worst))

    coarse = report.get("coarse")
    if isinstance(coarse, dict) and "per_class" in coarse:
        console.print(_summary_table(coarse, "Coarse (superclass) metrics", worst))

    parts = [f"accuracy {_fmt(report.get('accuracy'))}"]
    if "top5_accuracy" in report:
        parts.append(f"top-5 {_fmt(report['top5_accuracy'])}")
    if "ece" in report:
        parts.append(f"ECE {_fmt(report['ece'])}")
    if isinstance(coarse, dict) and "accuracy" in coarse:
        parts.append(f"coarse accuracy {_fmt(coarse['accuracy'])}")
    parts.append(f"total support {_fmt(report.get('total_support'))}")
    console.print("[bold]" + " | ".join(parts) + "[/bold]", highlight=False)


def print_training_summary(result: Any, console: Any = None) -> None:
    """Per-epoch table of a training run (``train.FitResult``), the best epoch in bold, then where things are."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console if console is not None else Console()
    best_epoch = result.best.get("epoch")
    table = Table(title=f"Training run {result.run_dir}", box=box.SIMPLE_HEAD)
    columns = [("epoch", "Epoch", "{}"), ("train_loss", "Train loss", "{:.4f}"), ("train_acc", "Train acc", "{:.4f}"),
               ("val_loss", "Val loss", "{:.4f}"), ("val_top1", "Val top-1", "{:.4f}"),
               ("val_top5", "Val top-5", "{:.4f}"), ("lr", "LR", "{:.2e}"), ("images_per_s", "img/s", "{:.0f}"),
               ("epoch_s", "Time (s)", "{:.1f}")]
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in result.history:
        table.add_row(*(fmt.format(row[key]) for key, _, fmt in columns),
                      style="bold green" if row["epoch"] == best_epoch else None)
    console.print(table)
    console.print(f"best epoch {best_epoch}: val top-1 {result.best.get('val_top1', float('nan')):.4f}; "
                  f"model exported to {result.model_dir}")
    if result.evaluation:
        print_summary(result.evaluation["report"], console)
        console.print(f"evaluation report: {result.evaluation['output']}")


def print_search_summary(result: Any, console: Any = None) -> None:
    """All trials of a search (``tune.SearchResult``) with the best in bold, then where the outputs are."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console if console is not None else Console()
    keys = sorted({k for row in result.trials for k in row["params"]})
    metric = result.metric
    table = Table(title=f"Search {result.experiment_dir}", box=box.SIMPLE_HEAD)
    for header in ("Trial", "Status", "Epochs", "Best epoch", metric, *keys):
        table.add_column(header, justify="right")
    for row in sorted(result.trials, key=lambda r: -(r[metric] if r[metric] is not None else -math.inf)):
        table.add_row(row["trial_id"], row["status"], str(row["epochs"]), str(row["best_epoch"]),
                      _fmt(row[metric]), *(f"{row['params'].get(k):.3g}" if isinstance(row["params"].get(k), float)
                                           else str(row["params"].get(k)) for k in keys),
                      style="bold green" if row is result.best else None)
    console.print(table)
    console.print(f"best trial {result.best['trial_id']}: {metric} {_fmt(result.best[metric])}")
    console.print(f"best config: {result.best_config_path}  (python jobs/train.py --config {result.best_config_path})")
    if result.evaluation:
        console.print(f"test accuracy of the best model: {_fmt(result.evaluation['report']['accuracy'])} "
                      f"(report in {result.evaluation['output']})")
