"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def shared_cifar10_config(root: str | None = None, **values):
    """DataConfig values for the prepared copy of ../shared/data/cifar10 (exits if it is absent)."""
    from resnet_ray.config_files import load_config

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


def subset(out_dir: str, classes: range, per_class: dict, seed: int = 0) -> str:
    """A Parquet source folder (train.parquet, test.parquet, classes.json) with ``classes`` relabelled 0..k-1:
    per_class["train"] seeded-random training images of each class (None: all) and every test image."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = json.load(open(os.path.join(SHARED_CIFAR10, "classes.json")))
    names = names["label_names"] if isinstance(names, dict) else names
    for split in ("train", "test"):
        table = pq.read_table(os.path.join(SHARED_CIFAR10, f"{split}.parquet"))
        parts = []
        for new, label in enumerate(classes):
            rows = np.flatnonzero(pc.equal(table["label"], label).to_numpy(zero_copy_only=False))
            n = per_class.get(split)
            if n is not None:
                rows = rng.choice(rows, size=n, replace=False)
            part = table.take(pa.array(np.sort(rows)))
            parts.append(
                part.set_column(
                    part.column_names.index("label"), "label", pa.array(np.full(len(part), new, dtype=np.int64))
                )
            )
        pq.write_table(pa.concat_tables(parts), os.path.join(out_dir, f"{split}.parquet"))
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump([names[i] for i in classes], f)
    return out_dir
