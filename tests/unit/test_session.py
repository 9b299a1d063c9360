"""The plain-PyTorch worker session (no Ray) and the process-group backend of GPU runs."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resnet_ray.config_files import load_config
from resnet_ray.session import GPU_BACKEND, WorkerSession, all_reduce, epoch_seed, global_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to an oversubscribed machine

META = {
    "name": "fake",
    "classes": ["a", "b", "c"],
    "counts": {"train": 48, "val": 10, "test": 10},
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


def tiny_cfg(**overrides):
    values = {
        "model.arch": "resnet18",
        "model.weights": "none",
        "model.image_size": 32,
        "optim.name": "sgd",
        "optim.lr": 0.01,
        "train.epochs": 2,
        "train.batch_size": 8,
        "scaling.num_workers": 1,
    }
    values.update(overrides)
    return load_config(None, values)


def batches(rows, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (rows,), generator=g)
    return [
        {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]} for i in range(0, rows, batch_size)
    ]


@pytest.fixture
def process_group(tmp_path):
    """A one-rank process group created with the given backend string; destroyed afterwards."""

    def create(backend):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)

    yield create
    if dist.is_initialized():
        dist.destroy_process_group()


def test_gpu_runs_create_the_process_group_with_a_cpu_and_a_cuda_backend():
    from resnet_ray.train import build_trainer

    gpu = tiny_cfg(**{"scaling.use_gpu": True, "train.name": "r"})
    assert build_trainer(gpu, META, datasets=None).backend_config.backend == GPU_BACKEND == "cpu:gloo,cuda:nccl"
    assert build_trainer(tiny_cfg(**{"train.name": "r"}), META, datasets=None).backend_config.backend == "gloo"


def test_an_accelerator_only_backend_rejects_cpu_collectives_and_the_mixed_one_does_not(process_group):
    # "cuda:gloo" maps only the accelerator, as NCCL does: the crash of a CPU-tensor reduction on GPU runs
    process_group("cuda:gloo")
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(2, dtype=torch.float64))
    dist.destroy_process_group()
    process_group("cpu:gloo,cuda:gloo")  # GPU_BACKEND's shape, gloo standing in for NCCL on this machine
    assert all_reduce([1.0, 2.5], torch.device("cpu")) == [1.0, 2.5]


def test_metric_reduction_uses_tensors_on_the_device_it_is_given(process_group, monkeypatch):
    process_group("gloo")
    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append((t.device, t.dtype)) or real(t, op=op))
    tr = {"loss_sum": 6.0, "correct": 3, "count": 4, "seconds": 2.0, "data_wait_s": 0.5}
    ev = {"loss_sum": 2.0, "top1": 1.0, "top5": 2.0, "count": 2}
    metrics = global_metrics(tr, ev, val_rows=2, device=torch.device("cpu"))
    assert seen == [(torch.device("cpu"), torch.float64)] * 2
    assert metrics["train_loss"] == 1.5 and metrics["val_top5"] == 1.0 and metrics["images_per_s"] == 2.0
    with pytest.raises(RuntimeError, match="validation saw 2 rows, the split has 3"):
        global_metrics(tr, ev, val_rows=3, device=torch.device("cpu"))


def test_session_runs_epochs_in_a_one_rank_ddp_group_and_restores(process_group):
    process_group("gloo")
    cfg = tiny_cfg()
    session = WorkerSession(cfg, META, torch.device("cpu"), ddp=True)
    assert isinstance(session.model, torch.nn.parallel.DistributedDataParallel) and session.steps == 6
    metrics = session.run_epoch(1, batches(48, 8, 0), batches(10, 4, 1))
    assert metrics["epoch"] == 1 and metrics["val_count"] == 10 and session.epoch == 1
    assert session.history == [metrics] and session.scheduler.last_epoch == 6
    state, meta = session.state(), session.checkpoint_meta()
    assert meta["history"] == [metrics] and meta["classes"] == META["classes"]

    again = WorkerSession(cfg, META, torch.device("cpu"))  # e.g. a restarted worker, without DDP this time
    again.restore(state, meta["history"])
    assert again.epoch == 1 and again.scheduler.last_epoch == 6
    for key, value in again.module.state_dict().items():
        torch.testing.assert_close(value, session.module.state_dict()[key])


def _rank_main(rank, world, store_path, out_dir):
    """One rank of a 2-process gloo group (as torchrun would start it): one epoch, reduced metrics to a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        session = WorkerSession(tiny_cfg(**{"scaling.num_workers": world}), META, torch.device("cpu"), rank, world)
        metrics = session.run_epoch(1, batches(24, 8, rank), batches(5, 5, 10 + rank))  # 5 of the 10 val rows each
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({**metrics, "ddp": isinstance(session.model, torch.nn.parallel.DistributedDataParallel)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_without_ray_reduce_metrics_over_every_validation_row(tmp_path):
    mp.start_processes(
        _rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["ddp"] and ranks[1]["ddp"]
    assert ranks[0]["val_count"] == 10  # 5 rows seen by each rank, summed
    for key in ("train_loss", "train_acc", "val_loss", "val_top1", "epoch_s"):
        assert ranks[0][key] == ranks[1][key]  # every rank reports the same global figures


def test_epoch_seed_differs_per_epoch_and_not_per_rank():
    cfg = tiny_cfg()
    assert epoch_seed(cfg, 1) != epoch_seed(cfg, 2)
    assert epoch_seed(cfg, 1) == epoch_seed(tiny_cfg(), 1)


def lr_per_step(session, epochs, seed=0):
    """Train ``epochs`` (numbers) and return the learning rate each optimizer step used."""
    used = []
    for epoch in epochs:
        for batch in batches(48, 8, seed + epoch):
            used.append(session.optimizer.param_groups[0]["lr"])
            session.train(epoch, [batch])
        session.epoch = epoch
    return used


def test_a_resumed_run_reproduces_the_uninterrupted_learning_rate_curve():
    cfg = tiny_cfg(**{"train.epochs": 3, "optim.warmup_epochs": 1.0})
    reference = lr_per_step(WorkerSession(cfg, META, torch.device("cpu")), [1, 2, 3])
    first = WorkerSession(cfg, META, torch.device("cpu"))
    before = lr_per_step(first, [1])
    resumed = WorkerSession(cfg, META, torch.device("cpu"))
    resumed.restore(first.state(), first.history)
    assert before + lr_per_step(resumed, [2, 3]) == pytest.approx(reference, rel=1e-12)
    assert reference[0] < reference[5] and reference[-1] < reference[6]  # warmup, then decay


def test_more_epochs_continue_the_cosine_over_the_new_total_and_more_workers_rescale_it():
    from resnet_ray.optim import lr_factor, peak_lr

    cfg = tiny_cfg(**{"train.epochs": 2, "optim.scale_lr": True, "optim.reference_batch_size": 8})
    first = WorkerSession(cfg, META, torch.device("cpu"))
    lr_per_step(first, [1, 2])  # the 2-epoch run ended: its learning rate is 0
    assert first.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    longer = tiny_cfg(
        **{"train.epochs": 4, "optim.scale_lr": True, "optim.reference_batch_size": 8, "scaling.num_workers": 2}
    )
    resumed = WorkerSession(longer, META, torch.device("cpu"))  # one process standing in for 2 workers' global batch
    resumed.restore(first.state(), first.history)
    steps = resumed.steps  # 48 rows // 1 rank // 8
    used = lr_per_step(resumed, [3, 4])
    peak = peak_lr(longer.optim, longer.global_batch_size)
    assert peak == pytest.approx(2 * peak_lr(cfg.optim, cfg.global_batch_size))  # 2 workers: twice the batch
    expected = [peak * lr_factor(2 * steps + i, 4 * steps, 0, 0.0) for i in range(2 * steps)]
    assert used == pytest.approx(expected, rel=1e-12)
    # weight decay and momentum come from the new config too, the moments from the checkpoint
    assert resumed.optimizer.param_groups[0]["weight_decay"] == longer.optim.weight_decay
    assert resumed.optimizer.state_dict()["state"]  # momentum buffers carried over


def test_weight_ema_is_validated_checkpointed_restored_and_exported(tmp_path):
    from resnet_ray.checkpoint import export_model, save_training_state
    from resnet_ray.saved_model import load_model

    cfg = tiny_cfg(**{"train.ema_decay": 0.5})
    session = WorkerSession(cfg, META, torch.device("cpu"))
    start = {k: v.clone() for k, v in session.module.state_dict().items()}
    session.run_epoch(1, batches(16, 8, 0), batches(10, 5, 1))  # 2 steps: ema = 0.25 start + 0.25 w1 + 0.5 w2
    assert session.eval_model is session.ema.module
    raw, ema = session.module.state_dict(), session.ema.module.state_dict()
    weight = "conv1.weight"
    assert not torch.equal(ema[weight], raw[weight]) and not torch.equal(ema[weight], start[weight])
    assert ema["bn1.num_batches_tracked"] == raw["bn1.num_batches_tracked"] == 2  # integer buffers copied

    state = session.state()
    assert torch.equal(state["ema"][weight], ema[weight])
    again = WorkerSession(cfg, META, torch.device("cpu"))
    again.restore(state, session.history)
    assert torch.equal(again.ema.module.state_dict()[weight], ema[weight])
    assert torch.equal(again.module.state_dict()[weight], raw[weight])

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_training_state(str(folder), state, session.checkpoint_meta())
    exported = load_model(export_model(str(folder), str(tmp_path / "model")))
    assert torch.equal(exported.model.state_dict()[weight], ema[weight])  # the average is what ships


def test_weight_ema_matches_its_definition():
    from resnet_ray.loop import WeightEMA

    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)


def test_a_refit_on_train_and_val_trains_on_both_and_validates_on_nothing():
    session = WorkerSession(tiny_cfg(**{"train.refit_on_val": True}), META, torch.device("cpu"))
    assert session.steps == (48 + 10) // 8 and session.val_rows == 0
    metrics = session.run_epoch(1, batches(56, 8, 0), [])
    assert "val_top1" not in metrics and session.history == [metrics]
    assert 0.0 <= metrics["train_acc"] <= 1.0 and math.isfinite(metrics["train_loss"])


def colour_batches(rows, batch_size, seed):
    """Images whose class is the colour channel that is bright: a task a tiny model learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % 3
    images = torch.randint(0, 100, (rows, 32, 32, 3), dtype=torch.uint8, generator=g)
    images[torch.arange(rows), :, :, labels] += 120
    return [
        {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]} for i in range(0, rows, batch_size)
    ]


def test_a_tiny_model_learns_loss_falls_and_accuracy_rises_above_chance():
    cfg = tiny_cfg(**{"optim.name": "adamw", "optim.lr": 0.002, "train.epochs": 4, "train.augment": "none"})
    session = WorkerSession(cfg, {**META, "counts": {"train": 48, "val": 30, "test": 10}}, torch.device("cpu"))
    for epoch in range(1, 5):
        session.run_epoch(epoch, colour_batches(48, 8, epoch), colour_batches(30, 10, 100))
    first, last = session.history[0], session.history[-1]
    assert last["train_loss"] < 0.7 * first["train_loss"]
    # chance is 1/3: 18 of 30 validation rows right by chance has a probability below 0.001
    assert last["train_acc"] > first["train_acc"] and last["val_top1"] >= 0.6
