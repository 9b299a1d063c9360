"""The figures (PNG, local path or URI, written atomically): confusion matrices, per-class F1, the reliability
diagram (before and after temperature scaling), the gallery of the most confident mistakes and a training run's
history. matplotlib is imported lazily with the Agg backend; no ray, no torch."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from resnet_ray import storage
from resnet_ray.calibration import calibration_bins, expected_calibration_error
from resnet_ray.formatting import fmt


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


def plot_confusion(path: str, cm: np.ndarray, names: Sequence[str], title: str) -> None:
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


def plot_f1(path: str, report: dict) -> None:
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


def write_reliability_plot(calibration: Any, path: str, before: Any = None, temperature: Optional[float] = None) -> str:
    """Draw the reliability diagram behind the ECE into ``path`` (PNG; local path or URI).

    Args:
        calibration: ``(n_bins, 3)`` summed ``calibration.calibration_counts`` (count, sum confidence, sum correct).
        path: where to write the PNG.
        before: the same counts before temperature scaling (T = 1), drawn as a line beside the bars.
        temperature: the temperature that ``calibration`` was computed at (shown in the title).

    Top: accuracy per confidence bin (bars) against the diagonal of perfect calibration, the gap to the
    bin's mean confidence shaded (and, with ``before``, the uncalibrated accuracy per bin as a line); bottom: the
    number of predictions per bin (log scale). Returns ``path``.
    """
    bins = calibration_bins(calibration)
    ece = expected_calibration_error(calibration)
    low = np.array([b["low"] for b in bins])
    width = np.array([b["high"] - b["low"] for b in bins])
    count = np.array([b["count"] for b in bins], dtype=np.float64)
    used = count > 0
    acc = np.array([b["accuracy"] for b in bins])[used]
    conf = np.array([b["confidence"] for b in bins])[used]
    label = "after temperature scaling" if before is not None else "accuracy"
    with _figure(path, nrows=2, figsize=(6, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}) as (
        fig,
        (top, bottom),
    ):
        bar = {"align": "edge", "edgecolor": "black", "linewidth": 0.5}
        top.bar(low[used], acc, width=width[used], color="tab:blue", label=label, **bar)
        gap = {**bar, "color": "tab:red", "edgecolor": "tab:red", "alpha": 0.3, "hatch": "//"}
        top.bar(low[used], conf - acc, bottom=acc, width=width[used], label="gap to mean confidence", **gap)
        title = f"Reliability diagram: ECE {fmt(ece)} over {int(count.sum())} predictions"
        if before is not None:
            title = _uncalibrated_overlay(top, bottom, before, low, ece, temperature)
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("Accuracy")
        top.set_title(title)
        top.legend(loc="upper left", fontsize=8)
        top.grid(alpha=0.3)
        bottom.bar(low, count, width=width, color="gray", **bar)
        if count.max(initial=0) > 0:
            bottom.set_yscale("log")
        bottom.set_xlabel("Confidence (max softmax probability)")
        bottom.set_ylabel("Predictions")
    return path


def _uncalibrated_overlay(top, bottom, before: Any, low: np.ndarray, ece: float, temperature: Optional[float]) -> str:
    """The reliability before temperature scaling as a line over the bars (and its counts as a step over the
    histogram); returns the diagram's title with both ECEs."""
    old = calibration_bins(before)
    seen = [b for b in old if b["count"] > 0]
    top.plot(
        [b["confidence"] for b in seen],
        [b["accuracy"] for b in seen],
        "o-",
        color="tab:orange",
        linewidth=1.5,
        markersize=4,
        label="before (T = 1): accuracy at mean confidence",
    )
    counts = np.append([b["count"] for b in old], old[-1]["count"])
    bottom.step(np.append(low, 1.0), counts, where="post", color="tab:orange", linewidth=1)
    t = f", T = {temperature:.3g}" if temperature is not None else ""
    return f"Reliability: ECE {fmt(expected_calibration_error(before))} -> {fmt(ece)}{t}"


def write_error_gallery(path: str, images: Sequence[np.ndarray], captions: Sequence[str], title: str) -> str:
    """A grid of images (uint8 H x W x 3, shown pixel for pixel, nearest-neighbour) with a caption under each,
    8 to a row, into ``path`` (PNG; local path or URI); a figure that says so when there are none."""
    n = len(images)
    cols = max(1, min(8, n))
    rows = max(1, math.ceil(n / cols))
    with _figure(
        path, nrows=rows, ncols=cols, figsize=(1.7 * cols + 0.4, 2.0 * rows + 0.6), dpi=110, squeeze=False
    ) as (
        fig,
        axes,
    ):
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(images[i], interpolation="nearest")
                ax.set_title(captions[i], fontsize=6.5, loc="left")
        if not n:
            axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
        fig.suptitle(title, fontsize=10)
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


def write_search_curves(trials: Sequence[dict], path: str) -> str:
    """Draw every trial's training error (dashed) and validation error (solid) per epoch into ``path`` (PNG; local
    path or URI), one colour per trial: the picture of He et al. 2016's Figure 6 for a grid over depth x shortcut.

    Args:
        trials: one dict per trial with ``label`` (its varied values), ``epoch``, ``train_error`` and
            ``val_error`` (lists of equal length, fractions; ``None`` where an epoch had no validation).
        path: where to write the PNG.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    with _figure(path, figsize=(9, 5.5), dpi=110) as (fig, ax):
        colours = _trial_colours(len(trials))
        for trial, colour in zip(sorted(trials, key=lambda t: t["label"]), colours):
            # markers: a one-epoch trial is a single point, which a line alone does not draw
            ax.plot(trial["epoch"], [100 * e for e in trial["train_error"]], "--o", color=colour, linewidth=1.2, ms=3)
            val = [(e, 100 * v) for e, v in zip(trial["epoch"], trial["val_error"]) if v is not None]
            ax.plot(
                [e for e, _ in val], [v for _, v in val], "-o", color=colour, linewidth=2, ms=4, label=trial["label"]
            )
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Error (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        style = [Line2D([], [], color="gray", linestyle="--"), Line2D([], [], color="gray", linewidth=2)]
        first = ax.legend(style, ["training error", "validation error"], loc="upper right")
        ax.add_artist(first)
        ax.legend(loc="lower left", fontsize=8, title="trial")
        ax.set_title(f"Training (dashed) and validation (solid) error of {len(trials)} trials")
    return path


def write_gradients_plot(runs: Sequence[dict], path: str) -> Optional[str]:
    """The per-stage gradient norms of train.diagnostics (history keys ``grad_norm_<stage>``, the epoch's mean) per
    epoch, log scale: for one run one line per stage; for several (a search's trials) one panel per stage and one
    line per run. A stage whose norm falls by orders of magnitude towards the input vanishes; one rising, explodes.

    Args:
        runs: dicts with ``label`` and ``history`` (one dict per epoch with ``epoch``).
        path: where to write the PNG.

    Returns ``path``, or None when no history holds a gradient norm (diagnostics off).
    """
    from matplotlib.ticker import MaxNLocator

    keys = list(dict.fromkeys(k for run in runs for row in run["history"] for k in row if k.startswith("grad_norm_")))
    if not keys:
        return None
    stages = [k.removeprefix("grad_norm_") for k in keys]
    single = len(runs) == 1
    panels = 1 if single else len(keys)
    with _figure(path, ncols=panels, figsize=(5 * panels if not single else 7, 4.2), dpi=110, squeeze=False) as (
        fig,
        axes,
    ):
        for i, (key, stage) in enumerate(zip(keys, stages)):
            ax = axes[0][0 if single else i]
            for run, colour in zip(runs, _trial_colours(len(runs))):
                epochs, values = _history_series(run["history"], key)
                if epochs:
                    ax.plot(
                        epochs,
                        values,
                        "-o",
                        ms=3,
                        label=stage if single else run["label"],
                        **({} if single else {"color": colour}),
                    )
            ax.set_yscale("log")
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
            if not single:
                ax.set_title(stage)
        axes[0][0].set_ylabel("Gradient norm (mean over the epoch's steps)")
        axes[0][-1].legend(fontsize=8, title="stage" if single else "trial")
        if single:
            axes[0][0].set_title(f"Gradient norm per stage: {runs[0]['label']}")
    return path


def _trial_colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_signal_plot(rows: Sequence[dict], path: str) -> str:
    """The signal at initialization (resnet_ray.probes.signal_stats) against depth, one line per net: the std of
    each conv's output, the norm of the gradient with respect to it, and the norm of its weight gradient (log
    scales). Vanishing shows as a line falling towards the input (layer 1), exploding as one rising.

    Args:
        rows: one dict per net and layer with ``net``, ``layer``, ``activation_std``, ``activation_grad_norm``
            and ``weight_grad_norm``.
    """
    panels = (
        ("activation_std", "std of the layer's output"),
        ("activation_grad_norm", "||dL / d output|| (activation gradient)"),
        ("weight_grad_norm", "||dL / dW|| (weight gradient)"),
    )
    nets = list(dict.fromkeys(r["net"] for r in rows))
    with _figure(path, nrows=1, ncols=3, figsize=(15, 4.6), dpi=100) as (fig, axes):
        for ax, (key, title) in zip(axes, panels):
            for net, colour in zip(nets, _trial_colours(len(nets))):
                mine = [r for r in rows if r["net"] == net]
                ax.plot([r["layer"] for r in mine], [r[key] for r in mine], "-o", ms=2.5, color=colour, label=net)
            ax.set_yscale("log")
            ax.set_xlabel("conv layer (1 = next to the input)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
        axes[1].legend(fontsize=8)
        fig.suptitle("The signal at initialization: one batch, forward and backward, per conv layer")
    return path


def write_lesion_plot(study: dict, path: str) -> str:
    """The lesion study of one net (resnet_ray.lesion_study): the accuracy with each block's residual branch
    removed (downsampling blocks in another colour, unremovable ones marked), the baseline and chance as lines;
    beside it, the accuracy with k random blocks removed (mean +- std over the draws). Veit et al. 2016, Figs. 3
    and 5a."""
    with _figure(path, nrows=1, ncols=2, figsize=(13, 4.6), dpi=100) as (fig, (left, right)):
        rows = study["blocks"]
        xs = np.arange(len(rows))
        heights = [100 * r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
        colours = ["tab:orange" if r["downsampling"] else "tab:blue" for r in rows]
        left.bar(xs, heights, color=colours)
        for x, r in zip(xs, rows):
            if r["accuracy"] is None:
                left.text(x, 1, "cannot be\nremoved", ha="center", va="bottom", fontsize=7, rotation=90)
        for ax in (left, right):
            ax.axhline(100 * study["baseline_accuracy"], color="black", linewidth=1, label="no lesion")
            ax.axhline(100 * study["chance"], color="gray", linestyle="--", linewidth=1, label="chance")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3, axis="y")
        left.set_xticks(xs, [r["block"] for r in rows], rotation=60, fontsize=7)
        left.set_title("one block removed (orange: downsampling)", fontsize=10)
        left.legend(fontsize=8, loc="lower left")
        ks = study["random_k"]
        if ks:
            right.errorbar(
                [r["k"] for r in ks], [100 * r["mean"] for r in ks], yerr=[100 * r["std"] for r in ks], fmt="-o", ms=4
            )
        right.set_xlabel("k random non-downsampling blocks removed")
        right.set_title(f"k blocks removed (mean +- std of {study['draws']} draws)", fontsize=10)
        fig.suptitle(f"Lesion study of {study['arch']} on {study['split']} ({study['rows']:,} images)")
    return path


def write_responses_plot(nets: Sequence[dict], path: str) -> str:
    """He et al. 2016a, Fig. 7: the std of each 3x3 layer's response (after BN, before the ReLU or the addition),
    in layer order (top) and sorted by magnitude (bottom), one line per net.

    Args:
        nets: ``{"net": label, "responses": [{"layer", "std"}, ...]}`` per net.
    """
    with _figure(path, nrows=2, ncols=1, figsize=(9, 7), dpi=100) as (fig, (top, bottom)):
        for net, colour in zip(nets, _trial_colours(len(nets))):
            stds = [r["std"] for r in net["responses"]]
            top.plot(range(1, len(stds) + 1), stds, "-o", ms=2.5, color=colour, label=net["net"])
            bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), "-o", ms=2.5, color=colour)
        top.set_xlabel("layer index (original)")
        bottom.set_xlabel("layer index (sorted by magnitude)")
        for ax in (top, bottom):
            ax.set_ylabel("std")
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
        top.set_title("Standard deviations of the 3x3 layers' responses (He et al. 2016a, Fig. 7)", fontsize=10)
    return path
