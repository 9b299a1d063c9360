"""The degradation problem of He et al. 2016 (arXiv 1512.03385, sec. 4.2, Figure 6) on real images, on this CPU.

python benchmarks/degradation.py [--seeds 3] [--per-class 500] [--epochs 8] [--depths 20,56] [--out DIR]

Plain-20, plain-56, ResNet-20 and ResNet-56 (option A shortcuts; a plain net is the same stack without them) are
trained under one short recipe on a stratified subset of the shared CIFAR-10 copy (--per-class training images of
every class, 10% of them carved for validation; all 10,000 test images, or --test-per-class of each class),
through the product's own jobs: the search of configs/tune-degradation.yaml (a grid over depth x shortcut, every
cell once, no early stopping) shrunk to --depths, then the evaluation job on each net's exported model. Once per
seed (train.seed).
Prints the final training error (the last epoch's, measured on the fly with augmentation as in the paper's
Figure 6) and the test error of every net per seed with medians, the paper's figures beside them, and the three
claims with a yes/no each; writes <out>/degradation.png (median curves over the seeds, training error dashed,
validation error solid: the picture of Figure 6) and <out>/degradation.json (every figure).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

from _common import ROOT, SHARED_CIFAR10, subset

# He et al. 2016a, Table 6: test error (%) on CIFAR-10 after 64k iterations on 50k images (the plain nets have no
# published table; Figure 6 shows plain-56's training and test error above plain-20's throughout)
PAPER_TEST_ERROR = {"resnet-20": 8.75, "resnet-32": 7.51, "resnet-44": 7.17, "resnet-56": 6.97, "resnet-110": 6.43}


def net_name(params: dict) -> str:
    depth = params["model.arch"].removeprefix("resnet")
    return f"{'plain' if params['model.shortcut'] == 'none' else 'resnet'}-{depth}"


def search_config(source: str, root: str, seed: int, args):
    from resnet_ray.config_files import load_config

    steps_per_epoch = int(args.per_class * 10 * 0.9) // 128
    return load_config(
        os.path.join(ROOT, "configs", "tune-degradation.yaml"),
        {
            "data.source": "parquet",
            "data.path": source,
            "data.name": os.path.basename(source),
            "data.root": root,
            "train.seed": seed,
            "optim.warmup_epochs": round(args.warmup_steps / steps_per_epoch, 3),
            "tune.name": f"degradation-seed{seed}",
            "tune.storage_path": root,
            "tune.max_epochs": args.epochs,
            "tune.search_space.model.arch": {
                "type": "grid",
                "values": [f"resnet{d}" for d in args.depths],
            },
        },
    )


def run_seed(source: str, root: str, seed: int, args) -> list[dict]:
    """One search (every net of the grid) and the test evaluation of each net's exported model."""
    from resnet_ray.evaluate import evaluate
    from resnet_ray.tune import TRIALS_FOLDER, search, trial_config

    cfg = search_config(source, root, seed, args)
    start = time.perf_counter()
    result = search(cfg)
    nets = []
    for row in result.trials:
        if row is result.best:  # the search evaluated the best trial's model on test already
            report = result.evaluation["report"]
        else:
            trial = trial_config(cfg, row["params"], row["trial_id"], result.experiment_dir)
            model = os.path.join(result.experiment_dir, TRIALS_FOLDER, row["trial_id"], "model")
            output = os.path.join(root, f"eval-{row['trial_id']}")
            report = evaluate(trial, model, split="test", output=output)["report"]
        last = max(row["history"], key=lambda h: h["epoch"])
        nets.append(
            {
                "net": net_name(row["params"]),
                "seed": seed,
                "train_error": 100 * (1 - last["train_acc"]),
                "val_error": 100 * (1 - last["val_top1"]),
                "test_error": 100 * (1 - report["accuracy"]),
                "curve": [
                    {"epoch": h["epoch"], "train_error": 1 - h["train_acc"], "val_error": 1 - h["val_top1"]}
                    for h in sorted(row["history"], key=lambda h: h["epoch"])
                ],
            }
        )
        print(
            f"  seed {seed} {nets[-1]['net']:<10} train error {nets[-1]['train_error']:5.1f}%  "
            f"test error {nets[-1]['test_error']:5.1f}%",
            flush=True,
        )
    shutil.copy(result.curves_path, os.path.join(args.out, f"curves-seed{seed}.png"))
    print(f"  seed {seed}: {len(nets)} nets in {time.perf_counter() - start:.0f} s", flush=True)
    return nets


def write_json(out: str, figures: dict):
    """degradation.json, written to a temporary name and renamed: a kill never leaves half a file."""
    path = os.path.join(out, "degradation.json")
    with open(path + ".tmp", "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(path + ".tmp", path)


def median_curves(nets: list[dict]) -> list[dict]:
    curves = []
    for name in sorted({n["net"] for n in nets}):
        runs = [n["curve"] for n in nets if n["net"] == name]
        epochs = [point["epoch"] for point in runs[0]]
        curves.append(
            {
                "label": f"{name} (median of {len(runs)} seeds)",
                "epoch": epochs,
                "train_error": [statistics.median(r[i]["train_error"] for r in runs) for i in range(len(epochs))],
                "val_error": [statistics.median(r[i]["val_error"] for r in runs) for i in range(len(epochs))],
            }
        )
    return curves


def claims(nets: list[dict], seeds: list[int], shallow: str, deep: str) -> list[tuple[str, bool]]:
    """The paper's three claims, each checked in every seed, on the final training error."""

    def err(net, seed, key="train_error"):
        return next(n[key] for n in nets if n["net"] == net and n["seed"] == seed)

    plain_s, plain_d, res_s, res_d = f"plain-{shallow}", f"plain-{deep}", f"resnet-{shallow}", f"resnet-{deep}"
    return [
        (
            f"degradation: the training error of {plain_d} is above that of {plain_s} in every seed",
            all(err(plain_d, s) > err(plain_s, s) for s in seeds),
        ),
        (
            f"residual learning: {res_d}'s training error is below {plain_d}'s in every seed",
            all(err(res_d, s) < err(plain_d, s) for s in seeds),
        ),
        (
            f"deeper is better with shortcuts: {res_d}'s test error is below {res_s}'s in every seed "
            "(Table 6: 6.97% vs 8.75%)",
            all(err(res_d, s, "test_error") < err(res_s, s, "test_error") for s in seeds),
        ),
    ]


RECIPE = ("per_class", "test_per_class", "epochs", "warmup_steps", "depths")


def kept_nets(args) -> list[dict]:
    """The nets of every seed that <out>/degradation.json already holds in full, so that a rerun continues."""
    path = os.path.join(args.out, "degradation.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    if any(earlier["args"][k] != getattr(args, k) for k in RECIPE):
        used = " ".join(f"--{k.replace('_', '-')} {earlier['args'][k]}" for k in RECIPE)
        raise SystemExit(f"{path} holds runs of another recipe ({used}): pass those, or another --out")
    complete = {
        seed for seed in range(args.seeds) if sum(n["seed"] == seed for n in earlier["nets"]) == 2 * len(args.depths)
    }
    print(f"kept from {path}: seeds {sorted(complete) or 'none'}", flush=True)
    return [n for n in earlier["nets"] if n["seed"] in complete]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=500, help="training images per class (10%% of them: val)")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all 1,000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up (steps of batch 128)")
    p.add_argument("--depths", default="20,56", help="two depths: the shallow and the deep net")
    p.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results"),
        help="where the PNG and JSON go; the seeds that its degradation.json holds (same recipe) are kept",
    )
    args = p.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    kept = kept_nets(args)
    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        raise SystemExit(f"{SHARED_CIFAR10} not found: this benchmark reads the shared CIFAR-10 copy")
    os.makedirs(args.out, exist_ok=True)

    from resnet_ray.data.load import quiet_data_progress
    from resnet_ray.plots import write_search_curves
    from resnet_ray.runtime import init_ray

    init_ray(local=True, num_cpus=3)  # a trial: its driver (1 CPU) and one worker of 2 CPUs (both cores)
    quiet_data_progress()
    seeds = list(range(args.seeds))
    continue_command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    with tempfile.TemporaryDirectory(prefix="resnet_ray-degradation-") as root:
        per_class = {"train": args.per_class, "test": args.test_per_class}
        source = subset(os.path.join(root, "sources", "cifar10-subset"), range(10), per_class)
        nets = kept
        for seed in seeds:  # each seed's figures kept as soon as they are measured
            if any(n["seed"] == seed for n in kept):
                continue
            print(f"seed {seed}: if stopped, `{continue_command}` continues from the next unfinished seed", flush=True)
            nets += run_seed(source, root, seed, args)
            write_json(args.out, {"args": vars(args), "nets": nets})

    shallow, deep = args.depths[0], args.depths[-1]
    print(
        f"\n{args.per_class * 10} CIFAR-10 training images (10% for validation), {args.epochs} epochs, batch 128, "
        f"SGD lr 0.1 momentum 0.9 wd 1e-4, {args.warmup_steps}-step warm-up then cosine; test: "
        f"{10 * (args.test_per_class or 1000):,} images; "
        f"seeds {seeds}"
    )
    print(f"{'net':<10} {'train error % (median; runs)':<34} {'test error % (median; runs)':<34} paper test error %")
    for name in (f"plain-{shallow}", f"plain-{deep}", f"resnet-{shallow}", f"resnet-{deep}"):
        rows = [n for n in nets if n["net"] == name]
        cells = []
        for key in ("train_error", "test_error"):
            values = [r[key] for r in rows]
            cells.append(f"{statistics.median(values):5.1f}; " + ", ".join(f"{v:.1f}" for v in values))
        paper = PAPER_TEST_ERROR.get(name)
        print(f"{name:<10} {cells[0]:<34} {cells[1]:<34} {paper if paper else 'figure only (Fig. 6)'}")
    print("paper: He et al. 2016a (arXiv 1512.03385), Table 6 and Figure 6: 64k iterations on all 50k images")
    checked = claims(nets, seeds, shallow, deep)
    for text, holds in checked:
        print(f"{'yes' if holds else 'no '}  {text}")
    picture = write_search_curves(median_curves(nets), os.path.join(args.out, "degradation.png"))
    write_json(args.out, {"args": vars(args), "nets": nets, "claims": checked})
    print(f"picture: {picture}; figures: {os.path.join(args.out, 'degradation.json')}")


if __name__ == "__main__":
    main()
