"""Calibration maths (numpy only): the reliability statistics and ECE, the NLL, and temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks").

``calibration_counts`` gives ``(n_bins, 3)`` float64 statistics per batch and ``negative_log_likelihood`` a float
sum over rows: both add up over batches and actors; ``expected_calibration_error`` and ``calibration_bins`` are
derived once from the sums.

One temperature T > 0 divides the model's scores before the softmax; ``fit_temperature`` finds the T that
minimises the NLL on the validation split's scores (dividing by T never changes the ranking of the classes, so
top-1 and top-k stay the same), and ``fit_record`` is what the model's ``model.json`` keeps of the fit
(``temperature``, and the figures under ``calibration``). The Predictor then gives calibrated probabilities by
default (evaluation, prediction, serving). A model without a temperature (exported before, or a refit on
train+val, which has no validation split to fit on) has T = 1. ``evaluate.calibrate`` fits and stores it: the
training job calls it at the end of a run, ``jobs/calibrate.py`` for an existing model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from resnet_ray.metrics import int_labels, safe_divide


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
        raise ValueError(f"confidence and correct have different lengths: {conf.shape[0]} != {corr.shape[0]}")
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
    c = _check_counts(counts)
    total = c[:, 0].sum()
    if total <= 0:
        return float("nan")
    return float(np.abs(c[:, 2] - c[:, 1]).sum() / total)


def _check_counts(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"counts must have shape (n_bins, 3), got {c.shape}")
    return c


def calibration_bins(counts: Any) -> list[dict]:
    """The reliability diagram behind the ECE, one dict per bin of summed :func:`calibration_counts`.

    Returns:
        ``n_bins`` dicts ``{"low", "high", "count", "confidence", "accuracy"}``:
        the bin's confidence range, its number of samples, and the mean
        confidence and the accuracy of those samples (fractions; NaN for an
        empty bin).
    """
    c = _check_counts(counts)
    edges = _bin_edges(c.shape[0])
    mean_conf = safe_divide(c[:, 1], c[:, 0], math.nan)
    accuracy = safe_divide(c[:, 2], c[:, 0], math.nan)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "count": int(round(c[b, 0])),
            "confidence": float(mean_conf[b]),
            "accuracy": float(accuracy[b]),
        }
        for b in range(c.shape[0])
    ]


# --------------------------------------------------------------------------
# Likelihood and temperature scaling
# --------------------------------------------------------------------------
def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``(N, C)`` log-probabilities ``log softmax(logits / temperature)`` in float64, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Sum over rows of ``-log softmax(logits / temperature)[label]`` (nats): additive over batches; divide by
    the row count for the mean NLL (the cross-entropy)."""
    logp = log_softmax(logits, temperature)
    y = int_labels(labels, "labels", logp.shape[1])
    if y.shape[0] != logp.shape[0]:
        raise ValueError(f"logits and labels have different lengths: {logp.shape[0]} != {y.shape[0]}")
    return float(-logp[np.arange(len(y)), y].sum())


def fit_temperature(logits: Any, labels: Any, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T in ``[low, high]`` that minimises the mean NLL of ``softmax(logits / T)`` (Guo et al.
    2017): a bounded scalar search over log T. The NLL is convex in 1/T, so the search finds the global minimum.

    Args:
        logits: ``(N, C)`` held-out scores (the validation split's; never the test split's).
        labels: ``(N,)`` their true classes.

    Returns:
        T (> 1 softens over-confident probabilities, < 1 sharpens under-confident ones); 1.0 without rows.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {z.shape}")
    y = int_labels(labels, "labels", z.shape[1])
    if not len(y):
        return 1.0
    picked = z[np.arange(len(y)), y]

    def mean_nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        top = scaled.max(axis=1)
        lse = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float(np.mean(lse - picked / math.exp(log_t)))

    best = minimize_scalar(mean_nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(best.x))


SPLIT = "val"  # the split a temperature is fitted on: never test, which only evaluation touches
NO_VALIDATION = "a refit on train+val has no validation split to fit it on"
# fewer validation rows than this fit noise, not calibration (Guo et al. fit on 5,000): T stays 1, and says why
MIN_ROWS = 100


def fit_record(logits: np.ndarray, labels: np.ndarray, ece_bins: int, tta: str) -> dict:
    """Fit T on (logits, labels) and measure NLL and ECE on them before (T = 1) and after: model.json's
    ``calibration`` record. With fewer than MIN_ROWS rows nothing is fitted: T = 1 and the record says why."""
    n = len(labels)
    if n < MIN_ROWS:
        reason = f"only {n} {SPLIT} rows; a fit needs at least {MIN_ROWS}"
        return {"fitted": False, "temperature": 1.0, "reason": reason, "split": SPLIT, "rows": int(n), "tta": tta}
    temperature = fit_temperature(logits, labels)
    record = {"fitted": True, "temperature": temperature, "split": SPLIT, "rows": int(n), "tta": tta}
    for when, t in (("before", 1.0), ("after", temperature)):
        logp = log_softmax(logits, t)
        confidence = np.exp(logp.max(axis=1))
        counts = calibration_counts(confidence, logp.argmax(axis=1) == labels, ece_bins)
        record[f"nll_{when}"] = negative_log_likelihood(logits, labels, t) / max(n, 1)
        record[f"ece_{when}"] = expected_calibration_error(counts)
    return record
