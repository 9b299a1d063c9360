"""Ingest throughput: iterating load_split(...) as torch batches vs a plain PyTorch DataLoader.

python benchmarks/ingest.py [--runs 5] [--batch-size 256] [--workers 2]

Both read the same prepared Parquet shards of the shared CIFAR-10 train split (45,000 uint8 32x32 images).
Ray Data is measured twice: streaming from Parquet (every epoch re-reads the files) and cached in the object
store (what the training job iterates from the second epoch on, data.cache=true). Prints images/s per run, the
medians, and the ratio streamed Ray Data / DataLoader measured in this run.
"""

import argparse
import glob
import os
import time

from _common import shared_cifar10_config, summary


def ray_data_epoch(ds, batch_size):
    start, n = time.perf_counter(), 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=4):
        n += len(batch["label"])
    return n / (time.perf_counter() - start), n


class ParquetImages:
    """A typical map-style torch Dataset over the prepared shards: one row per __getitem__."""

    def __init__(self, folder):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from resnet_ray.data.load import table_to_batch

        table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(os.path.join(folder, "*.parquet"))))
        batch = table_to_batch(table, 32)
        self.images, self.labels = batch["image"], batch["label"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        import torch

        return torch.from_numpy(self.images[i].copy()), int(self.labels[i])


def dataloader_epoch(folder, batch_size, workers):
    import torch

    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        ParquetImages(folder), batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=False
    )
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - start), n


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = p.parse_args()

    from resnet_ray.data.load import load_split, quiet_data_progress
    from resnet_ray.data.prepare import ensure_prepared
    from resnet_ray.runtime import init_ray

    cfg = shared_cifar10_config()
    prepared, meta = ensure_prepared(cfg.data)
    init_ray(local=True)
    quiet_data_progress()
    streamed = load_split(cfg.data, "train", prepared)
    cached = load_split(cfg.data, "train", prepared).materialize()  # what training iterates (data.cache)
    ray_data_epoch(streamed, args.batch_size)  # warm-up: worker processes, imports
    ray_runs, cached_runs, loader_runs = [], [], []
    for _ in range(args.runs):  # interleaved, so drift in machine load hits all alike
        rate, n = ray_data_epoch(streamed, args.batch_size)
        assert n == meta["counts"]["train"], n
        ray_runs.append(rate)
        rate, n = ray_data_epoch(cached, args.batch_size)
        assert n == meta["counts"]["train"], n
        cached_runs.append(rate)
        rate, n = dataloader_epoch(os.path.join(prepared, "train"), args.batch_size, args.workers)
        assert n == meta["counts"]["train"], n
        loader_runs.append(rate)
    print(f"shared CIFAR-10 train split: {meta['counts']['train']} images, batch {args.batch_size}")
    a = summary("Ray Data load_split -> iter_torch_batches", ray_runs)
    summary("  same, cached in the object store (data.cache)", cached_runs)
    b = summary(f"PyTorch DataLoader ({args.workers} workers, map-style)", loader_runs)
    ratios = [x / y for x, y in zip(ray_runs, loader_runs)]
    print(
        f"ratio Ray Data / DataLoader: median of per-run ratios {sorted(ratios)[len(ratios) // 2]:.2f} "
        f"(medians {a / b:.2f})"
    )


if __name__ == "__main__":
    main()
