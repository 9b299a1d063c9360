"""Training throughput: a hand-written PyTorch loop, the product's worker session in one process, and the same
session under TorchTrainer (1 worker) fed by Ray Data.

python benchmarks/train_step.py [--runs 3] [--steps 24] [--batch-size 64] [--arch resnet50]   # CPU, 32x32
python benchmarks/train_step.py --arch resnet20 --batch-size 128                          # He et al.'s CIFAR net
python benchmarks/train_step.py --gpu [--image-size 224 --batch-size 256 --steps 50]  # GPU, bf16, channels_last

All three train the same model (resnet_ray.model.build_model) on the same prepared shared CIFAR-10 training images
with SGD and pad-and-crop + flip on the device. (p) is a plain loop written here with nothing of the product but the
model; (a) is the product's worker session (resnet_ray.session.WorkerSession, the code a Ray Train worker runs,
without Ray); (b) is the product's own Ray Train worker (worker.train_fn_per_worker via train.fit), whose reported
images_per_s covers the training epoch only. (b) takes its second epoch, (p) and (a) run after a warm-up epoch, so
all are measured in a warm process. (a0) is (a) without train.diagnostics (its per-stage gradient norms every
step): a/a0 is their cost. Prints images/s per run, medians and the ratios a/p, b/p, b/a and a/a0.
"""

import argparse
import time

from _common import shared_cifar10_config, summary


def config(args):
    values = {
        "model.arch": args.arch,
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


def in_memory(cfg, prepared) -> dict:
    """The same training rows as numpy arrays (image: N x 32 x 32 x 3 uint8, label: N)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from resnet_ray.data.load import table_to_batch

    table = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(f"{prepared}/train/*.parquet")))
    return {k: v.copy() for k, v in table_to_batch(table.slice(0, cfg.data.limit), 32).items()}  # writable


def handwritten_loop(cfg, meta, data, threads):
    """(p): a plain PyTorch training loop: the model, SGD with momentum, uint8 -> normalized float, 4-px pad +
    random crop (one offset per batch: cheaper than the product's per-image crop) and a random flip per image on
    the device, cross-entropy; nothing else of the product."""
    import torch
    import torch.nn.functional as F

    from resnet_ray.model import build_model

    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    model = build_model(cfg.model, len(meta["classes"])).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)
    b, size = cfg.train.batch_size, cfg.model.image_size
    images, labels = torch.from_numpy(data["image"]), torch.from_numpy(data["label"])
    steps = len(labels) // b
    start = time.perf_counter()
    for i in range(steps):
        x = images[i * b : (i + 1) * b].to(device).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = F.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,)).tolist()
        x = x[:, :, dy : dy + size, dx : dx + size]
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        loss = F.cross_entropy(model(x), labels[i * b : (i + 1) * b].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - start)


def plain_loop(cfg, meta, data, threads, diagnostics=True):
    """(a): the product's worker session trains one epoch on the in-memory rows in this process
    (session.WorkerSession.train: the code a Ray Train worker runs, without Ray); ``diagnostics`` False: the same
    without train.diagnostics' per-stage gradient norms ((a0), for their cost)."""
    import torch

    from resnet_ray.config_files import replace
    from resnet_ray.session import WorkerSession

    cfg = replace(cfg, {"train.diagnostics": diagnostics})

    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
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
    from resnet_ray.config_files import replace
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
    p.add_argument("--arch", default="resnet50", help="a model.arch name (resnet20: He et al.'s CIFAR ResNet)")
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
    data = in_memory(cfg, prepared)
    handwritten_loop(cfg, meta, data, args.threads)  # warm-up (allocator, cudnn autotune)
    plain_loop(cfg, meta, data, args.threads)
    handwritten, plain, bare, ray_runs = [], [], [], []
    for run in range(args.runs):  # interleaved so that drift in machine load hits all alike
        handwritten.append(handwritten_loop(cfg, meta, data, args.threads))
        plain.append(plain_loop(cfg, meta, data, args.threads))
        bare.append(plain_loop(cfg, meta, data, args.threads, diagnostics=False))
        ray_runs.append(ray_train(cfg, run))
    device = "GPU bf16 channels_last" if args.gpu else f"CPU {args.threads} threads"
    print(f"{args.arch} at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} steps, {device}")
    summary("(p) hand-written PyTorch loop", handwritten)
    summary("(a) the product's worker session, one process", plain)
    summary("(a0) the same without train.diagnostics", bare)
    summary("(b) TorchTrainer 1 worker + Ray Data", ray_runs)
    pairs = (
        ("a/p", plain, handwritten),
        ("b/p", ray_runs, handwritten),
        ("b/a", ray_runs, plain),
        ("a/a0", plain, bare),
    )
    for name, top, bottom in pairs:
        ratios = sorted(y / x for x, y in zip(bottom, top))
        print(f"ratio {name}: median of per-run ratios {ratios[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
