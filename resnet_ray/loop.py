"""Plain-PyTorch training and evaluation epochs (no Ray): iterables of batches in, sums/metrics out."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from resnet_ray.transforms import Preprocess, mix_batch


@dataclass
class StepSettings:
    """What a training step needs besides the model and the data."""

    preprocess: Preprocess
    num_classes: int
    device: torch.device
    label_smoothing: float = 0.0
    grad_clip_norm: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    amp_dtype: Optional[torch.dtype] = None  # torch.bfloat16 on GPU, None for fp32
    frozen: list = field(default_factory=list)  # parameters whose update is skipped (frozen backbone)
    frozen_norms: list = field(default_factory=list)  # norm layers kept in eval mode (frozen backbone)
    generator: Optional[torch.Generator] = None  # CPU generator for augmentation randomness


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def train_epoch(model: nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                scheduler, s: StepSettings, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """One pass over ``batches`` ({"image": uint8 BxHxWx3, "label": int64 B}); returns sums and timings.

    Returned keys: loss_sum, correct, count (images seen on this process), seconds, data_wait_s (time
    spent waiting for the next batch), steps.
    Accuracy is against the unmixed labels.
    """
    model.train()
    for module in s.frozen_norms:
        module.eval()  # frozen backbone: running statistics stay as loaded
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.int64)
    count = steps = 0
    wait = 0.0
    start = tick = time.perf_counter()
    for batch in batches:
        wait += time.perf_counter() - tick
        labels = batch["label"].to(s.device, non_blocking=True)
        x = s.preprocess(batch["image"].to(s.device, non_blocking=True), s.generator)
        targets = smooth_one_hot(labels, s.num_classes, s.label_smoothing)
        x, targets = mix_batch(x, targets, s.mixup_alpha, s.cutmix_alpha, s.generator)
        with autocast(s.device, s.amp_dtype):
            logits = model(x)
        loss = soft_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in s.frozen:
            p.grad = None  # optimizers skip parameters without a gradient: no update, no decay, no momentum
        if s.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        count += n
        steps += 1
        if on_step is not None:
            on_step(steps, float(loss.detach()))
        tick = time.perf_counter()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return {"loss_sum": float(loss_sum), "correct": int(correct), "count": count,
            "seconds": time.perf_counter() - start, "data_wait_s": wait, "steps": steps}


@torch.no_grad()
def evaluate_epoch(model: nn.Module, batches: Iterable[dict], s: StepSettings) -> dict:
    """Sums over ``batches`` with the evaluation preprocessing: loss_sum, top1, top5, count."""
    model.eval()
    preprocess = s.preprocess.eval()
    sums = torch.zeros(4, device=s.device, dtype=torch.float64)
    for batch in batches:
        labels = batch["label"].to(s.device, non_blocking=True)
        with autocast(s.device, s.amp_dtype):
            logits = model(preprocess(batch["image"].to(s.device, non_blocking=True)))
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(labels.shape[0]), device=s.device, dtype=torch.float64)])
    return dict(zip(("loss_sum", "top1", "top5", "count"), sums.tolist()))
