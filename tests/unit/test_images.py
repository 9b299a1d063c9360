"""Any image in, one canonical size out (resnet_ray.images), and prepare of such images with the bad-image
policy, on images made here: mixed sizes, grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated, one corrupt file.

Every expected array is computed directly with Pillow / numpy, independently of the code under test."""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_ray.config import DataConfig
from resnet_ray.config_checks import ConfigError
from resnet_ray.data import prepare as prep
from resnet_ray.data.layout import DataError
from resnet_ray.images import BadImage, ResizeSpec, decode

S = 24  # the stored size of these tests
BICUBIC = Image.Resampling.BICUBIC
RNG = np.random.default_rng(0)


def _rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(im: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def make_cases() -> dict:
    """name -> (encoded bytes, the 8-bit RGB upright image it stands for, computed without the code under test)."""
    cases = {}
    wide = _rgb(30, 50)
    cases["rgb_wide"] = (_encode(Image.fromarray(wide)), wide)
    tall = _rgb(61, 37)
    cases["rgb_tall_jpeg"] = (_encode(Image.fromarray(tall), "JPEG", quality=90), None)  # lossy: from the decode
    gray = RNG.integers(0, 256, (40, 33), dtype=np.uint8)
    cases["gray"] = (_encode(Image.fromarray(gray, "L")), np.repeat(gray[..., None], 3, axis=2))
    rgba = _rgb(35, 45)
    alpha = np.where(RNG.random((35, 45)) < 0.5, 0, 255).astype(np.uint8)  # binary: exact under any blend formula
    cases["rgba"] = (
        _encode(Image.fromarray(np.dstack([rgba, alpha]), "RGBA")),
        np.where(alpha[..., None] == 0, 255, rgba).astype(np.uint8),
    )
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 8, (29, 31), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.ravel().tolist())
    cases["palette_transparent"] = (
        _encode(p, transparency=3),
        np.where(index[..., None] == 3, 255, palette[index]).astype(np.uint8),
    )
    cmyk = RNG.integers(0, 256, (26, 52, 4), dtype=np.uint8)
    c = cmyk.astype(np.int64)
    cases["cmyk_tiff"] = (
        _encode(Image.fromarray(cmyk, "CMYK"), "TIFF"),
        np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8),
    )
    deep = RNG.integers(0, 65536, (27, 44), dtype=np.uint16)
    deep8 = np.round(deep.astype(np.float64) * 255 / 65535).astype(np.uint8)
    cases["gray16"] = (_encode(Image.fromarray(deep)), np.repeat(deep8[..., None], 3, axis=2))
    stored = _rgb(20, 34)  # stored as 20 rows x 34 columns, displayed rotated 90 degrees clockwise
    cases["exif_rotated"] = (_encode(Image.fromarray(stored), exif=_exif(6)), np.rot90(stored, k=-1))
    small = _rgb(9, 14)  # upscaled
    cases["small"] = (_encode(Image.fromarray(small)), small)
    return cases


CASES = make_cases()
CORRUPT = _encode(Image.fromarray(_rgb(40, 40)))[:300]  # a truncated PNG


def expected(upright: np.ndarray, policy: str) -> np.ndarray:
    """The policy's resize computed directly (not through ImageOps.fit / pad, which the code uses)."""
    im = Image.fromarray(upright)
    w, h = im.size
    if policy == "stretch":
        return np.asarray(im.resize((S, S), BICUBIC))
    if policy == "center_crop":  # the centred square of the shorter side, resampled once
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return np.asarray(im.resize((S, S), BICUBIC, box=(left, top, left + side, top + side)))
    nw, nh = (S, round(h * S / w)) if w >= h else (round(w * S / h), S)  # pad: longer side to S, centred on black
    canvas = Image.new("RGB", (S, S), (0, 0, 0))
    canvas.paste(im.resize((nw, nh), BICUBIC), (round((S - nw) / 2), round((S - nh) / 2)))
    return np.asarray(canvas)


def _upright(name: str) -> np.ndarray:
    blob, upright = CASES[name]
    return upright if upright is not None else np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@pytest.mark.parametrize("policy", ["center_crop", "stretch", "pad"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_policy_equals_a_direct_pil_computation(name, policy):
    out = decode(CASES[name][0], ResizeSpec(S, policy))
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected(_upright(name), policy))


def test_policies_differ_where_they_should():
    blob = CASES["rgb_wide"][0]
    crop, stretch, pad = (decode(blob, ResizeSpec(S, p)) for p in ("center_crop", "stretch", "pad"))
    assert not np.array_equal(crop, stretch) and not np.array_equal(crop, pad)
    # a 50x30 image padded to 24: 24x14 in the middle, black bands of 5 rows above and below
    assert (pad[:5] == 0).all() and (pad[-5:] == 0).all() and pad[5:19].any()


def test_rgba_half_transparency_is_blended_on_white():
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red-ish on white
    out = decode(_encode(Image.fromarray(rgba, "RGBA")), ResizeSpec(S))
    expect = np.array([200 * 128 / 255 + 255 * 127 / 255, 255 * 127 / 255, 255 * 127 / 255])
    assert np.abs(out.reshape(-1, 3) - expect).max() <= 1


@pytest.mark.parametrize("policy", ["center_crop", "stretch", "pad"])
def test_exact_size_rgb_is_bit_exact(policy):
    """CIFAR's fast path: an S x S RGB image comes out untouched under every policy (lossless and JPEG)."""
    image = _rgb(S, S)
    np.testing.assert_array_equal(decode(_encode(Image.fromarray(image)), ResizeSpec(S, policy)), image)
    jpeg = _encode(Image.fromarray(image), "JPEG")
    np.testing.assert_array_equal(decode(jpeg, ResizeSpec(S, policy)), np.asarray(Image.open(io.BytesIO(jpeg))))


def test_exact_size_but_exif_rotated_is_still_rotated():
    image = _rgb(S, S)
    out = decode(_encode(Image.fromarray(image), exif=_exif(3)), ResizeSpec(S))  # 3: upside down
    np.testing.assert_array_equal(out, image[::-1, ::-1])


@pytest.mark.parametrize("blob", [CORRUPT, b"", b"not an image at all", b"\xff\xd8\xff garbage"])
def test_bad_bytes_raise_bad_image_with_a_reason(blob):
    with pytest.raises(BadImage, match="cannot decode image"):
        decode(blob, ResizeSpec(S))


def test_config_names_bad_policies():
    with pytest.raises(ConfigError, match="data.resize: 'squash' is not one of"):
        DataConfig(resize="squash")
    with pytest.raises(ConfigError, match="data.on_bad_image"):
        DataConfig(on_bad_image="ignore")


def test_record_names_policy_and_parameters():
    assert ResizeSpec(64, "pad").record() == {
        "policy": "pad",
        "size": 64,
        "resample": "bicubic",
        "exif_transpose": True,
        "alpha_background": [255, 255, 255],
        "sixteen_bit": "round(v * 255 / 65535)",
        "pad_fill": [0, 0, 0],
    }
    assert ResizeSpec.from_record(ResizeSpec(64, "stretch").record(), 32) == ResizeSpec(64, "stretch")
    assert ResizeSpec.from_record(None, 32) == ResizeSpec(32, "center_crop")


# ---------------------------------------------------------------------------
# prepare of photos: an image folder and a Parquet source


def photo_folder(root, corrupt=True) -> dict:
    """Two classes of every kind of image above (4 + 5 copies each, different pixels per class), and one corrupt
    file in class b. Returns {relative path: upright RGB image} of the good files."""
    truth = {}
    for label, copies in (("a", 4), ("b", 5)):
        for k in range(copies):
            for name, (blob, _) in CASES.items():
                ext = {"rgb_tall_jpeg": "jpg", "cmyk_tiff": "tif"}.get(name, "png")
                rel = f"{label}/{name}-{k}.{ext}"
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(blob)
                truth[rel] = _upright(name)
    if corrupt:
        with open(os.path.join(root, "b", "broken.png"), "wb") as f:
            f.write(CORRUPT)
    return truth


def read_all(prepared: str) -> list:
    files = sorted(glob.glob(os.path.join(prepared, "*", "*.parquet")))
    table = pa.concat_tables([pq.read_table(f, columns=["image"]) for f in files])
    size = json.load(open(os.path.join(prepared, "metadata.json")))["image_size"]
    return sorted(bytes(b) for b in table.column("image").to_pylist() if len(b) == size * size * 3)


def test_prepare_skip_lists_exactly_the_corrupt_file_and_records_the_policy(tmp_path):
    truth = photo_folder(tmp_path / "photos")
    cfg = DataConfig(
        source="imagefolder",
        path=str(tmp_path / "photos"),
        root=str(tmp_path / "root"),
        image_size=S,
        resize="pad",
        on_bad_image="skip",
    )
    prepared = prep.prepare(cfg)
    meta = prep.read_metadata(prepared)
    assert meta["resize"] == ResizeSpec(S, "pad").record()
    broken = str(tmp_path / "photos" / "b" / "broken.png")
    assert meta["bad_images"]["count"] == 1 and meta["bad_images"]["policy"] == "skip"
    [entry] = meta["bad_images"]["files"]
    assert entry["file"] == broken and entry["split"] == "train" and "cannot decode image" in entry["reason"]
    assert sum(meta["counts"].values()) == len(truth)
    # every good file is in the dataset, pixel for pixel as the direct computation gives it
    assert read_all(prepared) == sorted(expected(img, "pad").tobytes() for img in truth.values())


def test_prepare_error_policy_names_the_corrupt_file_and_writes_nothing(tmp_path):
    photo_folder(tmp_path / "photos")
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "photos"), root=str(tmp_path / "root"), image_size=S)
    with pytest.raises(DataError, match="cannot decode image") as err:
        prep.prepare(cfg)
    assert str(tmp_path / "photos" / "b" / "broken.png") in str(err.value)
    assert [
        p
        for p in glob.glob(str(tmp_path / "root" / "**"), recursive=True)
        if os.path.isfile(p) and not p.endswith(".lock")
    ] == []


def test_parquet_source_skip_names_file_and_row(tmp_path):
    names = sorted(CASES)
    blobs = [CASES[n][0] for n in names] * 2
    blobs[5] = CORRUPT
    labels = [i % 2 for i in range(len(blobs))]
    (tmp_path / "src").mkdir()
    pq.write_table(
        pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int64())}),
        tmp_path / "src" / "train.parquet",
    )
    cfg = DataConfig(
        source="parquet",
        path=str(tmp_path / "src"),
        root=str(tmp_path / "root"),
        image_size=S,
        on_bad_image="skip",
        val_fraction=0.2,
        test_fraction=0.2,
    )
    meta = prep.read_metadata(prep.prepare(cfg))
    assert meta["resize"]["policy"] == "center_crop" and sum(meta["counts"].values()) == len(blobs) - 1
    assert meta["bad_images"]["count"] == 1
    assert meta["bad_images"]["files"][0]["file"] == f"{tmp_path / 'src' / 'train.parquet'}: row 5"


def test_default_policies_keep_the_fingerprint_of_existing_datasets():
    """Datasets prepared before data.resize / data.on_bad_image existed keep their folder."""
    base = DataConfig(source="digits")
    assert prep.request_fingerprint(
        DataConfig(source="digits", resize="center_crop", on_bad_image="error")
    ) == prep.request_fingerprint(base)
    assert (
        len(
            {
                prep.request_fingerprint(base),
                prep.request_fingerprint(DataConfig(source="digits", resize="pad")),
                prep.request_fingerprint(DataConfig(source="digits", on_bad_image="skip")),
            }
        )
        == 3
    )
