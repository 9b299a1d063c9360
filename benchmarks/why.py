"""Why ResNet works, on real CIFAR-10 images: the signal at initialization and the lesion study, beside the papers.

python benchmarks/why.py [--model RUN ...] [--rows 128] [--draws 5] [--out benchmarks/results]

1. The signal at initialization (jobs/init_stats.py's default nets: plain-56 without BN under Xavier and He init,
   plain-56 with BN, ResNet-56) on the first --rows training images of the shared CIFAR-10 copy. Printed beside He
   et al. 2015 (arXiv 1502.01852, sec. 2.2): with ReLU, Xavier init halves the signal's variance at every layer,
   so its std falls by 2^(L/2) over L layers, and He init keeps it; and beside Philipp et al. 2018 / Yang et al.
   2019: a deep plain net with BN explodes towards the input, shortcuts tame it.
2. For each --model (a trained run or model folder; default: benchmarks/resnet20.py's 30-epoch run): the lesion
   study on all 10,000 test images (jobs/lesion.py) beside Veit, Wilber & Belongie 2016 (arXiv 1605.06431, ResNet-110,
   Figs. 3 and 5a): removing one block barely matters except for the downsampling blocks, and the error grows
   smoothly with the number k of blocks removed. With several CIFAR nets, their layer responses beside He et al.
   2016a's Fig. 7: residual nets respond less than plain ones, deeper residual nets less than shallower ones.
Writes <out>/why.json and the PNGs (signal.png, lesion-<arch>.png, responses.png).
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile

from _common import ROOT, SHARED_CIFAR10, shared_cifar10_config

RESNET20_RUN = os.path.expanduser("~/resnet_ray_runs/resnet20-cpu-30ep-seed0")


def signal(args, out: str) -> dict:
    from resnet_ray.init_stats import DEFAULT_NETS, init_signal

    cfg = shared_cifar10_config(**{"model.image_size": 32})
    with tempfile.TemporaryDirectory() as tmp:
        result = init_signal(cfg, list(DEFAULT_NETS), tmp, rows=args.rows)
        shutil.copy(os.path.join(tmp, "signal.png"), os.path.join(out, "signal.png"))
    print(f"\n1. The signal at initialization ({result['batch']}), first layer / last layer:")
    print(f"{'net':<24} {'activation grad':>16} {'weight grad':>12} {'output std':>11}")
    for net in result["nets"]:
        rows = [r for r in result["rows"] if r["net"] == net["net"]]
        std = rows[0]["activation_std"] / rows[-1]["activation_std"]
        net["activation_std_first_last"] = std
        print(
            f"{net['net']:<24} {net['activation_grad_first_last']:>16.3g} {net['weight_grad_first_last']:>12.3g} "
            f"{std:>11.3g}"
        )
    xavier = next(n for n in result["nets"] if "xavier" in n["net"])
    layers = xavier["layers"]
    print(
        f"He et al. 2015, sec. 2.2: under Xavier init with ReLU the output std falls by 2^({layers - 1}/2) = "
        f"{2 ** ((layers - 1) / 2):.3g} over {layers} layers; here the first layer's output std is "
        f"{xavier['activation_std_first_last']:.3g} times the last's"
    )
    return {"batch": result["batch"], "nets": result["nets"]}


def lesion(model: str, args, out: str) -> dict:
    from resnet_ray.lesion_study import lesion_study
    from resnet_ray.saved_model import SavedModel

    cfg = SavedModel.read(model).config()
    with tempfile.TemporaryDirectory() as tmp:
        study = lesion_study(cfg, model, output=tmp, draws=args.draws)
        shutil.copy(os.path.join(tmp, "lesion.png"), os.path.join(out, f"lesion-{study['arch']}.png"))
    base = study["baseline_accuracy"]
    print(
        f"\n2. Lesion study of {study['arch']} ({model}) on {study['rows']:,} test images: accuracy {100 * base:.2f}%"
    )
    for row in study["blocks"]:
        kind = "downsampling" if row["downsampling"] else ""
        if row["accuracy"] is None:
            print(f"  without {row['block']:<10} cannot be removed (a plain net's downsampling block)")
        else:
            drop = 100 * (row["accuracy"] - base)
            print(f"  without {row['block']:<10} {100 * row['accuracy']:6.2f}%  ({drop:+6.2f}) {kind}")
    for row in study["random_k"]:
        mean, std = 100 * row["mean"], 100 * row["std"]
        print(f"  without {row['k']} random blocks: {mean:6.2f}% +- {std:.2f} ({row['draws']} draws)")
    removable = [r for r in study["blocks"] if r["accuracy"] is not None]
    down = [base - r["accuracy"] for r in removable if r["downsampling"]]
    others = [base - r["accuracy"] for r in removable if not r["downsampling"]]
    means = [r["mean"] for r in study["random_k"]]
    claims = []
    if down and others:
        claims.append(
            (
                "Veit Fig. 3: a downsampling block costs more than any other single block",
                min(down) > max(others),
            )
        )
    claims.append(
        (
            "Veit Fig. 5a: the accuracy falls smoothly as k blocks are removed (mean never rises with k)",
            all(b <= a + 1e-9 for a, b in zip(means, means[1:])),
        )
    )
    claims.append(
        (
            f"Veit Fig. 3 (ResNet-110): one non-downsampling block removed costs little; here the median drop is "
            f"{100 * statistics.median(others):.2f} points, the largest {100 * max(others):.2f}",
            None,
        )
        if others
        else ("no removable non-downsampling block", None)
    )
    for text, holds in claims:
        print(f"  {'   ' if holds is None else ('yes' if holds else 'no ')}  {text}")
    return {**study, "claims": claims}


def responses(studies: list, out: str) -> None:
    from resnet_ray.plots import write_responses_plot

    nets = [{"net": s["arch"], "responses": s["responses"]} for s in studies if s.get("responses")]
    if len(nets) < 2:
        return
    write_responses_plot(nets, os.path.join(out, "responses.png"))
    print("\n3. Layer responses (std of each 3x3 layer's response), mean over layers; He et al. 2016a Fig. 7:")
    for net in nets:
        print(f"  {net['net']:<12} {statistics.mean(r['std'] for r in net['responses']):.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a trained run or model folder (repeat); default: resnet20.py's")
    p.add_argument("--rows", type=int, default=128, help="images of the signal batch")
    p.add_argument("--draws", type=int, default=5, help="random draws of k removed blocks per k")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED_CIFAR10, "train.parquet")):
        raise SystemExit(f"{SHARED_CIFAR10} not found: this benchmark reads the shared CIFAR-10 copy")
    models = args.model or [RESNET20_RUN]
    for model in models:
        if not os.path.exists(model):
            raise SystemExit(f"--model {model}: not found (train it first: python benchmarks/resnet20.py)")
    os.makedirs(args.out, exist_ok=True)

    from resnet_ray.data.load import quiet_data_progress
    from resnet_ray.runtime import init_ray

    figures = {"signal": signal(args, args.out)}
    init_ray(local=True)
    quiet_data_progress()
    figures["lesions"] = [lesion(model, args, args.out) for model in models]
    responses(figures["lesions"], args.out)
    path = os.path.join(args.out, "why.json")
    with open(path + ".tmp", "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"figures: {path}; pictures in {args.out}")


if __name__ == "__main__":
    main()
