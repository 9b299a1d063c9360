"""Training throughput: the plain PyTorch loop in one process vs the same loop under TorchTrainer (1 worker)
fed by Ray Data.

python benchmarks/train_step.py [--runs 3] [--steps 24] [--batch-size 64]            # CPU, 32x32
python benchmarks/train_step.py --gpu [--image-size 224 --batch-size 256 --steps 50]  # GPU, bf16, channels_last

Both run the product's worker session (resnet_ray.session.WorkerSession) on the same prepared shared CIFAR-10 training
images with the same model, optimizer and augmentation; (b) is the product's own Ray Train worker
(train.train_fn_per_worker via fit), whose reported images_per_s covers the training epoch only; (b) takes its
second epoch, (a) runs after a warm-up epoch, so both are measured in a warm process. Prints images/s per run,
medians and the ratio b/a.
"""

import argparse
import time

from _common import shared_cifar10_config, summary


def config(args):
    values = {
        "model.weights": "none",
        "model.image_size": args.image_size,
        "data.limit": args.steps * args.batch_size,
        "optim.name": "sgd",
        "optim.lr": 0.01,
        "train.epochs": 2,
        "train.batch_size": args.batch_size,
        "train.evaluate_test": False,
        "train.storage_path": "/tmp/resnet_ray_bench",
        "train.keep_checkpoints": 1,
        "scaling.num_workers": 1,
        "scaling.use_gpu": args.gpu,
        "scaling.cpus_per_worker": args.threads,
        "eval.batch_size": 512,
    }
    return shared_cifar10_config(**values)


def plain_loop(cfg, meta, prepared, threads):
    """(a): read the same rows into memory, then the product's worker session trains one epoch in this process
    (session.WorkerSession.train: the code a Ray Train worker runs, without Ray)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from resnet_ray.data.load import table_to_batch
    from resnet_ray.session import WorkerSession

    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(f"{prepared}/train/*.parquet")))
    data = {k: v.copy() for k, v in table_to_batch(table.slice(0, cfg.data.limit), 32).items()}  # writable
    session = WorkerSession(cfg, meta, device)
    b, on_gpu = cfg.train.batch_size, device.type == "cuda"
    batches = [
        {
            "image": torch.from_numpy(data["image"][i : i + b]).pin_memory()
            if on_gpu
            else torch.from_numpy(data["image"][i : i + b]),
            "label": torch.from_numpy(data["label"][i : i + b]),
        }
        for i in range(0, session.steps * b, b)
    ]
    result = session.train(1, batches)
    return result["count"] / result["seconds"]


def ray_train(cfg, run):
    """(b): the product's TorchTrainer run, 1 worker, Ray Data ingest."""
    from resnet_ray.config import replace
    from resnet_ray.train import fit

    result = fit(replace(cfg, {"train.name": f"bench-{time.time_ns()}-{run}"}))
    warm = result.history[1]  # epoch 2: the fresh worker process has warmed up, as (a) has
    print(
        f"  (b) run {run}: epoch 2 {warm['images_per_s']:.1f} img/s, waited {warm['data_wait_s']:.2f} s "
        f"of {warm['epoch_s']:.2f} s for data",
        flush=True,
    )
    return warm["images_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the plain loop = CPUs of the Ray worker")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()

    from resnet_ray.data.load import quiet_data_progress
    from resnet_ray.data.prepare import ensure_prepared
    from resnet_ray.runtime import init_ray

    cfg = config(args)
    prepared, meta = ensure_prepared(cfg.data)
    init_ray(local=True)
    quiet_data_progress()
    plain_loop(cfg, meta, prepared, args.threads)  # warm-up (allocator, cudnn autotune)
    plain, ray_runs = [], []
    for run in range(args.runs):  # interleaved so that drift in machine load hits both alike
        plain.append(plain_loop(cfg, meta, prepared, args.threads))
        ray_runs.append(ray_train(cfg, run))
    device = "GPU bf16 channels_last" if args.gpu else f"CPU {args.threads} threads"
    print(f"ResNet-50 at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} steps, {device}")
    a = summary("(a) plain PyTorch loop, one process", plain)
    b = summary("(b) TorchTrainer 1 worker + Ray Data", ray_runs)
    ratios = sorted(y / x for x, y in zip(plain, ray_runs))
    print(f"ratio b/a: median of per-run ratios {ratios[len(ratios) // 2]:.2f} (medians {b / a:.2f})")


if __name__ == "__main__":
    main()
