"""The serving job's figures without Ray: each replica's window of requests, the windows summed, the report line
(requests, p50 / p99 latency, errors by status, batch sizes)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Window:
    """One replica's requests since its last push: the latencies (ms) of its /predict answers, the status of
    every answer, the sizes of the batches it ran."""

    latencies: list
    statuses: Counter
    batches: Counter

    @classmethod
    def empty(cls) -> Window:
        return cls([], Counter(), Counter())

    def take(self) -> Optional[dict]:
        if not self.statuses:
            return None
        part = {"latencies": self.latencies, "statuses": dict(self.statuses), "batches": dict(self.batches)}
        self.latencies, self.statuses, self.batches = [], Counter(), Counter()
        return part


def summarize(parts: list[dict]) -> dict:
    """Pushed windows -> {requests (all routes), errors (4xx and 5xx answers), statuses, p50_ms / p99_ms (of
    /predict), batches: {size: count}}."""
    latencies = [v for p in parts for v in p["latencies"]]
    statuses, batches = Counter(), Counter()
    for p in parts:
        statuses.update({int(k): v for k, v in p["statuses"].items()})
        batches.update({int(k): v for k, v in p["batches"].items()})
    p50, p99 = np.percentile(latencies, [50, 99]).tolist() if latencies else (None, None)
    return {
        "requests": sum(statuses.values()),
        "errors": sum(v for k, v in statuses.items() if k >= 400),
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": p50,
        "p99_ms": p99,
        "batches": dict(sorted(batches.items())),
    }


def report_line(stats: dict, seconds: float) -> str:
    """One line of the job's log: requests, p50/p99 latency, errors, batch sizes."""
    n = stats["requests"]
    line = f"{n} requests in {seconds:.0f} s ({n / seconds:.3g}/s)" if seconds > 0 else f"{n} requests"
    if stats["p50_ms"] is not None:
        line += f", p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms"
    errors = {k: v for k, v in stats["statuses"].items() if k >= 400}
    line += f", {stats['errors']} errors" + (
        " (" + ", ".join(f"{v} x {k}" for k, v in errors.items()) + ")" if errors else ""
    )
    if stats["batches"]:
        sizes = stats["batches"]
        images = sum(k * v for k, v in sizes.items())
        line += f", batches of {min(sizes)}-{max(sizes)} (mean {images / sum(sizes.values()):.1f})"
    return line
