"""Ray Train (TorchTrainer, DDP) fine-tuning: the per-worker function and ``fit(cfg)``."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from resnet_ray import storage
from resnet_ray.checkpoint import export_checkpoint, load_training_state, save_training_state, unwrap_state_dict
from resnet_ray.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml
from resnet_ray.data.load import load_split, quiet_data_progress, split_rows
from resnet_ray.data.prepare import ensure_prepared
from resnet_ray.loop import StepSettings, evaluate_epoch, train_epoch
from resnet_ray.model import build_model, is_head, normalization
from resnet_ray.optim import build_optimizer, build_scheduler
from resnet_ray.transforms import Preprocess

log = logging.getLogger(__name__)

FAILURE_MARKER = ".injected-failure"
METRIC = "val_top1"


# ---------------------------------------------------------------------------
# inside each Ray Train worker


def _steps_per_epoch(cfg: Config, meta: dict, world: int) -> int:
    return split_rows(meta, "train", cfg.data.limit) // world // cfg.train.batch_size


def _val_batches(shard, batch_size: int, rank: int, world: int):
    """This rank's part of the unsplit validation set: rows with row_id % world == rank, each row once."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu"):
        mask = batch["row_id"] % world == rank
        yield {"image": batch["image"][mask], "label": batch["label"][mask]}


def _all_reduce(values: list[float], op=None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _restore(model, optimizer, scheduler, rank: int) -> tuple[int, list]:
    """Load the latest checkpoint Ray Train hands over (after a restart or a resumed run), if any.

    Returns the last completed epoch and the metrics history up to it (0 and [] for a fresh run).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as folder:
        state, meta = load_training_state(folder)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(unwrap_state_dict(state["model"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("rank %d resumed after epoch %d", rank, state["epoch"])
    return state["epoch"], meta["history"]


def _global_metrics(tr: dict, ev: dict, val_rows: int) -> dict:
    """Epoch metrics over all ranks: sums all-reduced, times the slowest rank's; every val row counted once."""
    loss_sum, correct, count, v_loss, v_top1, v_top5, v_count = _all_reduce(
        [tr["loss_sum"], tr["correct"], tr["count"], ev["loss_sum"], ev["top1"], ev["top5"], ev["count"]])
    seconds, data_wait = _all_reduce([tr["seconds"], tr["data_wait_s"]],
                                     dist.ReduceOp.MAX if dist.is_initialized() else None)
    if int(v_count) != val_rows:
        raise RuntimeError(f"validation saw {int(v_count)} rows, the split has {val_rows}")
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "val_loss": v_loss / v_count,
            "val_top1": v_top1 / v_count, "val_top5": v_top5 / v_count, "val_count": int(v_count),
            "images_per_s": count / seconds, "epoch_s": seconds, "data_wait_s": data_wait}


def _report(metrics: dict, state: Optional[dict], meta: dict) -> None:
    """ray.train.report on every rank (a barrier); rank 0 (the one with a state) attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if state is not None:
            save_training_state(folder, state, meta)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: rebuild the config, train cfg.train.epochs epochs, report + checkpoint each one."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"])
    meta, run_dir = loop_config["meta"], loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.train.seed)
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    num_classes = len(meta["classes"])
    model = build_model(cfg.model, num_classes)
    if on_gpu and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    steps = _steps_per_epoch(cfg, meta, world)
    optimizer = build_optimizer(model, cfg.optim, cfg.global_batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, steps, cfg.train.epochs)
    step_model = torch.compile(model) if cfg.model.compile else model

    start_epoch, history = _restore(model, optimizer, scheduler, rank)

    mean, std = normalization(cfg.model, meta)
    settings = StepSettings(
        preprocess=Preprocess(cfg.model.image_size, mean, std, cfg.train.augment, cfg.train.crop_padding,
                              cfg.train.hflip, on_gpu and cfg.model.channels_last),
        num_classes=num_classes, device=device, label_smoothing=cfg.optim.label_smoothing,
        grad_clip_norm=cfg.optim.grad_clip_norm, mixup_alpha=cfg.train.mixup_alpha,
        cutmix_alpha=cfg.train.cutmix_alpha, amp_dtype=torch.bfloat16 if on_gpu and cfg.train.amp else None)
    backbone = [p for n, p in model.named_parameters() if not is_head(n)]
    backbone_norms = [m for n, m in model.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not is_head(n)]
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    val_rows = split_rows(meta, "val", cfg.data.limit)
    model_meta = {"config": to_dict(cfg), "arch": cfg.model.arch, "num_classes": num_classes,
                  "classes": meta["classes"], "coarse_classes": meta.get("coarse_classes"),
                  "fine_to_coarse": meta.get("fine_to_coarse"), "image_size": cfg.model.image_size,
                  "mean": list(mean), "std": list(std), "dataset": meta["name"]}

    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        frozen = epoch <= cfg.train.freeze_backbone_epochs
        settings.frozen, settings.frozen_norms = (backbone, backbone_norms) if frozen else ([], [])
        # the same seed on every rank: the split may hand a rank either half of the rows, and with rank-free
        # seeds the global batch (and so the run) does not depend on which half a rank got
        settings.generator = torch.Generator().manual_seed(cfg.train.seed * 100003 + epoch)
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, drop_last=True, prefetch_batches=cfg.train.prefetch_batches,
            local_shuffle_buffer_size=4 * cfg.train.batch_size if cfg.data.shuffle else None,
            local_shuffle_seed=settings.generator.initial_seed(), device="cpu")

        def on_step(step, loss):
            if rank == 0 and (step % max(1, steps // 4) == 0 or step == steps):
                log.info("epoch %d/%d step %d/%d loss %.4f", epoch, cfg.train.epochs, step, steps, loss)

        tr = train_epoch(step_model, batches, optimizer, scheduler, settings, on_step=on_step)
        val_start = time.perf_counter()
        ev = evaluate_epoch(step_model, _val_batches(val_shard, cfg.eval.batch_size, rank, world), settings)
        metrics = {"epoch": epoch, **_global_metrics(tr, ev, val_rows), "lr": optimizer.param_groups[0]["lr"],
                   "val_s": time.perf_counter() - val_start, "backbone_frozen": frozen}
        history.append(metrics)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch} if rank == 0 else None
        _report(metrics, state, {**model_meta, "epoch": epoch, "metrics": metrics, "history": history})
        if rank == 0:
            log.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f top1 %.4f top5 %.4f | %.0f img/s",
                     epoch, cfg.train.epochs, metrics["train_loss"], metrics["train_acc"], metrics["val_loss"],
                     metrics["val_top1"], metrics["val_top5"], metrics["images_per_s"])
        _maybe_inject_failure(cfg, epoch, rank, world, run_dir)


def _maybe_inject_failure(cfg: Config, epoch: int, rank: int, world: int, run_dir: str) -> None:
    """Debug hook (train.fail_at_epoch): the last rank dies once, after reporting that epoch."""
    if cfg.train.fail_at_epoch != epoch or rank != world - 1:
        return
    marker = storage.join(run_dir, FAILURE_MARKER)
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} killed after epoch {epoch}\n")
    log.warning("train.fail_at_epoch=%d: killing worker %d now", epoch, rank)
    os._exit(1)


# ---------------------------------------------------------------------------
# on the driver


@dataclass
class FitResult:
    run_dir: str
    history: list  # one metrics dict per epoch, in order
    best: dict  # metrics of the best epoch by validation top-1
    model_dir: str  # exported best model
    evaluation: Optional[dict] = None  # test report (resnet_ray.evaluate) when train.evaluate_test


def run_dir_of(cfg: Config) -> str:
    return storage.join(cfg.train.storage_path, cfg.train.name)


def with_run_name(cfg: Config) -> Config:
    """Give the run a name (so it can be resumed) when the config has none."""
    if cfg.train.name:
        return cfg
    tree = to_dict(cfg)
    tree["train"]["name"] = f"{cfg.data.dataset_name}-{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return from_dict(tree)


def config_for_resume(run_dir: str, overrides=()) -> Config:
    """The config saved in a run folder, pointed back at that folder, with optional overrides."""
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    with storage.local_file(path, suffix=".yaml") as local:
        cfg = load_config(local, overrides)
    parent, name = storage.split(run_dir)
    tree = to_dict(cfg)
    tree["train"].update(storage_path=parent, name=name)
    return from_dict(tree)


def _check_batches(cfg: Config, meta: dict) -> None:
    rows = split_rows(meta, "train", cfg.data.limit)
    if rows // cfg.scaling.num_workers < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} per worker is more than the "
                          f"{rows // cfg.scaling.num_workers} training rows each of the "
                          f"{cfg.scaling.num_workers} workers gets")


def write_history(run_dir: str, history: list) -> None:
    """history.jsonl and history.csv in the run folder."""
    storage.write_text(storage.join(run_dir, "history.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(run_dir, "history.csv"), out.getvalue())


def _export_best(result, run_dir: str) -> tuple[dict, str]:
    """Export the best checkpoint by val_top1 to <run_dir>/model (local path or URI)."""
    model_dir = storage.join(run_dir, "model")
    meta = export_checkpoint(result.get_best_checkpoint(metric=METRIC, mode="max"), model_dir)
    return meta["metrics"], model_dir


def training_datasets(cfg: Config, prepared: str) -> dict:
    """train and val as Ray Data datasets; cached in the object store when cfg.data.cache (read once, not
    every epoch), the training blocks in a new random order every epoch when cfg.data.shuffle."""
    import ray.data

    datasets = {}
    for split in ("train", "val"):
        ds = load_split(cfg.data, split, prepared)
        ds.context.execution_options.preserve_order = True  # block order set by the seed, not by timing
        datasets[split] = ds.materialize() if cfg.data.cache else ds
    if cfg.data.shuffle:  # a new, seeded block order every epoch
        seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
        datasets["train"] = datasets["train"].randomize_block_order(seed=seed)
    return datasets


def fit(cfg: Config, callbacks: Optional[list] = None) -> FitResult:
    """Prepare data if needed, train with TorchTrainer, export the best model, evaluate it on test."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = with_run_name(cfg)
    quiet_data_progress()
    prepared, meta = ensure_prepared(cfg.data)
    _check_batches(cfg, meta)
    run_dir = run_dir_of(cfg)
    storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))
    ingest_options = ray.train.DataConfig.default_ingest_options()
    ingest_options.preserve_order = True  # batches in the seeded block order, not in order of completion
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": to_dict(cfg), "meta": meta, "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=cfg.scaling.resources_per_worker),
        run_config=ray.train.RunConfig(
            name=cfg.train.name, storage_path=storage.normalize(cfg.train.storage_path), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                         checkpoint_score_attribute=METRIC,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures)),
        datasets=training_datasets(cfg, prepared),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        _, last = load_training_state(folder)
    history = last["history"]
    write_history(run_dir, history)
    best, model_dir = _export_best(result, run_dir)
    evaluation = None
    if cfg.train.evaluate_test:
        from resnet_ray.evaluate import evaluate

        evaluation = evaluate(cfg, model_dir, split="test", output=storage.join(run_dir, "eval-test"))
    return FitResult(run_dir, history, best, model_dir, evaluation)
