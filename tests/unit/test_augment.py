"""Per-image TrivialAugment and random erasing on the device: each operation against torchvision's own
functional version, randomness from the generator alone, and erasing's rectangles."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from resnet_ray.augment import OPS, apply_ops, random_erasing, trivial_augment
from resnet_ray.transforms import Preprocess


def images(b=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g).float() / 255


def one(name, x, magnitude):
    b = x.shape[0]
    return apply_ops(x, torch.full((b,), OPS.index(name)), torch.full((b,), float(magnitude)))


@pytest.mark.parametrize(
    "name, magnitude, reference",
    [
        ("brightness", 0.4, lambda x: TF.adjust_brightness(x, 1.4)),
        ("brightness", -0.7, lambda x: TF.adjust_brightness(x, 0.3)),
        ("color", 0.5, lambda x: TF.adjust_saturation(x, 1.5)),
        ("contrast", -0.6, lambda x: TF.adjust_contrast(x, 0.4)),
        ("sharpness", 0.9, lambda x: TF.adjust_sharpness(x, 1.9)),
        ("solarize", 0.3, lambda x: TF.solarize(x, 0.7)),
        ("autocontrast", 0.0, TF.autocontrast),
    ],
)
def test_color_operations_match_torchvision(name, magnitude, reference):
    x = images()
    expected = torch.stack([reference(img) for img in x])
    torch.testing.assert_close(one(name, x, magnitude), expected, atol=1e-5, rtol=0)


def test_posterize_matches_torchvision_on_8_bit_values():
    x = images()
    expected = TF.posterize((x * 255).round().to(torch.uint8), 3).float() / 255  # 8 - 5 bits removed
    torch.testing.assert_close(one("posterize", x, 5.0), expected, atol=1e-6, rtol=0)


def test_identity_and_zero_magnitude_geometry_leave_images_unchanged():
    x = images()
    for name in ("identity", "rotate", "shear_x", "translate_y"):
        torch.testing.assert_close(one(name, x, 0.0), x, atol=1e-6, rtol=0)


def test_geometry_rotates_and_translates_whole_pixels():
    x = images()
    rotated = one("rotate", x, 90.0)
    assert any(torch.allclose(rotated, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))
    shifted = one("translate_x", x, 4 / 16)  # 4 of 16 pixels: columns move by 4, zeros come in
    torch.testing.assert_close(shifted[..., 4:], x[..., :-4], atol=1e-5, rtol=0)
    assert shifted[..., :4].abs().max() == 0


def test_trivial_augment_is_one_operation_per_image_determined_by_the_generator():
    x = images(b=64, size=8)
    a = trivial_augment(x, torch.Generator().manual_seed(3))
    b = trivial_augment(x, torch.Generator().manual_seed(3))
    c = trivial_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1)
    assert 0 < changed.sum() < 64  # identity (and zero-effect draws) leave some images as they were
    assert a.min() >= 0 and a.max() <= 1


def test_random_erasing_replaces_one_rectangle_in_about_p_of_the_images():
    x = torch.zeros(400, 3, 12, 12)
    out = random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    erased = (out != 0).any(1)  # (B, H, W) pixels replaced by noise
    hit = erased.flatten(1).any(1)
    assert 150 < int(hit.sum()) < 250
    for mask in erased[hit][:50]:  # the erased pixels form one axis-aligned rectangle
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert int(mask.sum()) == len(rows) * len(cols) >= 0.02 * 144 * 0.5
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(0)), x)


def test_preprocess_applies_them_in_training_only():
    raw = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    train = Preprocess(16, (0.5,) * 3, (0.25,) * 3, augment="none", auto_augment="trivialaugment", random_erasing=1.0)
    plain = Preprocess(16, (0.5,) * 3, (0.25,) * 3)
    assert not torch.equal(train(raw, torch.Generator().manual_seed(0)), plain(raw))
    torch.testing.assert_close(train.eval()(raw), plain(raw))
