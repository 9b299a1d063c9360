"""Transfer learning on real images, on this CPU: does fine-tuning from pretrained weights beat random init?

python benchmarks/transfer.py [--runs 3] [--pretrain-per-class 1000] [--finetune-per-class 50]

1. The shared CIFAR-10 copy is split by class: A = classes 0-4 (airplane .. deer) for pretraining, B = classes
   5-9 (dog .. truck) as the target task with few labelled images.
2. A ResNet-18 at 32 px is pretrained on A's images with the product's training job (2 CPU DDP workers) and
   exported (model/model.pt).
3. The target task is fine-tuned from those weights (``model.weights: <model.pt>``: the product's weight loading,
   new head) and, with the same config and seed, from random init; both are evaluated by the product's
   evaluation job on all 5,000 B test images. Repeated with --runs seeds (the pretraining is done once).
Prints every run's two test accuracies, their medians and the median of the per-run differences.
"""

import argparse
import os
import statistics
import tempfile

from _common import SHARED_CIFAR10, subset

A, B = range(0, 5), range(5, 10)


def train(source: str, name: str, root: str, weights: str, epochs: int, seed: int) -> dict:
    """The product's training job (2 CPU workers, ResNet-18 at 32 px) then its evaluation on the test split."""
    from resnet_ray.config_files import load_config
    from resnet_ray.train import fit

    cfg = load_config(
        None,
        {
            "data.source": "parquet",
            "data.path": source,
            "data.name": os.path.basename(source),
            "data.root": root,
            "model.arch": "resnet18",
            "model.weights": weights,
            "model.image_size": 32,
            "optim.name": "adamw",
            "optim.lr": 0.002,
            "optim.weight_decay": 0.05,
            "optim.warmup_epochs": 1,
            "optim.label_smoothing": 0.1,
            "optim.reference_batch_size": 64,
            "train.epochs": epochs,
            "train.batch_size": 32,
            "train.seed": seed,
            "train.storage_path": os.path.join(root, "runs"),
            "train.name": name,
            "train.keep_checkpoints": 1,
            "scaling.num_workers": 2,
            "eval.num_actors": 1,
        },
    )
    result = fit(cfg)
    return {"accuracy": result.evaluation["report"]["accuracy"], "model": os.path.join(result.model_dir, "model.pt")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pretrain-per-class", type=int, default=1000)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--finetune-per-class", type=int, default=50)
    p.add_argument("--finetune-epochs", type=int, default=30)
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        raise SystemExit(f"{SHARED_CIFAR10} not found: this benchmark reads the shared CIFAR-10 copy")

    from resnet_ray.runtime import init_ray

    init_ray(local=True)
    with tempfile.TemporaryDirectory(prefix="resnet_ray-transfer-") as root:
        # the sources beside data.root's prepared datasets, not under them
        source_a = subset(os.path.join(root, "sources", "transfer-a"), A, {"train": args.pretrain_per_class})
        source_b = subset(os.path.join(root, "sources", "transfer-b"), B, {"train": args.finetune_per_class})
        pretrained = train(source_a, "pretrain", root, "none", args.pretrain_epochs, 0)
        print(f"pretrained on classes {A.start}-{A.stop - 1}: test top-1 {pretrained['accuracy']:.4f}", flush=True)
        tuned, scratch = [], []
        for seed in range(args.runs):
            tuned.append(
                train(source_b, f"finetune-{seed}", root, pretrained["model"], args.finetune_epochs, seed)["accuracy"]
            )
            scratch.append(train(source_b, f"scratch-{seed}", root, "none", args.finetune_epochs, seed)["accuracy"])
            print(f"  run {seed}: fine-tuned {tuned[-1]:.4f}, random init {scratch[-1]:.4f}", flush=True)
    print(
        f"target: classes {B.start}-{B.stop - 1}, {args.finetune_per_class} training images per class "
        f"(10% of them for validation), {args.finetune_epochs} epochs; test: all their test images"
    )
    for name, values in (("fine-tuned from the pretrained ResNet-18", tuned), ("the same from random init", scratch)):
        print(
            f"{name:<48} median top-1 {statistics.median(values):.4f}   runs: " + ", ".join(f"{v:.4f}" for v in values)
        )
    print(
        f"median difference (fine-tuned - random init): {statistics.median(t - s for t, s in zip(tuned, scratch)):+.4f}"
    )


if __name__ == "__main__":
    main()
