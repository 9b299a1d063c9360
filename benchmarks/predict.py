"""Prediction throughput: the prediction job (Ray Data read + decode, Predictor actors) vs a single-process loop.

python benchmarks/predict.py [--images 2000] [--runs 3] [--arch resnet50] [--image-size 224] [--size 64]
python benchmarks/predict.py --images 64 --runs 1 --arch resnet18 --image-size 32    # a smoke run

Both label the same folder of generated JPEG photos (200-500 px, see benchmarks/prepare.py) with the same random
model (speed does not depend on the weights): stored size --size by centre crop, then resized on the device to
--image-size. (a) is resnet_ray.predict.predict (listing, reading, decoding, actor start-up and model load,
the output Parquet) on a local Ray instance with this machine's cores; it sizes its actor pool itself. (b) decodes
every file with resnet_ray.data.images.decode and calls Predictor on batches in this process with --threads
threads (default: all cores). Runs are interleaved; per-run figures, medians and the ratio a/b.
"""

import argparse
import glob
import os
import tempfile
import time

import numpy as np
from _common import summary
from prepare import make_photos


def make_model(folder, arch, image_size, size, classes):
    from resnet_ray.checkpoint import export_model, save_training_state
    from resnet_ray.config_files import load_config, to_dict
    from resnet_ray.images import ResizeSpec
    from resnet_ray.model import build_model

    cfg = load_config(
        None, {"model.arch": arch, "model.weights": "none", "model.image_size": image_size, "data.image_size": size}
    )
    model = build_model(cfg.model, classes)
    ckpt = os.path.join(folder, "ckpt")
    os.makedirs(ckpt)
    names = [f"class{i:02d}" for i in range(classes)]
    save_training_state(
        ckpt,
        {"model": model.state_dict()},
        {
            "arch": arch,
            "num_classes": classes,
            "classes": names,
            "coarse_classes": None,
            "fine_to_coarse": None,
            "image_size": image_size,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "dataset": "photos",
            "epoch": 0,
            "metrics": {},
            "config": to_dict(cfg),
            "resize": ResizeSpec(size).record(),
        },
    )
    return cfg, export_model(ckpt, os.path.join(folder, "model"))


def single_process(model_dir, photos, size, batch_size, threads):
    import torch

    from resnet_ray.images import ResizeSpec, decode
    from resnet_ray.predictor import Predictor

    files = sorted(glob.glob(os.path.join(photos, "*", "*.jpg")))
    predictor = Predictor(model_dir, threads=threads, probabilities=True)
    assert torch.get_num_threads() == threads
    spec = ResizeSpec(size)
    start = time.perf_counter()
    n = 0
    for i in range(0, len(files), batch_size):
        images = np.stack([decode(open(f, "rb").read(), spec) for f in files[i : i + batch_size]])
        n += len(predictor({"image": images})["pred"])
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224, help="model.image_size")
    p.add_argument("--size", type=int, default=64, help="the stored size (data.image_size of the training data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the single-process loop")
    args = p.parse_args()

    from resnet_ray.config_files import replace
    from resnet_ray.predict import predict
    from resnet_ray.runtime import init_ray

    init_ray(local=True)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        photos = os.path.join(tmp, "photos")
        make_photos(photos, args.images, 10, 200, 500)
        cfg, model_dir = make_model(tmp, args.arch, args.image_size, args.size, 10)
        cfg = replace(cfg, {"eval.batch_size": args.batch_size})
        print(
            f"{args.images} photos; {args.arch} at {args.image_size} px from {args.size} px; {os.cpu_count()} cores",
            flush=True,
        )
        job, loop, ratios = [], [], []
        for run in range(args.runs):
            result = predict(cfg, model_dir, photos, output=os.path.join(tmp, f"p{run}.parquet"))
            job.append(result["images_per_s"])
            loop.append(single_process(model_dir, photos, args.size, args.batch_size, args.threads))
            ratios.append(job[-1] / loop[-1])
            print(f"run {run + 1}: prediction job {job[-1]:.1f} img/s, single process {loop[-1]:.1f} img/s", flush=True)
        summary("(a) prediction job (Ray Data, actors)", job)
        summary(f"(b) single process, {args.threads} threads", loop)
        summary("ratio a/b", ratios, unit="x")


if __name__ == "__main__":
    main()
