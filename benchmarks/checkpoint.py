"""Per-epoch report + checkpoint time of the local mode, before and after checkpoints left the critical path.

python benchmarks/checkpoint.py [--runs 3] [--epochs 4]

Runs configs/local.yaml (ResNet-50, 2 CPU DDP workers, digits) shrunk to --epochs, without the test evaluation,
alternating (a) a synchronous checkpoint every epoch (the first build's behaviour: --train.checkpoint_every 1
--train.async_checkpoint false) and (b) the defaults (background upload; about ten checkpoints per run, which
is every epoch for runs of up to ten epochs). Prints each run's median `report_s` (rank 0's time in
ray.train.report per epoch, writing the checkpoint included) and the medians of the runs.
"""

import argparse
import statistics
import tempfile

from _common import ROOT, summary


def run(settings: dict, epochs: int, storage: str, name: str) -> float:
    import os

    from resnet_ray.config_files import load_config
    from resnet_ray.train import fit

    cfg = load_config(
        os.path.join(ROOT, "configs", "local.yaml"),
        {
            "train.epochs": epochs,
            "train.evaluate_test": False,
            "train.storage_path": storage,
            "train.name": name,
            **settings,
        },
    )
    history = fit(cfg).history
    report = [h["report_s"] for h in history]
    print(f"  {name}: report_s per epoch {', '.join(f'{r:.2f}' for r in report)}", flush=True)
    return statistics.median(report)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()

    from resnet_ray.data.load import quiet_data_progress
    from resnet_ray.runtime import init_ray

    init_ray(local=True)
    quiet_data_progress()
    before, after = [], []
    with tempfile.TemporaryDirectory(prefix="resnet_ray-bench-") as storage:
        for i in range(args.runs):  # interleaved so that drift in machine load hits both alike
            before.append(
                run({"train.checkpoint_every": 1, "train.async_checkpoint": False}, args.epochs, storage, f"sync-{i}")
            )
            after.append(run({}, args.epochs, storage, f"async-{i}"))
    print(f"local mode (ResNet-50, 2 CPU workers), {args.epochs} epochs, checkpoint every epoch in both")
    a = summary("(a) synchronous checkpoint every epoch", before, "s/epoch")
    b = summary("(b) defaults: background upload", after, "s/epoch")
    print(f"ratio b/a of the medians: {b / a:.2f}")


if __name__ == "__main__":
    main()
