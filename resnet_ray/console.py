"""The terminal: rich tables of an evaluation, a training run and a search, and the progress bars every job
uses. Where the output is not a terminal (a file, a pipe, a job log) tables keep their natural width instead of
being cut to 80 columns, and no bar is drawn."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

from resnet_ray.formatting import AVERAGES, fmt, fmt_ci, identity, per_class_cells

_UNBOUNDED = 100_000  # columns: the width a table may take where the output is not a terminal


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
        table.add_row(*per_class_cells(r), style="bold red" if r["index"] in worst_idx else None)
    table.add_section()
    for key in AVERAGES:
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


def print_summary(report: dict, console: Any = None, worst: int = 5, output: Any = None) -> None:
    """Print per-class rows, averages (and the coarse report if present) as rich tables.

    The ``worst`` classes by F1 (among classes with support > 0) are shown in
    red, with 95% intervals next to precision and recall, followed by one
    line with accuracy and macro-F1 (with their intervals) / top-5 / ECE (before -> after the temperature) /
    total support, and, when the report has them, a line with the calibration and test-time augmentation and
    one naming the gallery of the most confident mistakes (in ``output``, the report folder, when given).
    """
    console = default_console(console)
    bits = [identity(report[k]) for k in ("model", "dataset", "split") if report.get(k) is not None]
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
    calibration = report.get("calibration")
    if calibration:
        parts.append(f"ECE {fmt(calibration['before']['ece'])} -> {fmt(calibration['after']['ece'])}")
    elif "ece" in report:
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
    if calibration:
        fitted = f"fitted on {calibration['fitted_on']}" if calibration.get("fitted_on") else "not fitted"
        console.print(
            f"calibration: temperature {calibration['temperature']:.4g} ({fitted}); NLL "
            f"{fmt(calibration['before']['nll'])} -> {fmt(calibration['after']['nll'])} | test-time augmentation: "
            f"{report.get('tta', 'none')}",
            highlight=False,
            soft_wrap=True,
        )
    errors = report.get("errors")
    if errors:
        folder = f"{output}/" if output else ""
        per_class = f"; per class: {folder}per_class_errors/" if errors["per_class"] else ""
        shown = f"{len(errors['rows'])} of {errors['wrong']}"
        console.print(
            f"most confident mistakes ({shown}): {folder}{errors['file']}{per_class}",
            highlight=False,
            soft_wrap=True,
        )


def calibration_line(record: dict) -> str:
    """One line on a temperature fit (resnet_ray.calibration's record): the temperature and what it did on the
    split it was fitted on, or why it stays 1."""
    if not record.get("fitted"):
        return f"temperature 1 (not fitted: {record['reason']})"
    return (
        f"temperature {record['temperature']:.4g} fitted on {record['split']} ({record['rows']} rows, eval.tta "
        f"{record['tta']}): NLL {fmt(record['nll_before'])} -> {fmt(record['nll_after'])}, ECE "
        f"{fmt(record['ece_before'])} -> {fmt(record['ece_after'])}"
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
    calibration = getattr(result, "calibration", None)
    if calibration:
        console.print(calibration_line(calibration), soft_wrap=True, highlight=False)
    if result.evaluation:
        print_summary(result.evaluation["report"], console, output=result.evaluation["output"])
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
    console.print(f"curves: {result.curves_path}", soft_wrap=True)
    if result.evaluation:
        console.print(
            f"test accuracy of the best model: {fmt(result.evaluation['report']['accuracy'])} "
            f"(report in {result.evaluation['output']})",
            soft_wrap=True,
        )


def new_progress(console: Any, unit: str, transient: bool = False) -> Any:
    """The one rich Progress layout of every job: description, bar, done/total, ``unit`` (a text column:
    "steps", or a task field such as the rate), elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


@contextlib.contextmanager
def progress_bar(description: str, console: Any = None) -> Iterator[tuple]:
    """A rich progress bar on stderr with the images/s rate: yields (start(total), advance(n)) callbacks.

    The bar appears at start() (work that never starts shows none) and only on a terminal: in a job log or a
    file the caller's closing summary line says it all.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    progress = new_progress(console, "{task.fields[rate]}")
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
