"""Optimizer groups, lr scaling and the warmup + cosine schedule (no Ray)."""

import math

import pytest
import torch
from torch import nn

from resnet_ray.config import OptimConfig
from resnet_ray.optim import build_optimizer, build_scheduler, lr_factor, param_groups, peak_lr


class Tiny(nn.Module):
    """ResNet-shaped names: conv/bn backbone and an ``fc`` head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn1(self.conv1(x)).mean((2, 3)))


def test_lr_factor_warmup_linear_then_cosine():
    total, warmup, floor = 100, 10, 0.1
    warm = [lr_factor(s, total, warmup, floor) for s in range(warmup)]
    assert warm == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert diffs == pytest.approx([1 / warmup] * (warmup - 1))
    assert warm[-1] == pytest.approx(1.0)
    assert lr_factor(warmup, total, warmup, floor) == pytest.approx(1.0)
    assert lr_factor(total, total, warmup, floor) == pytest.approx(floor)
    assert lr_factor(total + 50, total, warmup, floor) == pytest.approx(floor)
    mid = (warmup + total) // 2
    assert lr_factor(mid, total, warmup, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    cosine = [lr_factor(s, total, warmup, floor) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_lr_factor_without_warmup():
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(5, 10, 0, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_reproduces_lr_factor_times_peak_for_every_group():
    cfg = OptimConfig(
        lr=0.1, backbone_lr_scale=0.1, warmup_epochs=1.5, min_lr_ratio=0.05, weight_decay=1e-4, reference_batch_size=64
    )
    model = Tiny()
    opt = build_optimizer(model, cfg, 128)
    steps_per_epoch, epochs = 4, 3
    sched = build_scheduler(opt, cfg, steps_per_epoch, epochs)
    peaks = [g["initial_lr"] for g in opt.param_groups]
    total, warmup = steps_per_epoch * epochs, 6
    x = torch.rand(2, 3, 5, 5)
    for step in range(total):
        for g, peak in zip(opt.param_groups, peaks):
            assert g["lr"] == pytest.approx(peak * lr_factor(step, total, warmup, 0.05))
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(peaks[0] * 0.05)


def test_param_groups_lr_and_weight_decay():
    cfg = OptimConfig(lr=0.1, backbone_lr_scale=0.25, weight_decay=5e-4)
    model = Tiny()
    groups = {g["name"]: g for g in param_groups(model, cfg, 0.4)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == pytest.approx(0.4)
    assert groups["backbone"]["lr"] == groups["backbone_no_decay"]["lr"] == pytest.approx(0.1)
    assert groups["head"]["weight_decay"] == groups["backbone"]["weight_decay"] == 5e-4
    assert groups["head_no_decay"]["weight_decay"] == groups["backbone_no_decay"]["weight_decay"] == 0.0
    ids = lambda name: {id(p) for p in groups[name]["params"]}  # noqa: E731
    assert ids("head") == {id(model.fc.weight)}
    assert ids("head_no_decay") == {id(model.fc.bias)}
    assert ids("backbone") == {id(model.conv1.weight)}
    assert ids("backbone_no_decay") == {id(model.bn1.weight), id(model.bn1.bias)}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_param_groups_with_ddp_prefix():
    wrapper = nn.Module()
    wrapper.module = Tiny()
    groups = {g["name"]: g for g in param_groups(wrapper, OptimConfig(backbone_lr_scale=0.5), 1.0)}
    assert {id(p) for p in groups["head"]["params"]} == {id(wrapper.module.fc.weight)}
    assert groups["backbone"]["lr"] == 0.5


def test_peak_lr_scaling():
    cfg = OptimConfig(lr=0.1, reference_batch_size=256)
    assert peak_lr(cfg, 512) == pytest.approx(0.2)
    assert peak_lr(cfg, 64) == pytest.approx(0.025)
    assert peak_lr(OptimConfig(lr=0.1, scale_lr=False), 512) == 0.1


def test_build_optimizer_sgd():
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=True, reference_batch_size=100)
    opt = build_optimizer(Tiny(), cfg, 200)
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g["momentum"] == 0.8 and g["nesterov"] is True
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.2)
    opt = build_optimizer(Tiny(), OptimConfig(name="sgd", momentum=0.5, nesterov=False), 256)
    assert all(g["nesterov"] is False and g["momentum"] == 0.5 for g in opt.param_groups)


def test_build_optimizer_adamw():
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, scale_lr=False)
    opt = build_optimizer(Tiny(), cfg, 32)
    assert type(opt) is torch.optim.AdamW
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd["head"] == 0.05 and wd["head_no_decay"] == 0.0 and wd["backbone_no_decay"] == 0.0


def test_scheduler_state_dict_round_trip(tmp_path):
    cfg = OptimConfig(lr=0.1, warmup_epochs=1, min_lr_ratio=0.1)

    def make():
        model = Tiny()
        opt = build_optimizer(model, cfg, 256)
        return opt, build_scheduler(opt, cfg, 5, 4)

    opt_a, sched_a = make()
    for _ in range(7):
        opt_a.step()
        sched_a.step()
    # the state goes through a weights_only checkpoint like the training state does
    torch.save({"scheduler": sched_a.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["scheduler"]
    opt_b, sched_b = make()  # a fresh optimizer: its lrs are still the step-0 warmup values
    sched_b.load_state_dict(state)
    assert sched_b.last_epoch == 7
    for _ in range(6):
        opt_a.step()
        sched_a.step()
        opt_b.step()
        sched_b.step()
        assert [g["lr"] for g in opt_b.param_groups] == pytest.approx([g["lr"] for g in opt_a.param_groups])
    assert sched_b.last_epoch == 13
    expected = 0.1 * lr_factor(13, 20, 5, 0.1)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(expected)
    assert not math.isclose(expected, 0.1)
