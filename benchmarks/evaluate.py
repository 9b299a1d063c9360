"""Evaluation throughput: the evaluation job vs a single-process loop.

python benchmarks/evaluate.py [--runs 5] [--actors 1] [--batch-size 256]               # CPU, 32x32
python benchmarks/evaluate.py --gpu --image-size 224 --actors 1 --batch-size 512      # GPU, bf16

All predict the shared CIFAR-10 test split (10,000 images) with the same ResNet-50 (random weights: speed does
not depend on them) through the same Predictor (evaluation preprocessing), on a local Ray instance with this
machine's cores. (a) is the inference stage of resnet_ray.evaluate.evaluate with its defaults: on a CPU-only local
instance the job's own process predicts (eval.in_process_rows null). (a2) is the same job on Ray Data actors
(eval.in_process_rows 0: the path of a cluster, actor start-up and model load included); the job sizes its actor
pool (one CPU stays free for Ray Data's reads) and the actors' threads itself, and the script prints what it
chose. (b) calls Predictor on in-memory batches in this process with --threads threads (default: all cores).
With --gpu, (a) runs on actors too (one per GPU).
"""

import argparse
import glob
import os
import tempfile
import time

from _common import shared_cifar10_config, summary


def make_model(folder, meta, image_size):
    from resnet_ray.checkpoint import export_model, save_training_state
    from resnet_ray.config import ModelConfig
    from resnet_ray.config_files import to_dict
    from resnet_ray.model import build_model

    cfg = shared_cifar10_config(**{"model.weights": "none", "model.image_size": image_size})
    model = build_model(ModelConfig(weights="none", image_size=image_size), len(meta["classes"]))
    ckpt = os.path.join(folder, "ckpt")
    os.makedirs(ckpt)
    save_training_state(
        ckpt,
        {"model": model.state_dict()},
        {
            "arch": "resnet50",
            "num_classes": len(meta["classes"]),
            "classes": meta["classes"],
            "coarse_classes": None,
            "fine_to_coarse": None,
            "image_size": image_size,
            "mean": meta["mean"],
            "std": meta["std"],
            "dataset": meta["name"],
            "epoch": 0,
            "metrics": {},
            "config": to_dict(cfg),
        },
    )
    return cfg, export_model(ckpt, os.path.join(folder, "model"))


def single_process(model_dir, prepared, batch_size, threads):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from resnet_ray.data.load import table_to_batch
    from resnet_ray.predictor import Predictor

    table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(f"{prepared}/test/*.parquet")))
    data = {k: v.copy() for k, v in table_to_batch(table, 32).items()}  # writable arrays, as Ray Data hands out
    predictor = Predictor(model_dir, threads=threads)
    assert torch.get_num_threads() == threads
    start = time.perf_counter()
    n = 0
    for i in range(0, len(data["label"]), batch_size):
        out = predictor({k: v[i : i + batch_size] for k, v in data.items()})
        n += len(out["pred"])
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--actors", type=int, default=1, help="eval.num_actors asked for (the job may use fewer)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the single-process loop")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()

    from resnet_ray.config_files import replace
    from resnet_ray.data.prepare import ensure_prepared
    from resnet_ray.evaluate import evaluate
    from resnet_ray.resources import alive_nodes, size_actor_pool
    from resnet_ray.runtime import init_ray

    base = shared_cifar10_config()
    prepared, meta = ensure_prepared(base.data)
    init_ray(local=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model_dir = make_model(tmp, meta, args.image_size)
        cfg = replace(
            cfg,
            {
                "eval.num_actors": args.actors,
                "eval.batch_size": args.batch_size,
                "eval.gpus_per_actor": 1.0 if args.gpu else 0.0,
                "eval.cpus_per_actor": 1.0,
            },
        )
        pool = size_actor_pool(args.actors, cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor, alive_nodes())
        single_process(model_dir, prepared, args.batch_size, args.threads)  # warm-up
        job, actors, job_wall, plain = [], [], [], []
        for run in range(args.runs):  # (b), (a), (a2): the actors' shutdown must not overlap (b) or (a)
            plain.append(single_process(model_dir, prepared, args.batch_size, args.threads))
            start = time.perf_counter()
            result = evaluate(cfg, model_dir, split="test", output=os.path.join(tmp, f"eval-{run}"))
            job_wall.append(meta["counts"]["test"] / (time.perf_counter() - start))
            job.append(result["images_per_s"])
            assert result["report"]["total_support"] == meta["counts"]["test"]
            if not args.gpu:
                on_actors = evaluate(
                    replace(cfg, {"eval.in_process_rows": 0}),
                    model_dir,
                    split="test",
                    output=os.path.join(tmp, f"actors-{run}"),
                )
                actors.append(on_actors["images_per_s"])
                time.sleep(3)
            print(
                f"run {run + 1}: job {job[-1]:.1f} img/s, loop {plain[-1]:.1f} img/s, ratio {job[-1] / plain[-1]:.2f}"
                + (f"; on actors {actors[-1]:.1f} img/s, ratio {actors[-1] / plain[-1]:.2f}" if actors else ""),
                flush=True,
            )
    device = (
        "GPU bf16"
        if args.gpu
        else (f"CPU ({args.threads} threads in (a) and (b), {pool.actors} actor(s) x {pool.threads} threads in (a2))")
    )
    print(
        f"ResNet-50 at {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{meta['counts']['test']} test images, {device}"
    )
    a = summary("(a) evaluation job: inference stage", job)
    summary("(a') evaluation job: whole call incl. reports", job_wall)
    if actors:
        summary("(a2) evaluation job on actors: inference stage", actors)
    b = summary("(b) single-process inference loop", plain)

    def ratio(xs):
        return sorted(x / y for x, y in zip(xs, plain))[len(plain) // 2]

    print(
        f"ratio a/b: median of per-run ratios {ratio(job):.2f} (medians {a / b:.2f})"
        + (f"; a2/b: {ratio(actors):.2f}" if actors else "")
    )


if __name__ == "__main__":
    main()
