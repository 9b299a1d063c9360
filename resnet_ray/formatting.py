"""Numbers, intervals and report identities as text, and JSON-safe values: shared by the report files, the
figures and the terminal tables."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

AVERAGES = ("macro avg", "weighted avg", "micro avg")  # the average rows of a classification report


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


def identity(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def per_class_cells(row: dict) -> list[str]:
    """A per-class report row as text cells: index, class, precision, its interval, recall, its interval, F1,
    support (the terminal table's and report.md's columns)."""
    return [
        fmt(row["index"]),
        str(row["class"]),
        fmt(row["precision"]),
        fmt_ci(row.get("precision_ci")),
        fmt(row["recall"]),
        fmt_ci(row.get("recall_ci")),
        fmt(row["f1"]),
        fmt(row["support"]),
    ]
