"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def shared_cifar10_config(root: str | None = None, **values):
    """DataConfig values for the prepared copy of ../shared/data/cifar10 (exits if it is absent)."""
    from resnet_ray.config import load_config

    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        sys.exit(f"{SHARED_CIFAR10} not found: these benchmarks read the shared CIFAR-10 copy")
    base = {"data.source": "parquet", "data.path": os.path.abspath(SHARED_CIFAR10), "data.name": "cifar10-shared"}
    if root:
        base["data.root"] = root
    return load_config(None, {**base, **values})


def summary(name: str, values: list[float], unit: str = "img/s") -> float:
    med = statistics.median(values)
    print(f"{name:<48} median {med:10.1f} {unit}   runs: {', '.join(f'{v:.1f}' for v in values)}", flush=True)
    return med
