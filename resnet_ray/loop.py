"""Plain-PyTorch training and evaluation epochs (no Ray): iterables of batches in, sums/metrics out.

The training step never synchronizes the host with the device: losses and hit counts are summed on the
device and read once at the end of the epoch (and at the logging points of ``on_step``); augmentation
randomness comes from a generator on the device. ``StepSettings.sync_debug`` proves it on a GPU: every step
runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from resnet_ray.transforms import Preprocess, mix_batch


class WeightEMA:
    """Exponential moving average of a model's weights and buffers (``module``: the averaged copy, in eval mode),
    kept on the model's device and updated after every optimizer step with one foreach lerp: no host-device
    synchronization. Integer buffers (BatchNorm's step counters) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(
            zip(
                itertools.chain(self.module.parameters(), self.module.buffers()),
                itertools.chain(model.parameters(), model.buffers()),
            )
        )
        self._floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """ema <- decay * ema + (1 - decay) * model."""
        torch._foreach_lerp_([e for e, _ in self._floats], [m.detach() for _, m in self._floats], 1.0 - self.decay)
        for e, m in self._others:
            e.copy_(m)


GRAD_NORM = "grad_norm_"  # history key prefix: grad_norm_stem, grad_norm_layer1, ..., grad_norm_head


def stage_of(name: str) -> str:
    """The stage of a parameter: ``layerN`` (a residual stage), ``head`` (the classifier ``fc``), else ``stem``
    (the first conv and its norm); a DDP wrapper's ``module.`` prefix is dropped."""
    first = name.removeprefix("module.").split(".")[0]
    return "head" if first == "fc" else first if first.startswith("layer") else "stem"


class StageGradNorms:
    """The L2 norm of each stage's parameter gradients (``stage_of``), summed on the device over an epoch's steps:
    no host-device synchronization; ``take()`` reads the epoch's mean per stage once. With DDP the gradients are
    already averaged over the ranks, so every rank measures the same."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.stages: list[str] = []
        self.params, index = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                stage = stage_of(name)
                if stage not in self.stages:
                    self.stages.append(stage)
                self.params.append(p)
                index.append(self.stages.index(stage))
        self.index = torch.tensor(index, device=device)
        self.sums = torch.zeros(len(self.stages), device=device, dtype=torch.float64)
        self.steps = 0

    @torch.no_grad()
    def add(self) -> None:
        """After backward: add this step's per-stage norms (parameters without a gradient count as 0)."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not have:
            return
        norms = torch.stack(torch._foreach_norm([self.params[i].grad for i in have])).double()
        index = self.index if len(have) == len(self.params) else self.index[have]
        self.sums += torch.zeros_like(self.sums).index_add_(0, index, norms.square()).sqrt()
        self.steps += 1

    def take(self) -> dict:
        """{grad_norm_<stage>: mean over the steps since the last take}; starts a new epoch."""
        means = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        return {f"{GRAD_NORM}{stage}": value for stage, value in zip(self.stages, means)}


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
    generator: Optional[torch.Generator] = None  # per-image augmentation randomness, on ``device``
    host_generator: Optional[torch.Generator] = None  # per-batch mixup/cutmix scalars, on the CPU
    sync_debug: bool = False  # run each training step under torch.cuda.set_sync_debug_mode("error")
    ema: Optional[WeightEMA] = None  # updated after every optimizer step
    grad_norms: Optional[StageGradNorms] = None  # train.diagnostics: per-stage gradient norms, every step


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def no_sync_allowed(enabled: bool):
    """Inside: any host-device synchronization on the GPU raises (torch.cuda.set_sync_debug_mode("error"))."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off
    )


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    s: StepSettings,
    on_step: Optional[Callable[[int, float], None]] = None,
    log_every: int = 0,
) -> dict:
    """One pass over ``batches`` ({"image": uint8 BxHxWx3, "label": int64 B}); returns sums and timings.

    Returned keys: loss_sum, correct, count (images seen on this process), seconds, data_wait_s (time
    spent waiting for the next batch), steps. Accuracy is against the unmixed labels.
    ``on_step(step, loss)`` is called every ``log_every`` steps (0: never): reading the loss there is the
    only host-device synchronization inside the epoch.
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
        with no_sync_allowed(s.sync_debug and s.device.type == "cuda"):
            loss = _train_step(model, batch, optimizer, scheduler, s, loss_sum, correct)
        count += batch["label"].shape[0]
        steps += 1
        if on_step is not None and log_every and steps % log_every == 0:
            on_step(steps, float(loss))
        tick = time.perf_counter()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return {
        "loss_sum": float(loss_sum),
        "correct": int(correct),
        "count": count,
        "seconds": time.perf_counter() - start,
        "data_wait_s": wait,
        "steps": steps,
    }


def _train_step(
    model, batch, optimizer, scheduler, s: StepSettings, loss_sum: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    """One optimizer step; adds the batch's loss and hits to the device sums; returns the (device) loss."""
    labels = batch["label"].to(s.device, non_blocking=True)
    x = s.preprocess(batch["image"].to(s.device, non_blocking=True), s.generator)
    targets = smooth_one_hot(labels, s.num_classes, s.label_smoothing)
    x, targets = mix_batch(x, targets, s.mixup_alpha, s.cutmix_alpha, s.generator, s.host_generator)
    with autocast(s.device, s.amp_dtype):
        logits = model(x)
    loss = soft_cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in s.frozen:
        p.grad = None  # optimizers skip parameters without a gradient: no update, no decay, no momentum
    if s.grad_norms is not None:
        s.grad_norms.add()  # the gradient the optimizer gets, before any clipping
    if s.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    if s.ema is not None:
        s.ema.update()
    loss = loss.detach()
    loss_sum.add_(loss.double() * labels.shape[0])
    correct.add_((logits.detach().argmax(1) == labels).sum())
    return loss


@torch.no_grad()
def evaluate_epoch(model: nn.Module, batches: Iterable[dict], s: StepSettings) -> dict:
    """Sums over ``batches`` with the evaluation preprocessing: loss_sum, top1, top5, count."""
    model.eval()
    preprocess = s.preprocess.eval()
    sums = torch.zeros(3, device=s.device, dtype=torch.float64)
    count = 0
    for batch in batches:
        labels = batch["label"].to(s.device, non_blocking=True)
        with autocast(s.device, s.amp_dtype):
            logits = model(preprocess(batch["image"].to(s.device, non_blocking=True)))
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
            ]
        )
        count += labels.shape[0]
    return {**dict(zip(("loss_sum", "top1", "top5"), sums.tolist())), "count": count}
