"""The GPU path in one prepared check, without Ray: the product's own worker session, metric reduction,
checkpoint code and batch Predictor, in a one-rank `cpu:gloo,cuda:nccl` process group with DDP, as a Ray
Train worker runs them.

python benchmarks/gpu_check.py                    # one GPU: ResNet-50 at 224 px, bf16, channels_last (~3-4 min)
python benchmarks/gpu_check.py --skip-compile     # without the model.compile pass
python benchmarks/gpu_check.py --cpu              # the same stages at tiny sizes on the CPU (CI runs this)

Prints one PASS/FAIL/SKIP line per stage, then train img/s, inference img/s and peak GPU memory, for the
eager model and for model.compile, and the training img/s of the CIFAR ResNet-20 and ResNet-56 of He et al. at
32 px, batch 128. The measured training epoch runs every step under
torch.cuda.set_sync_debug_mode("error"): a host-device synchronization inside the step fails the stage.
Exit status 1 when a stage fails. --json PATH also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # arch, image size, batch, measured steps, val rows, inference rows, inference batch
    "gpu": dict(arch="resnet50", image_size=224, batch=256, steps=60, val=2048, infer=20480, infer_batch=1024),
    "cpu": dict(arch="resnet18", image_size=32, batch=8, steps=3, val=16, infer=64, infer_batch=32),
}
# the CIFAR ResNets of He et al. at their native 32 px and the paper's batch of 128: (archs, measured steps)
CIFAR_NETS = {"gpu": (("resnet20", "resnet56"), 100), "cpu": (("resnet20",), 2)}
CLASSES = [f"class{i}" for i in range(10)]


class Stages:
    """Runs named stages, prints one PASS/FAIL/SKIP line each, remembers failures."""

    def __init__(self):
        self.failed = []

    def run(self, name, fn, *args):
        start = time.perf_counter()
        try:
            detail = fn(*args)
        except Exception as exc:  # a failing stage is reported, the check goes on where it can
            self.failed.append(name)
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=4)
            return None
        print(f"PASS  {name} ({time.perf_counter() - start:.1f} s){': ' + detail[0] if detail else ''}", flush=True)
        return detail[1] if detail else None

    @staticmethod
    def skip(name, why):
        print(f"SKIP  {name}: {why}", flush=True)


def make_config(size: dict, compile_model: bool, workdir: str):
    from resnet_ray.config_files import load_config

    return load_config(
        None,
        {
            "model.arch": size["arch"],
            "model.weights": "none",
            "model.image_size": size["image_size"],
            "model.channels_last": True,
            "model.compile": compile_model,
            "optim.name": "sgd",
            "optim.lr": 0.1,
            "optim.weight_decay": 5e-5,
            "optim.label_smoothing": 0.1,
            "optim.grad_clip_norm": 1.0,
            "train.epochs": 3,
            "train.batch_size": size["batch"],
            "train.augment": "rrc",
            "train.hflip": True,
            "train.amp": True,
            "train.storage_path": workdir,
            "train.name": "gpu-check",
            "scaling.num_workers": 1,
        },
    )


def synthetic_batches(rows: int, batch: int, seed: int, pin: bool) -> list:
    """uint8 32x32 images (the stored CIFAR size) and labels, in pinned host memory on a GPU run."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(CLASSES), (rows,), generator=g)
    out = []
    for i in range(0, rows, batch):
        b = {"image": images[i : i + batch], "label": labels[i : i + batch]}
        out.append({k: v.pin_memory() for k, v in b.items()} if pin else b)
    return out


def process_group(backend: str) -> tuple:
    import torch
    import torch.distributed as dist

    from resnet_ray.session import all_reduce

    store = dist.FileStore(tempfile.mktemp(prefix="gpu-check-store-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    sums = [all_reduce([1.0, 2.0], torch.device(d)) for d in (["cpu", "cuda"] if "cuda" in backend else ["cpu"])]
    assert all(s == [1.0, 2.0] for s in sums), sums
    return f"backend {backend}; float64 all_reduce on {len(sums)} device type(s)", None


def build_session(cfg, meta, device):
    from torch.nn.parallel import DistributedDataParallel

    from resnet_ray.session import WorkerSession

    session = WorkerSession(cfg, meta, device, ddp=True)
    assert isinstance(session.model, DistributedDataParallel)
    return f"{cfg.model.arch} in DDP on {device}, compile={cfg.model.compile}", session


def train_epoch(session, epoch: int, batches: list, val: list, sync_debug: bool):
    import torch

    session.settings.sync_debug = sync_debug
    if session.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(session.device)
    metrics = session.run_epoch(epoch, batches, val)
    assert metrics["val_count"] == session.val_rows and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    guard = ", every step under set_sync_debug_mode('error')" if sync_debug else ""
    return (
        f"{metrics['images_per_s']:.0f} img/s, loss {metrics['train_loss']:.3f}, "
        f"val rows {metrics['val_count']}{guard}",
        metrics,
    )


def checkpoint_round_trip(session, cfg, meta, workdir: str):
    import torch

    from resnet_ray.checkpoint import export_model, load_training_state, save_training_state
    from resnet_ray.saved_model import load_model
    from resnet_ray.session import WorkerSession

    folder = tempfile.mkdtemp(dir=workdir)
    save_training_state(folder, session.state(), session.checkpoint_meta())
    state, ckpt_meta = load_training_state(folder)
    restored = WorkerSession(cfg, meta, session.device)
    restored.restore(state, ckpt_meta["history"])
    for key, value in restored.module.state_dict().items():
        assert torch.equal(value, session.module.state_dict()[key]), key
    model_dir = export_model(folder, os.path.join(workdir, "model"))
    assert load_model(model_dir).info["epoch"] == session.epoch
    return (
        f"state.pt {os.path.getsize(os.path.join(folder, 'state.pt')) / 2**20:.0f} MiB, restored, exported",
        model_dir,
    )


def predict(model_dir: str, size: dict, compile_model: bool):
    import numpy as np
    import torch

    from resnet_ray.predictor import Predictor

    predictor = Predictor(model_dir)
    if compile_model:
        predictor.model = torch.compile(predictor.model)
    rng = np.random.default_rng(0)
    rows, batch = size["infer"], size["infer_batch"]
    images = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
    batches = [
        {
            "image": images[i : i + batch],
            "row_id": np.arange(i, min(i + batch, rows)),
            "label": np.zeros(min(batch, rows - i), dtype=np.int64),
        }
        for i in range(0, rows, batch)
    ]
    for b in batches[:2]:  # warm-up (cuDNN autotuning, compilation)
        predictor(b)
    start = time.perf_counter()
    out = [predictor(b) for b in batches]
    seconds = time.perf_counter() - start
    ids = np.concatenate([o["row_id"] for o in out])
    assert np.array_equal(ids, np.arange(rows)) and all((o["confidence"] <= 1).all() for o in out)
    return f"{rows / seconds:.0f} img/s over {rows} images, batch {batch}", rows / seconds


def cifar_resnets(mode: str, meta: dict, device, workdir: str):
    """Training img/s of the CIFAR ResNets (batch 128, 32 px, pad-and-crop + flip), the measured epoch without a
    host-device sync on a GPU."""
    from resnet_ray.config_files import replace
    from resnet_ray.session import WorkerSession

    archs, steps = CIFAR_NETS[mode]
    on_gpu = device.type == "cuda"
    train = synthetic_batches(steps * 128, 128, 2, on_gpu)
    figures = {}
    for arch in archs:
        cfg = replace(
            make_config(SIZES[mode], False, workdir),
            {"model.arch": arch, "model.image_size": 32, "train.batch_size": 128, "train.augment": "crop"},
        )
        session = WorkerSession(cfg, {**meta, "counts": {**meta["counts"], "train": steps * 128, "val": 0}}, device)
        session.run_epoch(1, train, [])  # warm-up
        session.settings.sync_debug = on_gpu
        figures[f"{arch}_train_img_s"] = session.run_epoch(2, train, [])["images_per_s"]
    return ", ".join(f"{k} {v:.0f}" for k, v in figures.items()), figures


def run_pass(stages: Stages, size: dict, meta: dict, device, compile_model: bool, workdir: str) -> dict:
    """WorkerSession, warm-up epoch, measured epoch (no sync allowed), checkpoint, Predictor: figures of one pass."""
    import torch

    tag = " [compile]" if compile_model else ""
    cfg = make_config(size, compile_model, workdir)
    session = stages.run(f"build the worker session{tag}", build_session, cfg, meta, device)
    if session is None:
        return {}
    on_gpu = device.type == "cuda"
    rows = size["steps"] * size["batch"]
    train = synthetic_batches(rows, size["batch"], 0, on_gpu)
    val = synthetic_batches(size["val"], size["infer_batch"], 1, on_gpu)
    stages.run(
        f"warm-up epoch (cuDNN autotuning{', compilation' if compile_model else ''}){tag}",
        train_epoch,
        session,
        1,
        train,
        val,
        False,
    )
    if not on_gpu:
        stages.skip(f"no host-device sync in the training step{tag}", "needs CUDA (the CPU has nothing to sync)")
    metrics = stages.run(
        f"measured epoch{' with no host-device sync' if on_gpu else ''}{tag}",
        train_epoch,
        session,
        2,
        train,
        val,
        on_gpu,
    )
    figures = {"train_img_s": metrics["images_per_s"] if metrics else None}
    if on_gpu:
        figures["peak_train_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    model_dir = stages.run(
        f"checkpoint save / load / restore / export{tag}", checkpoint_round_trip, session, cfg, meta, workdir
    )
    if model_dir:
        figures["inference_img_s"] = stages.run(
            f"Predictor batch inference{tag}", predict, model_dir, size, compile_model
        )
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    p.add_argument("--skip-compile", action="store_true", help="skip the model.compile pass")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the model.compile pass in --cpu mode too")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from resnet_ray.session import process_group_backend

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU variant", file=sys.stderr)
        return 2
    size = SIZES["cpu" if args.cpu else "gpu"]
    device = torch.device("cpu" if args.cpu else "cuda:0")
    print(
        f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if not args.cpu else 'CPU'}, "
        f"'ray' imported: {'ray' in sys.modules}",
        flush=True,
    )
    meta = {
        "name": "synthetic",
        "classes": CLASSES,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "counts": {"train": size["steps"] * size["batch"], "val": size["val"], "test": size["infer"]},
    }
    stages = Stages()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        stages.run("process group", process_group, process_group_backend(not args.cpu))
        results["eager"] = run_pass(stages, size, meta, device, False, workdir)
        mode = "cpu" if args.cpu else "gpu"
        results["cifar"] = stages.run("CIFAR ResNets at 32 px, batch 128", cifar_resnets, mode, meta, device, workdir)
        if args.skip_compile or (args.cpu and not args.compile_on_cpu):
            stages.skip(
                "model.compile pass",
                "--skip-compile"
                if args.skip_compile
                else "CPU mode (inductor builds C++ for minutes on 2 cores; --compile-on-cpu runs it)",
            )
        else:
            torch.cuda.empty_cache() if not args.cpu else None
            results["compile"] = run_pass(stages, size, meta, device, True, workdir)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(
        f"\n{size['arch']} at {size['image_size']} px, batch {size['batch']}, "
        f"{'bf16 autocast, channels_last' if not args.cpu else 'fp32'}; 'ray' imported: {'ray' in sys.modules}"
    )
    for name, figures in results.items():
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(f"  {name:<8} {shown}")
    print(f"{'FAILED: ' + ', '.join(stages.failed) if stages.failed else 'ALL STAGES PASSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"failed": stages.failed, **results}, f, indent=2)
    return 1 if stages.failed else 0


if __name__ == "__main__":
    sys.exit(main())
