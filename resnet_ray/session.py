"""One worker's fine-tuning session in plain PyTorch (no Ray): model, optimizer, schedule and epochs on a device.

The Ray Train worker (``resnet_ray.worker``) wraps a ``WorkerSession`` with dataset shards, reports and checkpoints;
the same code runs in any ``torch.distributed`` process group (torchrun, or the one-rank group of
``benchmarks/gpu_check.py``) or in a single process without one. Epoch metrics are reduced across ranks
with collectives on tensors of the training device, so they work under every backend (NCCL serves CUDA
tensors only); GPU process groups are created as ``cpu:gloo,cuda:nccl`` so that a CPU tensor cannot crash
a run either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from resnet_ray.config import Config
from resnet_ray.config_files import to_dict
from resnet_ray.data.layout import split_rows
from resnet_ray.images import ResizeSpec
from resnet_ray.loop import StageGradNorms, StepSettings, WeightEMA, evaluate_epoch, train_epoch
from resnet_ray.model import build_model, is_head, normalization
from resnet_ray.optim import build_optimizer, build_scheduler, load_optimizer_moments, set_schedule_step
from resnet_ray.transforms import Preprocess

log = logging.getLogger(__name__)

GPU_BACKEND = "cpu:gloo,cuda:nccl"  # collectives on CPU tensors go to gloo, on CUDA tensors to NCCL
CPU_BACKEND = "gloo"


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend string for a run on GPUs or on CPUs."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def epoch_seed(cfg: Config, epoch: int) -> int:
    """Seed of an epoch's augmentation and local shuffle: the same on every rank (so the global batch does not
    depend on which half of the rows a rank got), different for every epoch."""
    return cfg.train.seed * 100003 + epoch


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over all ranks, as float64 on ``device``; unchanged without a process group."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def global_metrics(tr: dict, ev: Optional[dict], val_rows: int, device: torch.device) -> dict:
    """Epoch metrics over all ranks: sums all-reduced, times the slowest rank's; every val row counted once.
    ``ev`` is None when there is no validation (a refit on train+val): the metrics then have no val_* keys."""
    ev = ev or {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "count": 0}
    loss_sum, correct, count, v_loss, v_top1, v_top5, v_count = all_reduce(
        [tr["loss_sum"], tr["correct"], tr["count"], ev["loss_sum"], ev["top1"], ev["top5"], ev["count"]], device
    )
    seconds, data_wait = all_reduce([tr["seconds"], tr["data_wait_s"]], device, op="max")
    if int(v_count) != val_rows:
        raise RuntimeError(f"validation saw {int(v_count)} rows, the split has {val_rows}")
    metrics = {
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "images_per_s": count / seconds,
        "epoch_s": seconds,
        "data_wait_s": data_wait,
    }
    if val_rows:
        metrics.update(
            val_loss=v_loss / v_count, val_top1=v_top1 / v_count, val_top5=v_top5 / v_count, val_count=int(v_count)
        )
    return metrics


def training_rows(cfg: Config, meta: dict) -> int:
    """Rows an epoch trains on: the train split, plus the validation split in a final refit."""
    rows = split_rows(meta, "train", cfg.data.limit)
    return rows + split_rows(meta, "val", cfg.data.limit) if cfg.train.refit_on_val else rows


class WorkerSession:
    """Model (DDP-wrapped in a multi-rank process group), optimizer, per-step schedule, epoch loop and history.

    ``meta`` is the prepared dataset's metadata (classes, split counts, mean/std); the schedule has (training
    rows per rank // batch size) steps per epoch. ``epoch`` is the last completed epoch, ``history`` one metrics
    dict per completed epoch.
    """

    def __init__(
        self, cfg: Config, meta: dict, device: torch.device, rank: int = 0, world: int = 1, ddp: Optional[bool] = None
    ):
        self.cfg, self.meta, self.device, self.rank, self.world = cfg, meta, device, rank, world
        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.train.seed)
        num_classes = len(meta["classes"])
        model = build_model(cfg.model, num_classes).to(device)
        if cfg.model.channels_last:  # NHWC: tensor cores on GPU, oneDNN's faster kernels on CPU (~1.3x, ResNet-20)
            model = model.to(memory_format=torch.channels_last)
        if ddp if ddp is not None else world > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
            # DDP's runtime statistics synchronize on CUDA events every 100th step: sample them (almost) never
            model._set_ddp_runtime_logging_sample_rate(2**31 - 1)
        self.model = model
        self.steps = training_rows(cfg, meta) // world // cfg.train.batch_size
        self.val_rows = 0 if cfg.train.refit_on_val else split_rows(meta, "val", cfg.data.limit)
        self.optimizer = build_optimizer(model, cfg.optim, cfg.global_batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps, cfg.train.epochs)
        self.step_model = torch.compile(model) if cfg.model.compile else model
        mean, std = normalization(cfg.model, meta)
        self.settings = StepSettings(
            preprocess=Preprocess(
                cfg.model.image_size,
                mean,
                std,
                cfg.train.augment,
                cfg.train.crop_padding,
                cfg.train.hflip,
                cfg.model.channels_last,
                cfg.train.auto_augment,
                cfg.train.random_erasing,
            ),
            num_classes=num_classes,
            device=device,
            label_smoothing=cfg.optim.label_smoothing,
            grad_clip_norm=cfg.optim.grad_clip_norm,
            mixup_alpha=cfg.train.mixup_alpha,
            cutmix_alpha=cfg.train.cutmix_alpha,
            amp_dtype=torch.bfloat16 if on_gpu and cfg.train.amp else None,
        )
        self.model_meta = {
            "config": to_dict(cfg),
            "arch": cfg.model.arch,
            "num_classes": num_classes,
            "classes": meta["classes"],
            "coarse_classes": meta.get("coarse_classes"),
            "fine_to_coarse": meta.get("fine_to_coarse"),
            "image_size": cfg.model.image_size,
            "mean": list(mean),
            "std": list(std),
            "dataset": meta["name"],
            "resize": meta.get("resize") or ResizeSpec(cfg.data.image_size, cfg.data.resize).record(),
        }
        self.ema = self._new_ema()
        self.settings.grad_norms = StageGradNorms(model, device) if cfg.train.diagnostics else None
        self.epoch, self.history = 0, []

    def _new_ema(self) -> Optional[WeightEMA]:
        """The weights' moving average (train.ema_decay), started from the current weights; None when off."""
        if self.cfg.train.ema_decay is None:
            return None
        self.settings.ema = WeightEMA(self.module, self.cfg.train.ema_decay)
        return self.settings.ema

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, checkpoint ranking and the export use: the moving average when kept."""
        return self.ema.module if self.ema else self.step_model

    @property
    def module(self) -> torch.nn.Module:
        """The bare model (without the DDP wrapper)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def state(self) -> dict:
        """Training state for a checkpoint: model, optimizer (moments), last completed epoch. The schedule is
        not saved: ``restore`` rebuilds it from the config."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch}
        if self.ema:
            state["ema"] = self.ema.module.state_dict()
        return state

    def checkpoint_meta(self) -> dict:
        """What a checkpoint's meta.json holds besides the tensors (model metadata, metrics, history)."""
        return {**self.model_meta, "epoch": self.epoch, "metrics": self.history[-1], "history": self.history}

    def restore(self, state: dict, history: list) -> None:
        """Continue from a checkpoint's state (as written by ``state``) and its metrics history.

        The weights, the optimizer's moments and the number of completed epochs come from the checkpoint; the
        schedule and every hyperparameter come from this session's (possibly changed) config: a run resumed
        with more epochs follows the cosine over the new total from its current step (completed epochs x steps
        per epoch), and one resumed with more workers gets the learning rate of its new global batch.
        """
        from resnet_ray.weights import unwrap_state_dict

        self.module.load_state_dict(unwrap_state_dict(state["model"]))
        load_optimizer_moments(self.optimizer, state["optimizer"])
        if self.ema:  # the saved average, or (EMA turned on at resume) one that starts from the loaded weights
            self.ema = self._new_ema()
            if "ema" in state:
                self.ema.module.load_state_dict(unwrap_state_dict(state["ema"]))
        self.epoch, self.history = state["epoch"], list(history)
        set_schedule_step(self.scheduler, self.epoch * self.steps)
        log.info("rank %d resumed after epoch %d", self.rank, self.epoch)

    def train(
        self,
        epoch: int,
        batches: Iterable[dict],
        on_step: Optional[Callable[[int, float], None]] = None,
        log_every: int = 0,
    ) -> dict:
        """One training epoch on this rank's batches (this rank's sums, see loop.train_epoch): seeds the epoch's
        augmentation generators (on the device, and on the CPU for per-batch scalars) and freezes the backbone
        while train.freeze_backbone_epochs lasts."""
        seed = epoch_seed(self.cfg, epoch)
        s = self.settings
        s.generator = torch.Generator(device=self.device).manual_seed(seed)
        s.host_generator = torch.Generator().manual_seed(seed)
        if epoch <= self.cfg.train.freeze_backbone_epochs:
            s.frozen = [p for n, p in self.model.named_parameters() if not is_head(n)]
            s.frozen_norms = [
                m
                for n, m in self.model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not is_head(n)
            ]
        else:
            s.frozen, s.frozen_norms = [], []
        return train_epoch(
            self.step_model, batches, self.optimizer, self.scheduler, s, on_step=on_step, log_every=log_every
        )

    def run_epoch(
        self,
        epoch: int,
        train_batches: Iterable[dict],
        val_batches: Iterable[dict],
        on_step: Optional[Callable[[int, float], None]] = None,
        log_every: int = 0,
    ) -> dict:
        """Train one epoch on this rank's batches, validate on this rank's part of the validation rows (not in a
        refit on train+val), reduce the metrics over all ranks (every validation row must be seen once), append
        them to the history."""
        tr = self.train(epoch, train_batches, on_step, log_every)
        val_start = time.perf_counter()
        ev = evaluate_epoch(self.eval_model, val_batches, self.settings) if self.val_rows else None
        metrics = {
            "epoch": epoch,
            **global_metrics(tr, ev, self.val_rows, self.device),
            "lr": self.optimizer.param_groups[0]["lr"],
            "world_size": self.world,
            "val_s": time.perf_counter() - val_start,
            "backbone_frozen": epoch <= self.cfg.train.freeze_backbone_epochs,
            "finished_at": time.time(),  # wall clock: which attempt of a restarted run trained it
            **(self.settings.grad_norms.take() if self.settings.grad_norms else {}),
        }
        self.epoch = epoch
        self.history.append(metrics)
        return metrics
