"""Optimizer with separate backbone/head learning rates, and the per-step schedules: a linear warmup, then a
cosine decay (optim.schedule cosine) or steps of x gamma at fractions of the run (optim.schedule step)."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from resnet_ray.config import OptimConfig
from resnet_ray.model import is_head


def peak_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """Head learning rate after the linear batch-size scaling rule."""
    return cfg.lr * global_batch_size / cfg.reference_batch_size if cfg.scale_lr else cfg.lr


def param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """Four groups: backbone/head x decay/no-decay (no weight decay on biases and norm layers)."""
    groups = {}
    for name, param in model.named_parameters():
        head = is_head(name)
        decay = param.ndim > 1
        key = (head, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "name": f"{'head' if head else 'backbone'}{'' if decay else '_no_decay'}",
                "lr": lr if head else lr * cfg.backbone_lr_scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch_size: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, peak_lr(cfg, global_batch_size))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: 1/warmup at step 0 up to 1 at step warmup - 1, then 1."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup from 1/warmup to 1, then cosine to min_ratio."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_lr_factor(step: int, warmup_steps: int, milestone_steps: list, gamma: float) -> float:
    """Multiplier of the peak lr at ``step``: the linear warmup times gamma ** (milestones reached), a milestone
    counting from its own step on (He et al. 2016a: lr/10 at 32k and 48k iterations)."""
    return warmup_factor(step, warmup_steps) * gamma ** bisect.bisect_right(milestone_steps, step)


class WarmupCosine:
    """Picklable lr lambda (so the scheduler's state_dict round-trips)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.min_ratio)


class WarmupStep:
    """Picklable lr lambda of the step schedule; its state (ints, a list of ints, a float) loads with
    weights_only."""

    def __init__(self, warmup_steps: int, milestone_steps: list, gamma: float):
        self.warmup_steps, self.milestone_steps, self.gamma = warmup_steps, list(milestone_steps), gamma

    def __call__(self, step: int) -> float:
        return step_lr_factor(step, self.warmup_steps, self.milestone_steps, self.gamma)


def milestone_steps(cfg: OptimConfig, total_steps: int) -> list[int]:
    """optim.milestones (fractions of the run) as optimizer steps."""
    return [int(round(fraction * total_steps)) for fraction in cfg.milestones]


def lr_lambda(cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """The per-step lr multiplier of cfg.schedule over steps_per_epoch x epochs steps."""
    warmup, total = int(round(cfg.warmup_epochs * steps_per_epoch)), steps_per_epoch * epochs
    schedules = {
        "cosine": lambda: WarmupCosine(total, warmup, cfg.min_lr_ratio),
        "step": lambda: WarmupStep(warmup, milestone_steps(cfg, total), cfg.gamma),
    }
    return schedules[cfg.schedule]()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: call ``scheduler.step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch, epochs))


def load_optimizer_moments(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state (momentum / Adam moments, step counts) but keep the hyperparameters
    (learning rates, weight decay, momentum, betas) that ``optimizer`` was built with from the current config:
    ``load_state_dict`` would otherwise bring back the old run's."""
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a per-step LambdaLR at ``step`` (steps already taken) of its own schedule: the learning rates become
    the ones the next optimizer step uses."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler.last_epoch = step
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
