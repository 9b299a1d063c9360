"""Batch preprocessing on the training device: uint8 (B, H, W, 3) in, normalized float (B, 3, S, S) out.

One code path for training (augment=True) and for validation, evaluation and inference (augment=False).
Nothing here synchronizes the host with the device: per-image randomness is drawn on the images' device from
the generator passed in (a generator on that device), and the normalization constants are created on the
device once and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from resnet_ray.augment import random_erasing, trivial_augment


@dataclass(frozen=True)
class Preprocess:
    """Device-side preprocessing. ``augment`` selects crop/flip, ``auto_augment`` / ``random_erasing`` add the
    stronger per-image augmentations of resnet_ray.augment; the evaluation twin has none of them."""

    image_size: int  # model input resolution S
    mean: tuple
    std: tuple
    augment: str = "none"  # crop | rrc | none (none = the evaluation path)
    crop_padding: int = 4
    hflip: bool = False
    channels_last: bool = False
    auto_augment: str = "none"  # none | trivialaugment (per image, after crop and resize)
    random_erasing: float = 0.0  # probability per image (after normalization)
    _constants: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def eval(self) -> Preprocess:
        """The evaluation twin of a training preprocess."""
        return Preprocess(self.image_size, self.mean, self.std, channels_last=self.channels_last)

    def normalization(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors on ``device``, built once per device and dtype."""
        key = (str(device), dtype)
        if key not in self._constants:
            self._constants[key] = tuple(
                torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device) for v in (self.mean, self.std)
            )
        return self._constants[key]

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalized float (B, 3, S, S); ``generator`` lives on the images' device."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment == "crop":
            x = random_crop(x, self.crop_padding, generator)
        if self.augment == "rrc":
            x = random_resized_crop(x, self.image_size, generator)
        elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.hflip and self.augment != "none":
            x = random_hflip(x, generator)
        if self.auto_augment == "trivialaugment":
            x = trivial_augment(x, generator)
        mean, std = self.normalization(x.device, x.dtype)
        x = (x - mean) / std
        if self.random_erasing > 0:
            x = random_erasing(x, self.random_erasing, generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()


def _rand(n: int, device, generator) -> torch.Tensor:
    """n uniform draws made on ``device`` itself (no host-to-device copy); generator on that device or None."""
    return torch.rand(n, device=device, generator=generator)


def random_crop(x: torch.Tensor, padding: int, generator=None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to H x W at a random offset per image (the CIFAR recipe)."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = (_rand(b, x.device, generator) * (2 * padding + 1)).long()
    ox = (_rand(b, x.device, generator) * (2 * padding + 1)).long()
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return out.gather(3, cols)


def random_resized_crop(
    x: torch.Tensor, size: int, generator=None, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """Per-image random area/aspect crop, resampled bilinearly to size x size in one grid_sample."""
    b = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * _rand(b, x.device, generator)
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(b, x.device, generator)
    aspect = torch.exp(log_ratio)
    sw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * _rand(b, x.device, generator) - 1) * (1 - sw)  # centre in [-1, 1] keeping the crop inside
    cy = (2 * _rand(b, x.device, generator) - 1) * (1 - sh)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_hflip(x: torch.Tensor, generator=None) -> torch.Tensor:
    flip = (_rand(x.shape[0], x.device, generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _host_generator(generator, host_generator):
    """The CPU generator for per-batch scalars: host_generator, or ``generator`` when that one is on the CPU."""
    if host_generator is not None:
        return host_generator
    if generator is None or generator.device.type == "cpu":
        return generator
    raise ValueError("mix_batch with a device generator needs a CPU host_generator for its per-batch draws")


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, generator=None, host_generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one of them, chosen at random when both are on) on soft targets (B, C).

    The pairing permutation is drawn on the images' device from ``generator``; the per-batch scalars (which of
    the two, lambda, the box) from ``host_generator`` on the CPU (defaults to ``generator`` when that is a CPU
    generator), so nothing waits on the device. Returns the mixed images and targets; with both alphas 0 the
    inputs come back unchanged.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets
    host = _host_generator(generator, host_generator)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(_rand(1, "cpu", host)) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    gammas = torch._standard_gamma(torch.full((2,), float(alpha)), generator=host)
    total = float(gammas.sum())
    lam = float(gammas[0]) / total if total > 0 else 0.5  # Beta(alpha, alpha) drawn from the host generator
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(_rand(1, "cpu", host) * h), int(_rand(1, "cpu", host) * w)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]
