"""ResNet-20 of He et al. 2016 on real CIFAR-10 on this CPU: test accuracy after a short schedule, beside the paper's.

python benchmarks/resnet20.py [--epochs 20] [--seed 0] [--runs DIR] [--out benchmarks/results/resnet20.json]

The product's training job (jobs/train.py's fit) on the shared CIFAR-10 copy (a Parquet source, prepared once:
the 45k/5k stratified train/val split of the paper, the official 10,000 test images) with
configs/cifar10-resnet-cpu.yaml (the paper's recipe, sec. 4.2: SGD lr 0.1, momentum 0.9, weight decay 1e-4,
batch 128, 4-px pad + crop + flip, option A shortcuts, He init; here a ~200-step linear warm-up and a cosine decay
over --epochs instead of 182 epochs with steps), one worker holding both cores. The best epoch by validation
top-1 is exported and evaluated on the test split by the product's evaluation job.
Prints the history per epoch, the test accuracy and error beside the paper's (91.25% / 8.75%, Table 6: 64k
iterations on all 50k training images), and the wall time; writes them to --out (JSON).
The run has a fixed name (resnet20-cpu-<epochs>ep-seed<seed> under --runs): a rerun of the same command after a
kill resumes it from its last checkpointed epoch (the training job's own --resume), it does not start over.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time

from _common import ROOT, SHARED_CIFAR10

PAPER_TEST_ACCURACY = 91.25  # He et al. 2016a (arXiv 1512.03385), Table 6, ResNet-20: 8.75% test error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="at most 30 (the CPU recipe's default: 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=os.path.expanduser("~/resnet_ray_runs"), help="train.storage_path")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "resnet20.json"))
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        raise SystemExit(f"{SHARED_CIFAR10} not found: this benchmark reads the shared CIFAR-10 copy")

    from resnet_ray.config_files import load_config
    from resnet_ray.data.load import quiet_data_progress
    from resnet_ray.run_folder import config_for_resume
    from resnet_ray.runtime import init_ray
    from resnet_ray.train import fit

    name = f"resnet20-cpu-{args.epochs}ep-seed{args.seed}"
    run_dir = os.path.join(args.runs, name)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        print(f"resuming {run_dir} from its last checkpoint", flush=True)
        cfg = config_for_resume(run_dir)
    else:
        cfg = load_config(
            os.path.join(ROOT, "configs", "cifar10-resnet-cpu.yaml"),
            {
                "data.source": "parquet",
                "data.path": os.path.abspath(SHARED_CIFAR10),
                "data.name": "cifar10-shared",
                "train.epochs": args.epochs,
                "train.seed": args.seed,
                "train.storage_path": args.runs,
                "train.name": name,
            },
        )
    print(f"if stopped, `{command}` continues this run", flush=True)
    init_ray(local=True)
    quiet_data_progress()
    start = time.perf_counter()
    result = fit(cfg)
    minutes = (time.perf_counter() - start) / 60
    print(f"{'epoch':>5} {'train err %':>11} {'val err %':>9} {'lr':>9} {'img/s':>7}")
    for h in result.history:
        print(
            f"{h['epoch']:>5} {100 * (1 - h['train_acc']):>11.2f} {100 * (1 - h['val_top1']):>9.2f} "
            f"{h['lr']:>9.2e} {h['images_per_s']:>7.0f}"
        )
    accuracy = 100 * result.evaluation["report"]["accuracy"]
    print(
        f"ResNet-20, {args.epochs} epochs on 45,000 images, best epoch {result.best['epoch']} by validation: "
        f"test accuracy {accuracy:.2f}% (error {100 - accuracy:.2f}%) on 10,000 images; paper {PAPER_TEST_ACCURACY}% "
        f"(error {100 - PAPER_TEST_ACCURACY:.2f}%, He et al. 2016a Table 6, 182 epochs on 50,000 images); "
        f"{minutes:.1f} min of this invocation; run {result.run_dir}"
    )
    figures = {
        "test_accuracy": accuracy,
        "paper_test_accuracy": PAPER_TEST_ACCURACY,
        "epochs": args.epochs,
        "best_epoch": result.best["epoch"],
        # the epochs' own training + validation times (a resumed run's earlier epochs included)
        "train_wall_s": sum(h["epoch_s"] + h["val_s"] for h in result.history),
        "median_epoch_s": statistics.median(h["epoch_s"] + h["val_s"] for h in result.history),
        "median_images_per_s": statistics.median(h["images_per_s"] for h in result.history),
        "wall_s_this_invocation": minutes * 60,
        "command": command,
        "run": result.run_dir.replace(os.path.expanduser("~"), "~", 1),  # no machine's home in the figures
        "history": result.history,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
