"""Any image in, one canonical size out: decoding, EXIF orientation, 8-bit RGB, and the resize policies.

Shared by ``prepare`` (user images -> the stored size ``data.image_size``) and the inference jobs (unlabeled
images -> the stored size of the model's training data), so that a model sees new images exactly as it saw its
training images. No Ray, no torch. Decoding a batch under the bad-image policy is
:func:`resnet_ray.data.layout.decode_batch`.

Steps, in order, for one encoded image:

1. decode with Pillow (formats in :data:`PIL_FORMATS`; an animated image gives its first frame);
2. apply the EXIF orientation (``ImageOps.exif_transpose``);
3. convert to 8-bit RGB: grayscale, palette and CMYK by Pillow's ``convert("RGB")``; anything with an alpha
   channel (RGBA, LA, a palette with transparency) composited on white; 16-bit integer grayscale scaled to
   8 bits (``round(v * 255 / 65535)``, not clipped as ``convert`` would; 32-bit values above 65535 clip);
4. resize to ``size x size`` by the policy:

   - ``center_crop`` (default): the centred square of side = the shorter side, resampled to size x size in one
     step (``ImageOps.fit``): the same as resizing the shorter side to ``size`` and cropping the centre, with a
     single interpolation;
   - ``stretch``: the whole image resampled to size x size (the aspect ratio is not kept);
   - ``pad``: the whole image resampled to fit inside size x size (longer side = size, aspect ratio kept) and
     centred on a black square (``ImageOps.pad``).

   Resampling is Pillow's bicubic filter, which is antialiased when downscaling. An image that is already
   ``size x size`` RGB (CIFAR, or a prepared image) is taken as is, bit for bit, under every policy.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from resnet_ray.config import RESIZE_POLICIES

# Pillow's decoders for ordinary image files (JPEG covers MPO, the phones' multi-picture JPEG); EPS and PDF are
# left out on purpose: EPS runs Ghostscript on the file
PIL_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "WEBP", "GIF", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "AVIF")
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".bmp",
    ".webp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".ico",
    ".jp2",
    ".mpo",
    ".avif",
)
RESAMPLE = "bicubic"
PAD_FILL = (0, 0, 0)  # black around a padded image
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class BadImage(ValueError):
    """An image that cannot be decoded or converted; the message is the reason (the caller names the file)."""


@dataclass(frozen=True)
class ResizeSpec:
    """How every encoded image becomes a ``size x size`` RGB uint8 array."""

    size: int
    policy: str = "center_crop"  # one of RESIZE_POLICIES

    def __post_init__(self):
        if self.policy not in RESIZE_POLICIES:
            raise ValueError(f"resize policy {self.policy!r} is not one of {', '.join(RESIZE_POLICIES)}")
        if self.size < 1:
            raise ValueError(f"resize size must be >= 1, got {self.size}")

    def record(self) -> dict:
        """The policy and every parameter, as recorded in metadata.json and model.json."""
        out = {
            "policy": self.policy,
            "size": self.size,
            "resample": RESAMPLE,
            "exif_transpose": True,
            "alpha_background": list(ALPHA_BACKGROUND),
            "sixteen_bit": "round(v * 255 / 65535)",
        }
        if self.policy == "pad":
            out["pad_fill"] = list(PAD_FILL)
        return out

    @classmethod
    def from_record(cls, record: Optional[dict], default_size: int) -> ResizeSpec:
        """Back from a recorded dict; a record-less (older) dataset or model means center_crop at default_size."""
        if not record:
            return cls(default_size)
        return cls(int(record.get("size", default_size)), record.get("policy", "center_crop"))


def to_rgb(im):
    """A decoded Pillow image -> its 8-bit RGB equivalent (see the module docstring, step 3)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(im, dtype=np.int64)
        gray = (np.clip(values, 0, 65535) * 255 + 32767) // 65535  # round(v * 255 / 65535), integers only
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return im.convert("L").convert("RGB")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def resize(im, spec: ResizeSpec):
    """An RGB Pillow image -> ``spec.size`` square by ``spec.policy`` (see the module docstring, step 4)."""
    from PIL import Image, ImageOps

    size = (spec.size, spec.size)
    if im.size == size:
        return im
    method = Image.Resampling.BICUBIC
    if spec.policy == "center_crop":
        return ImageOps.fit(im, size, method)
    if spec.policy == "stretch":
        return im.resize(size, method)
    return ImageOps.pad(im, size, method, color=PAD_FILL)


def open_image(blob: bytes):
    """Decode encoded bytes into a loaded Pillow image; BadImage with the reason when they are not one."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(blob), formats=PIL_FORMATS)
        im.load()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, bombs, ...
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # the same reason every time
        raise BadImage(f"cannot decode image ({type(exc).__name__}: {detail})") from None
    if im.width < 1 or im.height < 1:
        raise BadImage(f"image is {im.width}x{im.height}")
    return im


def decode(blob: bytes, spec: ResizeSpec) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB; BadImage with the reason when they cannot be."""
    from PIL import ImageOps

    im = open_image(blob)
    upright = im.getexif().get(EXIF_ORIENTATION, 1) in (None, 1)
    if im.mode == "RGB" and im.size == (spec.size, spec.size) and upright:
        return np.asarray(im)  # the exact-size fast path (CIFAR): no conversion, no resampling
    try:
        im = ImageOps.exif_transpose(im) or im
        return np.asarray(resize(to_rgb(im), spec))
    except Exception as exc:  # a broken EXIF block, an unconvertible mode, ...
        raise BadImage(
            f"cannot convert image ({im.mode} {im.width}x{im.height}: {type(exc).__name__}: {exc})"
        ) from None
