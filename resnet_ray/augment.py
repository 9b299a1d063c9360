"""Stronger augmentation for fine-tuning, per image, on the training device, without host-device syncs.

``trivial_augment``: TrivialAugment (Mueller & Hutter 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art
Data Augmentation") with the "wide" magnitude ranges of torchvision's TrivialAugmentWide: each image gets one
operation drawn uniformly, with a magnitude drawn uniformly from that operation's range (continuous rather than
31 bins) and a random sign where the operation has one. Operations: identity, brightness, color (saturation),
contrast, sharpness, posterize, solarize, autocontrast, rotate, shear x/y, translate x/y (torchvision's set less
equalize). Translations are fractions of the image side (TrivialAugmentWide's 32 px of a 224 px image).

``random_erasing``: Random Erasing (Zhong et al. 2020) as in timm's "pixel" mode: with probability p an image
gets one rectangle (2-33% of its area, aspect 0.3-3.3) replaced by per-pixel normal noise, after normalization.

Every random number is drawn on the images' device from the generator passed in (one on that device).
Images are float (B, 3, H, W) in [0, 1] for ``trivial_augment``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = (
    "identity",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
MAX_MAGNITUDE = {
    "brightness": 0.99,
    "color": 0.99,
    "contrast": 0.99,
    "sharpness": 0.99,
    "posterize": 6.0,
    "solarize": 1.0,
    "rotate": 135.0,
    "shear_x": 0.99,
    "shear_y": 0.99,
    "translate_x": 32 / 224,
    "translate_y": 32 / 224,
}
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_LIMITS: dict = {}  # (device, dtype) -> the magnitude limits of OPS on that device, copied there once


def _limits(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _LIMITS:
        _LIMITS[key] = torch.tensor([MAX_MAGNITUDE.get(name, 0.0) for name in OPS], dtype=dtype).to(device)
    return _LIMITS[key]


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (PIL's ImageEnhance, torchvision's _blend)."""
    return (_per_image(factor) * x + (1 - _per_image(factor)) * other).clamp(0, 1)


def _sharpness_base(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13) inside, the original pixels on the border."""
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=x.shape[1]).clamp(0, 1)
    out = x.clone()
    out[..., 1:-1, 1:-1] = smooth
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-12), torch.ones_like(high))
    low = torch.where(high > low, low, torch.zeros_like(low))
    return ((x - low) * scale).clamp(0, 1)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep ``bits`` (per image, 2..8) high bits of the 8-bit values."""
    step = _per_image(2.0 ** (8 - bits))
    return torch.floor(torch.round(x * 255) / step) * step / 255


def _geometry(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate per image (identity for the others) in one grid_sample, zero fill."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    angle = torch.where(op == OPS.index("rotate"), magnitude, torch.zeros_like(magnitude)) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output->input sampling matrix in normalized coordinates: rotating the image by +angle (counter-clockwise
    # on screen) samples the input at R(-angle); y grows downwards
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 1] += torch.where(op == OPS.index("shear_x"), magnitude, torch.zeros_like(magnitude))
    theta[:, 1, 0] += torch.where(op == OPS.index("shear_y"), magnitude, torch.zeros_like(magnitude))
    theta[:, 0, 2] = torch.where(op == OPS.index("translate_x"), -2 * magnitude, torch.zeros_like(magnitude))
    theta[:, 1, 2] = torch.where(op == OPS.index("translate_y"), -2 * magnitude, torch.zeros_like(magnitude))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply operation OPS[op[i]] with signed magnitude[i] to image i (posterize: bits removed; solarize:
    threshold as 1 - magnitude). Every operation is computed for the batch and selected per image."""
    out = _geometry(x, op, magnitude)  # identity for the non-geometric images
    factor = 1.0 + magnitude
    candidates = {
        "brightness": lambda: _blend(x, torch.zeros_like(x), factor),
        "color": lambda: _blend(x, _gray(x), factor),
        "contrast": lambda: _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor),
        "sharpness": lambda: _blend(x, _sharpness_base(x), factor),
        "posterize": lambda: _posterize(x, 8 - magnitude.abs().round()),
        "solarize": lambda: torch.where(x >= _per_image(1 - magnitude.abs()), 1 - x, x),
        "autocontrast": lambda: _autocontrast(x),
    }
    for name, compute in candidates.items():
        out = torch.where(_per_image(op == OPS.index(name)), compute(), out)
    return out


def trivial_augment(x: torch.Tensor, generator=None) -> torch.Tensor:
    """TrivialAugment (wide ranges) on float images in [0, 1]: one random operation per image."""
    b, dev = x.shape[0], x.device
    op = torch.randint(0, len(OPS), (b,), device=dev, generator=generator)
    limits = _limits(dev, x.dtype)
    sign = torch.where(torch.rand(b, device=dev, generator=generator) < 0.5, -1.0, 1.0).to(x.dtype)
    magnitude = torch.rand(b, device=dev, generator=generator, dtype=x.dtype) * limits[op] * sign
    return apply_ops(x, op, magnitude)


def random_erasing(
    x: torch.Tensor, probability: float, generator=None, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)
) -> torch.Tensor:
    """With ``probability`` per image, one rectangle replaced by standard normal noise (normalized images)."""
    b, _, h, w = x.shape
    dev = x.device
    rand = lambda: torch.rand(b, device=dev, generator=generator)  # noqa: E731
    erase = rand() < probability
    target = (area[0] + (area[1] - area[0]) * rand()) * h * w
    log_ratio = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * rand()
    eh = torch.sqrt(target * torch.exp(log_ratio)).round().clamp(1, h)
    ew = torch.sqrt(target / torch.exp(log_ratio)).round().clamp(1, w)
    top = (rand() * (h - eh + 1)).floor()
    left = (rand() * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + eh).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + ew).view(-1, 1, 1))
        & erase.view(-1, 1, 1)
    )
    noise = torch.randn(x.shape, device=dev, generator=generator, dtype=x.dtype)
    return torch.where(inside.unsqueeze(1), noise, x)
