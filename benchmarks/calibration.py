"""Calibration and flip test-time augmentation on real images, through the product's jobs.

python benchmarks/calibration.py [--train-per-class 1000] [--test-per-class 1000] [--epochs 10] [--arch resnet20]

1. A CIFAR ResNet at 32 px is trained on --train-per-class images of each class of the shared CIFAR-10 copy (2 CPU
   DDP workers, no label smoothing: it would calibrate on its own) with the product's training job, which ends
   by fitting the temperature on the validation split (10% of those images) and evaluating the test split
   (--test-per-class images of each class).
2. The same model is evaluated on the same test rows with eval.tta flip; jobs/compare.py's McNemar test pairs the
   two evaluations (--allow-tta).
Prints the test ECE (15 bins) and NLL before and after temperature scaling beside Guo et al. 2017's (Table 1,
ResNet-110: CIFAR-10 4.60% -> 0.83%, CIFAR-100 16.53% -> 1.26%), flip-TTA's accuracy change with its McNemar
p-value, and each evaluation's wall time and images/s. Top-1 is the same before and after calibration (checked).
"""

import argparse
import os
import tempfile

from _common import SHARED_CIFAR10, subset

GUO = {"CIFAR-10": (4.60, 0.83), "CIFAR-100": (16.53, 1.26)}  # ResNet-110, ECE % before -> after, 15 bins


def config(source: str, root: str, args):
    from resnet_ray.config_files import load_config

    return load_config(
        None,
        {
            "data.source": "parquet",
            "data.path": source,
            "data.name": os.path.basename(source),
            "data.root": root,
            "model.arch": args.arch,
            "model.weights": "none",
            "model.image_size": 32,
            "optim.name": "adamw",
            "optim.lr": 0.002,
            "optim.weight_decay": 0.05,
            "optim.warmup_epochs": 1,
            "optim.reference_batch_size": 64,
            "train.epochs": args.epochs,
            "train.batch_size": 32,
            "train.storage_path": os.path.join(root, "runs"),
            "train.name": "calibration",
            "train.keep_checkpoints": 1,
            "scaling.num_workers": 2,
            "eval.num_actors": 1,
        },
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--arch", default="resnet20")
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        raise SystemExit(f"{SHARED_CIFAR10} not found: this benchmark reads the shared CIFAR-10 copy")

    import pyarrow.parquet as pq

    from resnet_ray.compare import compare_folders
    from resnet_ray.config_files import replace
    from resnet_ray.evaluate import collect_logits, evaluate
    from resnet_ray.runtime import init_ray
    from resnet_ray.train import fit

    init_ray(local=True)
    with tempfile.TemporaryDirectory(prefix="resnet_ray-calibration-") as root:
        per_class = {"train": args.train_per_class, "test": args.test_per_class}
        source = subset(os.path.join(root, "sources", "cifar10-calibration"), range(10), per_class)
        cfg = config(source, root, args)
        run = fit(cfg)
        plain = run.evaluation
        flip = evaluate(replace(cfg, {"eval.tta": "flip"}), run.model_dir, "test", os.path.join(root, "eval-flip"))
        gain = compare_folders(plain["output"], flip["output"], allow_tta=True)
        # top-1 before calibration: the raw scores of the same rows (one more inference of the test split)
        logits, _ = collect_logits(cfg, run.model_dir, "test")
        calibrated = pq.read_table(os.path.join(plain["output"], "predictions.parquet")).sort_by("row_id")
        top1_same = bool((logits.argmax(1) == calibrated.column("pred").to_numpy()).all())
        calibration, fitted = plain["report"]["calibration"], run.calibration

    rows = plain["report"]["rows"]
    print(
        f"\n{args.arch} at 32 px, {args.epochs} epochs on {10 * args.train_per_class} CIFAR-10 images "
        f"(shared JPEG-derived copy; {fitted['rows']} of them for validation); test: {rows} images"
    )
    print(
        f"temperature fitted on val: T = {fitted['temperature']:.3f} (val NLL {fitted['nll_before']:.4f} -> "
        f"{fitted['nll_after']:.4f}, ECE {100 * fitted['ece_before']:.2f}% -> {100 * fitted['ece_after']:.2f}%)"
    )
    print(f"{'test, 15 bins':<40}{'ECE before':>12}{'ECE after':>12}{'NLL before':>12}{'NLL after':>12}")
    before, after = calibration["before"], calibration["after"]
    print(
        f"{'ours (' + args.arch + ', CIFAR-10)':<40}{100 * before['ece']:>11.2f}%{100 * after['ece']:>11.2f}%"
        f"{before['nll']:>12.4f}{after['nll']:>12.4f}"
    )
    for name, (b, a) in GUO.items():
        print(f"{'Guo et al. 2017, ResNet-110, ' + name:<40}{b:>11.2f}%{a:>11.2f}%{'':>12}{'':>12}")
    print(f"top-1 accuracy {plain['report']['accuracy']:.4f}, the same before and after calibration: {top1_same}")
    print(
        f"flip TTA: accuracy {plain['report']['accuracy']:.4f} -> {flip['report']['accuracy']:.4f} "
        f"({100 * gain['accuracy']['difference']:+.2f} points; rows only plain gets right {gain['pairs']['a_only']}, "
        f"only TTA {gain['pairs']['b_only']}; McNemar p = {gain['p_value']:.3g}); TTA ECE "
        f"{100 * flip['report']['calibration']['after']['ece']:.2f}% at the same T"
    )
    print(
        f"evaluation of {rows} test images: plain {plain['seconds']:.1f} s ({plain['images_per_s']:.0f} img/s), "
        f"flip TTA {flip['seconds']:.1f} s ({flip['images_per_s']:.0f} img/s): "
        f"{flip['seconds'] / plain['seconds']:.2f}x the time"
    )


if __name__ == "__main__":
    main()
