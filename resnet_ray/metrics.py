"""Classification metrics computed from additive statistics (numpy only).

Everything here works on quantities that can be accumulated per batch on
many actors and then summed:

* ``confusion_matrix`` -> ``(C, C)`` int64 counts; sum matrices over batches.
* the calibration statistics of :mod:`resnet_ray.calibration` (``calibration_counts``, the NLL); sum them too.

The final numbers are then derived once from the summed statistics with
``classification_report``, ``coarse_confusion_matrix`` and ``most_confused_pairs``.

Intervals (95% by default) are added by ``classification_report``: Wilson
score intervals (``wilson_interval``) for accuracy and each class's
precision and recall, and a seeded percentile bootstrap for macro-F1
(``bootstrap_macro_f1``) that resamples the confusion-matrix cells, which is
the same as resampling the evaluated rows. An undefined interval (no trials)
is NaN. No inference is re-run.

This module deliberately imports neither ray nor torch.

Report dict produced by :func:`classification_report` (all values are plain
Python ``int``/``float``/``str``, so the dict is JSON-serialisable; a
``zero_division`` of NaN can yield NaN floats)::

    {
      "num_classes": int,                       # C
      "zero_division": float,                   # 0.0, 1.0 or nan
      "per_class": [                            # C entries, in index order
        {"class": str, "index": int, "precision": float, "recall": float,
         "f1": float, "support": int,           # support = row sum of cm
         "precision_ci": [lo, hi], "recall_ci": [lo, hi]},   # Wilson
        ...
      ],
      "macro avg":    {"precision", "recall", "f1", "support",
                       "f1_ci": [lo, hi]},      # bootstrap (absent if n_resamples=0)
      "weighted avg": {"precision", "recall", "f1", "support"},
      "micro avg":    {"precision", "recall", "f1", "support"},
      "accuracy": float,                        # trace / total (fraction)
      "accuracy_ci": [lo, hi],                  # Wilson
      "total_support": int,                     # cm.sum()
      "intervals": {"confidence": 0.95, "accuracy": "wilson", ...,
                    "macro_f1": "percentile bootstrap of the rows", "resamples": 1000, "seed": 0},
    }

The evaluation job adds ``model``, ``dataset``, ``split``, ``config``,
``top5_accuracy``, ``ece`` (:mod:`resnet_ray.calibration`), ``confused_pairs`` and ``coarse`` (a nested report
of this same structure plus its own ``confused_pairs``) on top.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

__all__ = [
    "confusion_matrix",
    "wilson_interval",
    "bootstrap_macro_f1",
    "classification_report",
    "coarse_confusion_matrix",
    "most_confused_pairs",
    "RowCoverage",
]


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------
def int_labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    """1-D int64 view of ``values`` after checking every entry is in [0, C)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if np.issubdtype(arr.dtype, np.floating):
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
            if bad.any():
                raise ValueError(f"{name} must be integer class indices, got {arr[bad][0]!r}")
        else:
            raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    out_of_range = (arr < 0) | (arr >= num_classes)
    if out_of_range.any():
        pos = int(np.flatnonzero(out_of_range)[0])
        value = arr[pos].item()
        raise ValueError(f"{name}[{pos}] = {value} is outside the valid class range [0, {num_classes})")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs.

    Args:
        labels: ``(N,)`` integer true class indices in ``[0, num_classes)``.
        preds: ``(N,)`` integer predicted class indices in ``[0, num_classes)``.
        num_classes: ``C``; the label set is always ``range(C)``, so matrices
            from different batches/actors have the same shape and can be summed.

    Returns:
        ``(C, C)`` int64 array; ``cm[i, j]`` = number of samples whose true class
        is ``i`` and predicted class is ``j`` (rows = true, cols = predicted).

    Raises:
        ValueError: if the lengths differ or a label/prediction is outside
            ``[0, C)`` (the message names the offending value and position).
    """
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    y = int_labels(labels, "labels", num_classes)
    p = int_labels(preds, "preds", num_classes)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"labels and preds have different lengths: {y.shape[0]} != {p.shape[0]}")
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


# --------------------------------------------------------------------------
# Classification report
# --------------------------------------------------------------------------
def _zero_division_value(zero_division: Union[float, str]) -> float:
    if isinstance(zero_division, str):
        if zero_division == "warn":
            return 0.0
        raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")
    zd = float(zero_division)
    if math.isnan(zd) or zd in (0.0, 1.0):
        return zd
    raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")


def safe_divide(num: np.ndarray, den: np.ndarray, zd: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    mask = den == 0
    out = num / np.where(mask, 1.0, den)
    out[mask] = zd
    return out


def _nanaverage(a: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mirror of sklearn's ``_nanaverage``: ignore NaNs; all-zero weights -> plain mean."""
    if a.shape[0] == 0:
        return float("nan")
    mask = np.isnan(a)
    if mask.all():
        return float("nan")
    if weights is None:
        return float(np.mean(a[~mask]))
    a, w = a[~mask], np.asarray(weights, dtype=np.float64)[~mask]
    if w.sum() == 0:
        return float(np.mean(a))
    return float(np.average(a, weights=w))


def _check_cm(cm: Any) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be a non-empty square (C, C) array, got {cm.shape}")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative entries")
    return cm


# --------------------------------------------------------------------------
# Confidence intervals
# --------------------------------------------------------------------------
def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: Any, trials: Any, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for binomial proportions (no continuity correction), vectorised.

    Args:
        successes: ``k``, counts (scalar or array).
        trials: ``n``, counts of the same shape, ``0 <= k <= n``.
        confidence: two-sided level, e.g. 0.95.

    Returns:
        ``(low, high)`` float64 arrays of fractions in ``[0, 1]``; NaN where
        ``n == 0`` (no trials, no interval).
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("wilson_interval needs 0 <= successes <= trials")
    z2 = _z(confidence) ** 2
    safe_n = np.where(n > 0, n, 1.0)
    center = (k + z2 / 2.0) / (safe_n + z2)
    half = np.sqrt(z2) / (safe_n + z2) * np.sqrt(k * (safe_n - k) / safe_n + z2 / 4.0)
    low = np.where(n > 0, np.clip(center - half, 0.0, 1.0), np.nan)
    high = np.where(n > 0, np.clip(center + half, 0.0, 1.0), np.nan)
    return low, high


def _macro_f1(tp: np.ndarray, true_sum: np.ndarray, pred_sum: np.ndarray, zd: float) -> np.ndarray:
    """Macro-F1 of the last axis (classes), ignoring NaN (zero_division=nan) like ``_nanaverage``."""
    f1 = safe_divide(2.0 * tp, true_sum + pred_sum, zd)
    valid = ~np.isnan(f1)
    counts = valid.sum(axis=-1)
    sums = np.where(valid, f1, 0.0).sum(axis=-1)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def bootstrap_macro_f1(
    cm: Any,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    zero_division: Union[float, str] = 0.0,
) -> tuple[float, float]:
    """Seeded percentile-bootstrap interval for macro-F1 from a summed confusion matrix.

    Resampling the N evaluated rows with replacement is a multinomial draw of
    N over the matrix cells with probabilities ``cm / N``; only non-empty
    cells can be drawn, so the cost is ``n_resamples x`` (non-empty cells),
    independent of C^2.

    Args:
        cm: ``(C, C)`` counts, rows = true, cols = predicted.
        n_resamples: number of bootstrap resamples (> 0).
        confidence: two-sided level, e.g. 0.95.
        seed: seed of numpy's default generator; the same seed gives the same interval.
        zero_division: the convention of the point estimate (see :func:`classification_report`).

    Returns:
        ``(low, high)`` macro-F1 fractions; NaN if the matrix is empty.
    """
    cm = _check_cm(cm)
    _z(confidence)
    if int(n_resamples) <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    zd = _zero_division_value(zero_division)
    C, total = cm.shape[0], int(cm.sum())
    if total == 0:
        return math.nan, math.nan
    cells = np.flatnonzero(cm.reshape(-1))
    rows, cols = np.divmod(cells, C)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(total, cm.reshape(-1)[cells] / total, size=int(n_resamples)).astype(np.float64)
    offset = (np.arange(int(n_resamples)) * C)[:, None]

    def per_class(index: np.ndarray, weights: np.ndarray) -> np.ndarray:
        flat = (offset + index[None, :]).reshape(-1)
        return np.bincount(flat, weights=weights.reshape(-1), minlength=int(n_resamples) * C).reshape(-1, C)

    diagonal = rows == cols
    tp = per_class(rows[diagonal], draws[:, diagonal])
    scores = _macro_f1(tp, per_class(rows, draws), per_class(cols, draws), zd)
    scores = scores[~np.isnan(scores)]
    if scores.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(scores, [tail, 100.0 - tail])
    return float(low), float(high)


def _pairs(low: np.ndarray, high: np.ndarray) -> list[list[float]]:
    return [[float(lo), float(hi)] for lo, hi in zip(np.atleast_1d(low), np.atleast_1d(high))]


def classification_report(
    cm: Any,
    class_names: Sequence[str],
    zero_division: Union[float, str] = 0.0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-class and averaged precision/recall/F1 from a ``(C, C)`` confusion matrix.

    Matches ``sklearn.metrics.classification_report(y, p, labels=range(C),
    output_dict=True, zero_division=zero_division)`` (sklearn >= 1.3
    conventions): precision = tp/(tp+fp), recall = tp/(tp+fn),
    F1 = 2tp/(2tp+fp+fn); a zero denominator yields ``zero_division`` (for F1
    only when tp+fp+fn == 0). Macro = unweighted mean over all C classes,
    weighted = mean weighted by support (plain mean if total support is 0),
    both ignoring NaNs. Micro pools all counts; with all C labels included it
    equals accuracy (sklearn reports it under ``"accuracy"``).

    Args:
        cm: ``(C, C)`` counts, rows = true, cols = predicted.
        class_names: ``C`` display names, index-aligned with ``cm``.
        zero_division: 0, 1, NaN (or ``"warn"``, treated as 0).
        confidence: level of the intervals (Wilson for accuracy and each
            class's precision/recall, bootstrap for macro-F1).
        n_resamples: bootstrap resamples for the macro-F1 interval (0: none).
        seed: bootstrap seed.

    Returns:
        The report dict described in the module docstring. Scores are
        fractions in ``[0, 1]``, supports are sample counts.
    """
    cm = _check_cm(cm)
    C = cm.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} entries but the matrix is {C}x{C}")
    zd = _zero_division_value(zero_division)

    tp = np.diag(cm).astype(np.float64)
    pred_sum = cm.sum(axis=0).astype(np.float64)
    true_sum = cm.sum(axis=1).astype(np.float64)
    total = int(cm.sum())

    precision = safe_divide(tp, pred_sum, zd)
    recall = safe_divide(tp, true_sum, zd)
    f1 = safe_divide(2.0 * tp, true_sum + pred_sum, zd)

    precision_ci = _pairs(*wilson_interval(tp, pred_sum, confidence))
    recall_ci = _pairs(*wilson_interval(tp, true_sum, confidence))
    per_class = [
        {
            "class": names[i],
            "index": i,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(true_sum[i]),
            "precision_ci": precision_ci[i],
            "recall_ci": recall_ci[i],
        }
        for i in range(C)
    ]

    def avg(weights: Optional[np.ndarray]) -> dict:
        return {
            "precision": _nanaverage(precision, weights),
            "recall": _nanaverage(recall, weights),
            "f1": _nanaverage(f1, weights),
            "support": total,
        }

    tp_all, pred_all, true_all = tp.sum(), pred_sum.sum(), true_sum.sum()
    micro = {
        "precision": float(safe_divide(np.array([tp_all]), np.array([pred_all]), zd)[0]),
        "recall": float(safe_divide(np.array([tp_all]), np.array([true_all]), zd)[0]),
        "f1": float(safe_divide(np.array([2.0 * tp_all]), np.array([true_all + pred_all]), zd)[0]),
        "support": total,
    }

    report: dict = {
        "num_classes": C,
        "zero_division": zd,
        "per_class": per_class,
        "macro avg": avg(None),
        "weighted avg": avg(true_sum),
        "micro avg": micro,
        "accuracy": micro["precision"],
        "accuracy_ci": _pairs(*wilson_interval(tp.sum(), total, confidence))[0],
        "total_support": total,
        "intervals": {"confidence": float(confidence), "accuracy": "wilson", "precision": "wilson", "recall": "wilson"},
    }
    if n_resamples:
        report["macro avg"]["f1_ci"] = list(bootstrap_macro_f1(cm, n_resamples, confidence, seed, zd))
        report["intervals"].update(
            macro_f1="percentile bootstrap of the rows", resamples=int(n_resamples), seed=int(seed)
        )
    return report


# --------------------------------------------------------------------------
# Superclass matrix and most-confused pairs
# --------------------------------------------------------------------------
def coarse_confusion_matrix(cm: Any, fine_to_coarse: Sequence[int], num_coarse: int) -> np.ndarray:
    """Collapse a fine ``(C, C)`` matrix to superclasses on both axes.

    Args:
        cm: ``(C, C)`` counts, rows = true, cols = predicted (fine classes).
        fine_to_coarse: length-``C`` sequence; ``fine_to_coarse[i]`` is the
            coarse index in ``[0, num_coarse)`` of fine class ``i``.
        num_coarse: ``K``.

    Returns:
        ``(K, K)`` int64 counts; equal to ``confusion_matrix`` computed directly
        on mapped labels/predictions.
    """
    cm = _check_cm(cm)
    C = cm.shape[0]
    num_coarse = int(num_coarse)
    if num_coarse <= 0:
        raise ValueError(f"num_coarse must be positive, got {num_coarse}")
    mapping = np.asarray(fine_to_coarse).reshape(-1)
    if mapping.shape[0] != C:
        raise ValueError(f"fine_to_coarse has {mapping.shape[0]} entries but the matrix is {C}x{C}")
    mapping = int_labels(mapping, "fine_to_coarse", num_coarse)
    onehot = np.zeros((C, num_coarse), dtype=np.int64)
    onehot[np.arange(C), mapping] = 1
    return (onehot.T @ cm.astype(np.int64) @ onehot).astype(np.int64)


def most_confused_pairs(cm: Any, class_names: Sequence[str], k: int = 10) -> list[dict]:
    """The ``k`` largest off-diagonal cells of a confusion matrix.

    Args:
        cm: ``(C, C)`` counts, rows = true, cols = predicted.
        class_names: ``C`` display names.
        k: maximum number of pairs returned.

    Returns:
        Up to ``k`` dicts ``{"true", "true_index", "predicted",
        "predicted_index", "count", "fraction"}`` where ``fraction`` =
        count / support of the true class (in ``[0, 1]``). Only cells with
        count > 0 are listed, sorted by count descending; ties keep row-major
        (true index, then predicted index) order.
    """
    cm = _check_cm(cm)
    C = cm.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} entries but the matrix is {C}x{C}")
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = off.reshape(-1)
    nz = np.flatnonzero(flat)
    order = nz[np.argsort(-flat[nz], kind="stable")][: max(int(k), 0)]
    support = cm.sum(axis=1)
    pairs = []
    for f in order:
        i, j = divmod(int(f), C)
        count = int(flat[f])
        pairs.append(
            {
                "true": names[i],
                "true_index": i,
                "predicted": names[j],
                "predicted_index": j,
                "count": count,
                "fraction": count / int(support[i]),
            }
        )
    return pairs


class RowCoverage:
    """Checks that prediction batches cover the row ids ``0..rows-1`` exactly once: :meth:`add` refuses an id
    seen before or outside the range, :meth:`finish` refuses a row never seen. Raises ``error`` (the job's own
    error class) with a message naming the ``noun`` of a row and the ``place`` it comes from."""

    def __init__(self, rows: int, error: type = ValueError, noun: str = "row", place: str = "split"):
        self.seen = np.zeros(rows, dtype=bool)
        self.error, self.noun, self.place = error, noun, place

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        rows = len(self.seen)
        if len(ids) and (ids.min() < 0 or ids.max() >= rows or self.seen[ids].any() or len(np.unique(ids)) != len(ids)):
            article = "an" if self.noun[0] in "aeiou" else "a"
            raise self.error(f"{article} {self.noun} was predicted twice or a row id is outside the {self.place}")
        self.seen[ids] = True

    def finish(self) -> None:
        if not self.seen.all():
            raise self.error(f"{int((~self.seen).sum())} of {len(self.seen)} {self.noun}s were never predicted")
