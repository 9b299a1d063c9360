"""Device-side preprocessing: eval path, crops, flips, mixup/cutmix (no Ray, tiny tensors)."""

import pytest
import torch
import torch.nn.functional as F

from resnet_ray.transforms import Preprocess, mix_batch, random_crop, random_hflip, random_resized_crop

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def images(b=4, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def hand_eval(imgs, size, mean=MEAN, std=STD):
    x = imgs.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


@pytest.mark.parametrize("size", [8, 12, 5])
def test_eval_path_matches_hand_computation(size):
    imgs = images()
    out = Preprocess(size, MEAN, STD)(imgs)
    assert out.shape == (4, 3, size, size)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hand_eval(imgs, size), atol=1e-6, rtol=0)


def test_eval_twin_drops_augmentation_and_keeps_shared_settings():
    p = Preprocess(8, MEAN, STD, augment="crop", crop_padding=2, hflip=True, channels_last=True)
    e = p.eval()
    assert e.augment == "none" and e.hflip is False
    assert (e.image_size, e.mean, e.std, e.channels_last) == (8, MEAN, STD, True)


def test_channels_last_flag():
    imgs = images()
    out = Preprocess(8, MEAN, STD, channels_last=True)(imgs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()
    plain = Preprocess(8, MEAN, STD)(imgs)
    assert plain.is_contiguous()
    torch.testing.assert_close(out, plain)


def test_random_crop_is_window_of_zero_padded_input():
    p = 2
    x = torch.rand(6, 3, 5, 7) + 0.1  # strictly positive: the zero padding is distinguishable
    out = random_crop(x, p, gen(3))
    assert out.shape == x.shape
    padded = F.pad(x, (p,) * 4)
    offsets = set()
    for i in range(x.shape[0]):
        matches = [
            (oy, ox)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + 5, ox : ox + 7])
        ]
        assert len(matches) == 1, f"image {i}: {matches}"
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets are per image


def test_random_crop_padding_zero_is_identity():
    x = torch.rand(3, 3, 4, 4)
    assert torch.equal(random_crop(x, 0, gen()), x)


def test_random_crop_seeded_generator_is_deterministic():
    x = torch.rand(8, 3, 6, 6)
    assert torch.equal(random_crop(x, 3, gen(7)), random_crop(x, 3, gen(7)))


def test_random_resized_crop_shape_and_range():
    x = torch.rand(5, 3, 10, 12) * 0.5 + 0.2  # values in [0.2, 0.7]
    out = random_resized_crop(x, 6, gen(1))
    assert out.shape == (5, 3, 6, 6)
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    assert torch.equal(out, random_resized_crop(x, 6, gen(1)))


def test_random_hflip_flips_exactly_selected_images():
    x = torch.rand(64, 3, 4, 5)
    out = random_hflip(x, gen(11))
    selected = torch.rand(64, generator=gen(11)) < 0.5
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    for i in range(64):
        assert flipped[i] if selected[i] else kept[i]
    assert 0 < sum(selected.tolist()) < 64
    assert torch.equal(out, random_hflip(x, gen(11)))


def test_preprocess_none_ignores_hflip():
    imgs = images(16)
    p = Preprocess(8, MEAN, STD, augment="none", hflip=True)
    torch.testing.assert_close(p(imgs, gen(0)), hand_eval(imgs, 8), atol=1e-6, rtol=0)


def test_preprocess_crop_with_hflip_deterministic_and_differs_from_eval():
    imgs = images(16)
    p = Preprocess(8, MEAN, STD, augment="crop", crop_padding=2, hflip=True)
    a, b = p(imgs, gen(5)), p(imgs, gen(5))
    assert a.shape == (16, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, p.eval()(imgs))


def test_preprocess_rrc_shape():
    out = Preprocess(6, MEAN, STD, augment="rrc")(images(3, 10, 10), gen())
    assert out.shape == (3, 3, 6, 6) and out.dtype == torch.float32


def test_mix_batch_zero_alphas_unchanged():
    x = torch.rand(4, 3, 4, 4)
    t = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    x2, t2 = mix_batch(x, t, 0.0, 0.0, gen())
    assert x2 is x and t2 is t


def test_mixup_targets_are_convex_combos_of_two_one_hots():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    t = F.one_hot(labels, 5).float()
    x = torch.rand(8, 3, 4, 4)
    x2, t2 = mix_batch(x, t, 0.4, 0.0, gen(2))
    assert x2.shape == x.shape
    torch.testing.assert_close(t2.sum(1), torch.ones(8))
    assert (t2 >= 0).all()
    # each row: lam * onehot(i) + (1 - lam) * onehot(perm[i]) with one lam for the batch
    perm = torch.randperm(8, generator=gen(2))  # mixup only: the generator's first draw is the permutation
    for i in range(8):
        nz = t2[i].nonzero().flatten().tolist()
        assert len(nz) in (1, 2)
        assert set(nz) <= {int(labels[i]), int(labels[perm[i]])}
    lam_candidates = [float(t2[i, labels[i]]) for i in range(8) if labels[i] != labels[perm[i]]]
    assert lam_candidates
    lam = lam_candidates[0]
    assert all(abs(v - lam) < 1e-6 for v in lam_candidates)
    torch.testing.assert_close(x2, lam * x + (1 - lam) * x[perm])


def test_cutmix_shape_and_targets_sum_to_one():
    torch.manual_seed(0)
    t = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    x = torch.rand(4, 3, 8, 8)
    x2, t2 = mix_batch(x, t, 0.0, 1.0, gen(4))
    assert x2.shape == x.shape
    torch.testing.assert_close(t2.sum(1), torch.ones(4))
    assert (t2 >= 0).all() and (t2 <= 1).all()
    # one box is pasted from the permuted batch; the target weight of the own label is the kept area
    perm = torch.randperm(4, generator=gen(4))  # cutmix only: the generator's first draw is the permutation
    labels = t.argmax(1)
    for i in range(4):
        own = (x2[i] == x[i]).all(0)
        pasted = (x2[i] == x[perm[i]]).all(0)
        assert (own | pasted).all()
        if labels[i] != labels[perm[i]]:
            torch.testing.assert_close(t2[i, labels[i]], own.float().mean())


def test_mix_batch_deterministic_with_same_generator_and_global_seed():
    x = torch.rand(6, 3, 4, 4)
    t = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    torch.manual_seed(0)
    a = mix_batch(x, t, 0.4, 1.0, gen(9))
    torch.manual_seed(0)
    b = mix_batch(x, t, 0.4, 1.0, gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mix_batch_determined_by_generator_alone():
    x = torch.rand(6, 3, 4, 4)
    t = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    torch.manual_seed(1)
    a = mix_batch(x, t, 0.4, 0.0, gen(9))
    torch.manual_seed(2)
    b = mix_batch(x, t, 0.4, 0.0, gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
