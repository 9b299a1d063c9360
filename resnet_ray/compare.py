"""Compare two evaluations of the same split: paired accuracy test, per-class F1 differences, a verdict.

An evaluation is an output folder of ``jobs/evaluate.py`` (local path or URI) holding ``report.json`` and
``predictions.parquet`` (``row_id``, ``label``, ``pred`` columns). Two evaluations are comparable only when they
cover the same dataset, split and rows, with the same label for every row id; anything else is refused with a
:class:`ComparisonError` that names the field or row.

The accuracy difference is tested with McNemar's exact test on the paired predictions: under the null hypothesis
that both models are equally accurate, the rows that exactly one of them gets right are equally likely to favour
either, so the count favouring B is Binomial(discordant rows, 1/2); the p-value is two-sided. No Ray, no torch.

An evaluation with test-time augmentation (report.json ``tta``: flip) and a plain one (``none``, also what older
reports without the field were) differ in how they predict, not only in the model: they are paired only when asked
(``allow_tta``, ``jobs/compare.py --allow-tta``), which measures the gain of TTA on the same split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_ray import storage
from resnet_ray.console import default_console, print_table
from resnet_ray.data.layout import DataError
from resnet_ray.formatting import fmt, fmt_ci, to_jsonable
from resnet_ray.report import md_table

log = logging.getLogger(__name__)

__all__ = [
    "ComparisonError",
    "Evaluation",
    "load_evaluation",
    "check_comparable",
    "tta_of",
    "mcnemar_exact",
    "compare",
    "compare_folders",
    "verdict_line",
    "write_comparison",
    "print_comparison",
]

PREDICTION_COLUMNS = ("row_id", "label", "pred")
REPORT_KEYS = ("dataset", "split", "rows", "accuracy", "per_class")
TERMINAL_CLASSES = 20  # beyond this many classes the terminal shows only the largest per-class changes


class ComparisonError(DataError):
    """Two evaluations that cannot be compared, or an evaluation folder that cannot be read."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: its folder, report dict and predictions sorted by row id."""

    folder: str
    report: dict
    row_id: np.ndarray
    label: np.ndarray
    pred: np.ndarray


def _folder(path: str) -> str:
    """The evaluation folder, also when given the path of its report.json."""
    path = storage.normalize(path).rstrip("/")
    return path.rsplit("/", 1)[0] if path.endswith("/report.json") else path


def _read_report(folder: str) -> dict:
    path = storage.join(folder, "report.json")
    if not storage.exists(path):
        raise ComparisonError(
            f"{path} not found: give an evaluation output folder (report.json and "
            "predictions.parquet, written by jobs/evaluate.py)"
        )
    try:
        report = storage.read_json(path)
    except ValueError as exc:
        raise ComparisonError(f"{path}: not valid JSON ({exc})") from exc
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise ComparisonError(f"{path}: no {missing[0]!r} field; is it an evaluation report of jobs/evaluate.py?")
    return report


def _read_predictions(folder: str) -> pa.Table:
    path = storage.join(folder, "predictions.parquet")
    if not storage.exists(path):
        raise ComparisonError(f"{path} not found: the paired test needs each evaluation's predictions")
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as f:
            parquet = pq.ParquetFile(f)
            missing = [c for c in PREDICTION_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise ComparisonError(f"{path}: no {missing[0]!r} column (has {parquet.schema_arrow.names})")
            return parquet.read(columns=list(PREDICTION_COLUMNS))
    except pa.ArrowException as exc:
        raise ComparisonError(f"{path}: not a readable parquet file ({exc})") from exc


def load_evaluation(path: str) -> Evaluation:
    """Read an evaluation folder (or its report.json path) and check that its predictions match its report.

    Raises:
        ComparisonError: a missing file, field or column, duplicate row ids, or predictions whose row count or
            accuracy differ from report.json.
    """
    folder = _folder(path)
    report = _read_report(folder)
    table = _read_predictions(folder)
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in PREDICTION_COLUMNS}
    order = np.argsort(columns["row_id"], kind="stable")
    row_id, label, pred = (columns[c][order] for c in PREDICTION_COLUMNS)
    where = storage.join(folder, "predictions.parquet")
    if len(row_id) != report["rows"]:
        raise ComparisonError(f"{where} has {len(row_id)} rows but report.json says {report['rows']}")
    duplicate = np.flatnonzero(row_id[1:] == row_id[:-1])
    if duplicate.size:
        raise ComparisonError(f"{where}: row_id {row_id[duplicate[0]]} appears more than once")
    accuracy = float(np.mean(label == pred)) if len(row_id) else float("nan")
    if not abs(accuracy - report["accuracy"]) <= 1e-9:
        raise ComparisonError(
            f"{where} gives accuracy {accuracy:.6f} but report.json says "
            f"{report['accuracy']:.6f}: the two files are not from the same evaluation"
        )
    return Evaluation(folder, report, row_id, label, pred)


def tta_of(evaluation: Evaluation) -> str:
    """The test-time augmentation of an evaluation: report.json's ``tta`` ("none" for reports before it)."""
    return str(evaluation.report.get("tta") or "none")


def check_comparable(a: Evaluation, b: Evaluation, allow_tta: bool = False) -> None:
    """Refuse two evaluations of different datasets, splits, rows, classes or labels, or (unless ``allow_tta``)
    of different test-time augmentation (ComparisonError)."""
    if tta_of(a) != tta_of(b) and not allow_tta:
        raise ComparisonError(
            f"A was evaluated with eval.tta {tta_of(a)} ({a.folder}), B with eval.tta {tta_of(b)} ({b.folder}): "
            "pass --allow-tta to pair them (it measures the gain of test-time augmentation on the same split)"
        )
    for key, what in (("dataset", "datasets"), ("split", "splits"), ("rows", "row counts")):
        if a.report[key] != b.report[key]:
            raise ComparisonError(
                f"the evaluations are of different {what}: A has {a.report[key]!r} ({a.folder}), "
                f"B has {b.report[key]!r} ({b.folder})"
            )
    classes_a = [r["class"] for r in a.report["per_class"]]
    classes_b = [r["class"] for r in b.report["per_class"]]
    if classes_a != classes_b:
        raise ComparisonError(
            f"the evaluations have different classes: A has {len(classes_a)} "
            f"({', '.join(classes_a[:5])}, ...), B has {len(classes_b)} "
            f"({', '.join(classes_b[:5])}, ...)"
        )
    if not np.array_equal(a.row_id, b.row_id):
        first = int(np.flatnonzero(a.row_id != b.row_id)[0])
        raise ComparisonError(
            f"the evaluations cover different rows: in row id order, A has row_id "
            f"{a.row_id[first]} where B has {b.row_id[first]}"
        )
    differ = np.flatnonzero(a.label != b.label)
    if differ.size:
        i = int(differ[0])
        raise ComparisonError(
            f"row_id {a.row_id[i]} has label {a.label[i]} in A but {b.label[i]} in B "
            f"({differ.size} rows differ): not the same split"
        )


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    Args:
        a_only: rows that only A classifies correctly.
        b_only: rows that only B classifies correctly.

    Returns:
        ``P(|X - n/2| >= |b_only - n/2|)`` for ``X ~ Binomial(n = a_only + b_only, 1/2)``; 1.0 without
        discordant rows.
    """
    from scipy.stats import binom

    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(int(a_only), int(b_only)), n, 0.5)))


def verdict_line(difference: float, p_value: float, alpha: float = 0.05) -> str:
    """One sentence: which model is better and by how many accuracy points, or that the test cannot tell."""
    points = 100.0 * difference
    if p_value < alpha and difference != 0:
        better, worse = ("B", "A") if difference > 0 else ("A", "B")
        return f"{better} is better than {worse}: +{abs(points):.2f} points of accuracy, p = {p_value:.3g}"
    return (
        f"no significant difference at the {alpha:.0%} level: B - A = {points:+.2f} points of accuracy, "
        f"p = {p_value:.3g}"
    )


def _per_class(a: dict, b: dict) -> list[dict]:
    rows = [
        {
            "class": ra["class"],
            "index": ra["index"],
            "f1_a": ra["f1"],
            "f1_b": rb["f1"],
            "difference": rb["f1"] - ra["f1"],
            "support": ra["support"],
        }
        for ra, rb in zip(a["per_class"], b["per_class"])
    ]
    return sorted(rows, key=lambda r: (r["difference"], r["index"]))


def compare(a: Evaluation, b: Evaluation, alpha: float = 0.05, allow_tta: bool = False) -> dict:
    """Paired comparison of two comparable evaluations (see :func:`check_comparable`; ``allow_tta``: pair a
    test-time-augmented evaluation with a plain one).

    Returns a JSON-ready dict: the folders, dataset/split/rows, both accuracies with their Wilson intervals,
    the difference B - A (fraction), the discordant counts, McNemar's exact p-value, ``significant`` at
    ``alpha``, the verdict line, macro-F1 of both, and per-class F1 of both with the difference, sorted from
    the largest drop to the largest gain.
    """
    if not 0.0 < alpha < 1.0:
        raise ComparisonError(f"alpha must be in (0, 1), got {alpha}")
    check_comparable(a, b, allow_tta)
    right_a, right_b = a.pred == a.label, b.pred == b.label
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    difference = b.report["accuracy"] - a.report["accuracy"]
    p_value = mcnemar_exact(a_only, b_only)
    macro_a, macro_b = a.report.get("macro avg", {}), b.report.get("macro avg", {})
    return {
        "a": a.folder,
        "b": b.folder,
        "dataset": a.report["dataset"],
        "split": a.report["split"],
        "rows": int(a.report["rows"]),
        "tta": {"a": tta_of(a), "b": tta_of(b)},
        "accuracy": {
            "a": a.report["accuracy"],
            "b": b.report["accuracy"],
            "difference": difference,
            "a_ci": a.report.get("accuracy_ci"),
            "b_ci": b.report.get("accuracy_ci"),
        },
        "pairs": {
            "both_right": int((right_a & right_b).sum()),
            "a_only": a_only,
            "b_only": b_only,
            "both_wrong": int((~right_a & ~right_b).sum()),
        },
        "test": "McNemar's exact test (two-sided binomial test on the rows only one model gets right)",
        "p_value": p_value,
        "alpha": alpha,
        "significant": bool(p_value < alpha and difference != 0),
        "verdict": verdict_line(difference, p_value, alpha),
        "macro_f1": {
            "a": macro_a.get("f1"),
            "b": macro_b.get("f1"),
            "difference": (macro_b["f1"] - macro_a["f1"]) if "f1" in macro_a and "f1" in macro_b else None,
            "a_ci": macro_a.get("f1_ci"),
            "b_ci": macro_b.get("f1_ci"),
        },
        "per_class": _per_class(a.report, b.report),
    }


def compare_folders(path_a: str, path_b: str, alpha: float = 0.05, allow_tta: bool = False) -> dict:
    """:func:`compare` of two evaluation folders (local paths or URIs, or their report.json paths)."""
    result = compare(load_evaluation(path_a), load_evaluation(path_b), alpha, allow_tta)
    log.debug(
        "compared %s and %s on %s/%s: %s",
        result["a"],
        result["b"],
        result["dataset"],
        result["split"],
        result["verdict"],
    )
    return result


def _headline(result: dict) -> list[tuple[str, str, str, str]]:
    """(measure, A, B, B - A) rows shared by the terminal and Markdown tables."""
    acc, macro, pairs = result["accuracy"], result["macro_f1"], result["pairs"]
    return [
        (
            "Accuracy",
            f"{fmt(acc['a'])} {fmt_ci(acc['a_ci'])}",
            f"{fmt(acc['b'])} {fmt_ci(acc['b_ci'])}",
            f"{100 * acc['difference']:+.2f} points",
        ),
        (
            "Macro-F1",
            f"{fmt(macro['a'])} {fmt_ci(macro['a_ci'])}",
            f"{fmt(macro['b'])} {fmt_ci(macro['b_ci'])}",
            "n/a" if macro["difference"] is None else f"{100 * macro['difference']:+.2f} points",
        ),
        (
            "Rows only this model gets right",
            str(pairs["a_only"]),
            str(pairs["b_only"]),
            f"{pairs['b_only'] - pairs['a_only']:+d}",
        ),
    ]


def _tta(result: dict) -> dict:
    return result.get("tta") or {"a": "none", "b": "none"}


def _class_row(r: dict) -> list[str]:
    return [str(r["index"]), r["class"], fmt(r["f1_a"]), fmt(r["f1_b"]), f"{r['difference']:+.4f}", str(r["support"])]


def markdown(result: dict) -> str:
    """comparison.md: the inputs, the verdict, the headline table and every class's F1 difference."""
    lines = [
        "# Comparison of two evaluations",
        "",
        f"- **A:** {result['a']}",
        f"- **B:** {result['b']}",
        f"- **Dataset / split / rows:** {result['dataset']} / {result['split']} / {result['rows']}",
        f"- **Test-time augmentation (eval.tta):** A {_tta(result)['a']}, B {_tta(result)['b']}",
        f"- **Test:** {result['test']}, p = {result['p_value']:.3g}; both right "
        f"{result['pairs']['both_right']}, both wrong {result['pairs']['both_wrong']}",
        "",
        f"**Verdict: {result['verdict']}**",
        "",
    ]
    lines += md_table(["Measure", "A", "B", "B - A"], [list(row) for row in _headline(result)])
    lines += [
        "",
        "Intervals are 95% (Wilson for accuracy, bootstrap for macro-F1).",
        "",
        "## Per-class F1 (largest drop first; no test per class)",
        "",
    ]
    lines += md_table(
        ["Index", "Class", "F1 A", "F1 B", "B - A", "Support"], [_class_row(r) for r in result["per_class"]]
    )
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, output: str) -> dict:
    """Write comparison.json and comparison.md into ``output`` (local folder or URI), each atomically.

    Returns ``{"json": path, "markdown": path}``.
    """
    paths = {"json": storage.join(output, "comparison.json"), "markdown": storage.join(output, "comparison.md")}
    storage.write_text(paths["json"], json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")
    storage.write_text(paths["markdown"], markdown(result))
    return paths


def _terminal_classes(per_class: list[dict]) -> tuple[list[dict], Optional[str]]:
    if len(per_class) <= TERMINAL_CLASSES:
        return per_class, None
    half = TERMINAL_CLASSES // 2
    shown = per_class[:half] + per_class[-half:]
    return shown, f"the {half} largest drops and gains of {len(per_class)} classes; all in comparison.md"


def print_comparison(result: dict, console: Any = None) -> None:
    """The headline table, the per-class F1 differences (largest changes only beyond 20 classes), the verdict."""
    from rich import box
    from rich.table import Table

    console = default_console(console)
    tta = _tta(result)
    marks = {k: f" (eval.tta {v})" if tta["a"] != tta["b"] else "" for k, v in tta.items()}
    console.print(f"A: {result['a']}{marks['a']}\nB: {result['b']}{marks['b']}", soft_wrap=True, highlight=False)
    table = Table(title=f"{result['dataset']} / {result['split']} / {result['rows']} rows", box=box.SIMPLE_HEAD)
    for header in ("Measure", "A", "B", "B - A"):
        table.add_column(header, justify="left" if header == "Measure" else "right")
    for row in _headline(result):
        table.add_row(*row)
    print_table(table, console)

    shown, caption = _terminal_classes(result["per_class"])
    table = Table(title="Per-class F1", caption=caption, box=box.SIMPLE_HEAD)
    for header in ("#", "Class", "F1 A", "F1 B", "B - A", "Support"):
        table.add_column(header, justify="left" if header == "Class" else "right")
    for r in shown:
        style = "red" if r["difference"] < 0 else "green" if r["difference"] > 0 else None
        table.add_row(*_class_row(r), style=style)
    print_table(table, console)
    console.print(f"{result['test']}: p = {result['p_value']:.3g}", soft_wrap=True, highlight=False)
    console.print(f"[bold]{result['verdict']}[/bold]", soft_wrap=True, highlight=False)
