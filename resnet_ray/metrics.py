"""Classification metrics computed from additive statistics (numpy only).

Everything here works on quantities that can be accumulated per batch on
many actors and then summed:

* ``confusion_matrix`` -> ``(C, C)`` int64 counts; sum matrices over batches.
* ``calibration_counts`` -> ``(n_bins, 3)`` float64 statistics; sum them too.

The final numbers are then derived once from the summed statistics with
``classification_report``, ``expected_calibration_error``,
``coarse_confusion_matrix`` and ``most_confused_pairs``.

This module deliberately imports neither ray nor torch.

Report dict produced by :func:`classification_report` (all values are plain
Python ``int``/``float``/``str``, so the dict is JSON-serialisable; a
``zero_division`` of NaN can yield NaN floats)::

    {
      "num_classes": int,                       # C
      "zero_division": float,                   # 0.0, 1.0 or nan
      "per_class": [                            # C entries, in index order
        {"class": str, "index": int, "precision": float, "recall": float,
         "f1": float, "support": int},          # support = row sum of cm
        ...
      ],
      "macro avg":    {"precision", "recall", "f1", "support"},
      "weighted avg": {"precision", "recall", "f1", "support"},
      "micro avg":    {"precision", "recall", "f1", "support"},
      "accuracy": float,                        # trace / total (fraction)
      "total_support": int,                     # cm.sum()
      # only if topk_correct is given:
      "topk_correct": {"<k>": int, ...},
      "top<k>_accuracy": float, ...
    }

The evaluation job adds ``model``, ``dataset``, ``split``, ``config``,
``top5_accuracy``, ``ece``, ``confused_pairs`` and ``coarse`` (a nested report
of this same structure plus its own ``confused_pairs``) on top.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "confusion_matrix",
    "calibration_counts",
    "expected_calibration_error",
    "classification_report",
    "coarse_confusion_matrix",
    "most_confused_pairs",
]


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------
def _as_int_labels(values: Any, name: str, num_classes: int) -> np.ndarray:
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
                raise ValueError(
                    f"{name} must be integer class indices, got {arr[bad][0]!r}"
                )
        else:
            raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    out_of_range = (arr < 0) | (arr >= num_classes)
    if out_of_range.any():
        pos = int(np.flatnonzero(out_of_range)[0])
        value = arr[pos].item()
        raise ValueError(
            f"{name}[{pos}] = {value} is outside the valid class range "
            f"[0, {num_classes})"
        )
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
    y = _as_int_labels(labels, "labels", num_classes)
    p = _as_int_labels(preds, "preds", num_classes)
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"labels and preds have different lengths: {y.shape[0]} != {p.shape[0]}"
        )
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


# --------------------------------------------------------------------------
# Calibration (expected calibration error)
# --------------------------------------------------------------------------
def _bin_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def calibration_counts(confidence: Any, correct: Any, n_bins: int = 15) -> np.ndarray:
    """Per-bin calibration statistics for one batch; add the results across batches.

    Bins are equal-width on ``[0, 1]``: bin ``b`` holds confidences in
    ``(b/n_bins, (b+1)/n_bins]`` (bin 0 also holds exactly 0).

    Args:
        confidence: ``(N,)`` top-1 confidence (max softmax probability),
            a probability in ``[0, 1]``. Values within 1e-6 outside the range
            (float rounding) are clipped; anything else raises ValueError.
        correct: ``(N,)`` bool/0-1, whether the top-1 prediction was right.
        n_bins: number of bins.

    Returns:
        ``(n_bins, 3)`` float64 array; columns are ``count`` (samples in the
        bin), ``sum confidence`` and ``sum correct``. Arrays from different
        batches with the same ``n_bins`` can simply be added.
    """
    n_bins = int(n_bins)
    if n_bins <= 0:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape[0] != corr.shape[0]:
        raise ValueError(
            f"confidence and correct have different lengths: {conf.shape[0]} != {corr.shape[0]}"
        )
    out = np.zeros((n_bins, 3), dtype=np.float64)
    if conf.size == 0:
        return out
    bad = ~np.isfinite(conf) | (conf < -1e-6) | (conf > 1.0 + 1e-6)
    if bad.any():
        raise ValueError(f"confidence must be in [0, 1], got {conf[bad][0]!r}")
    conf = np.clip(conf, 0.0, 1.0)
    idx = np.searchsorted(_bin_edges(n_bins)[1:-1], conf, side="left")
    out[:, 0] = np.bincount(idx, minlength=n_bins)
    out[:, 1] = np.bincount(idx, weights=conf, minlength=n_bins)
    out[:, 2] = np.bincount(idx, weights=corr, minlength=n_bins)
    return out


def expected_calibration_error(counts: Any) -> float:
    """Standard ECE from summed :func:`calibration_counts` statistics.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b| = sum_b |sum_correct_b - sum_conf_b| / N``

    Args:
        counts: ``(n_bins, 3)`` array (count, sum confidence, sum correct).

    Returns:
        ECE as a fraction in ``[0, 1]`` (not percent); NaN if no samples.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"counts must have shape (n_bins, 3), got {c.shape}")
    total = c[:, 0].sum()
    if total <= 0:
        return float("nan")
    return float(np.abs(c[:, 2] - c[:, 1]).sum() / total)


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


def _divide(num: np.ndarray, den: np.ndarray, zd: float) -> np.ndarray:
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


def classification_report(
    cm: Any,
    class_names: Sequence[str],
    zero_division: Union[float, str] = 0.0,
    topk_correct: Union[None, int, Mapping[int, int]] = None,
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
        topk_correct: optional number of samples whose true class is within
            the top-k predictions: an ``int`` (taken as top-5) or a mapping
            ``{k: count}``. Adds ``"topk_correct"`` and ``"top<k>_accuracy"``
            (count / total support) keys.

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

    precision = _divide(tp, pred_sum, zd)
    recall = _divide(tp, true_sum, zd)
    f1 = _divide(2.0 * tp, true_sum + pred_sum, zd)

    per_class = [
        {
            "class": names[i],
            "index": i,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(true_sum[i]),
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
        "precision": float(_divide(np.array([tp_all]), np.array([pred_all]), zd)[0]),
        "recall": float(_divide(np.array([tp_all]), np.array([true_all]), zd)[0]),
        "f1": float(_divide(np.array([2.0 * tp_all]), np.array([true_all + pred_all]), zd)[0]),
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
        "total_support": total,
    }

    if topk_correct is not None:
        mapping = {5: topk_correct} if isinstance(topk_correct, (int, np.integer)) else topk_correct
        report["topk_correct"] = {}
        for k, count in sorted((int(k), int(v)) for k, v in mapping.items()):
            if count < 0 or count > total:
                raise ValueError(f"topk_correct[{k}] = {count} is outside [0, {total}]")
            report["topk_correct"][str(k)] = count
            report[f"top{k}_accuracy"] = count / total if total else zd
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
    mapping = _as_int_labels(mapping, "fine_to_coarse", num_coarse)
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
