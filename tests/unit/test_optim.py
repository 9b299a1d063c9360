"""Optimizer groups, lr scaling and the warmup + cosine schedule (no Ray)."""

import math

import pytest
import torch
from torch import nn

from resnet_ray.config import OptimConfig
from resnet_ray.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    milestone_steps,
    param_groups,
    peak_lr,
    set_schedule_step,
    step_lr_factor,
)


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


# ---------------------------------------------------------------------------
# the step schedule (He et al. 2016a: lr/10 at 32k and 48k of 64k iterations)


def step_cfg(**kwargs):
    return OptimConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75), reference_batch_size=128, **kwargs)


def test_step_schedule_divides_the_lr_at_fractions_of_the_run():
    cfg = step_cfg()
    assert milestone_steps(cfg, 64000) == [32000, 48000]
    opt = build_optimizer(Tiny(), cfg, 128)
    sched = build_scheduler(opt, cfg, 100, 8)  # 800 steps: milestones at 400 and 600
    lrs = []
    for _ in range(800):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[399] == pytest.approx(0.1)
    assert lrs[400] == lrs[599] == pytest.approx(0.01)
    assert lrs[600] == lrs[799] == pytest.approx(0.001)
    assert len(set(round(lr, 12) for lr in lrs)) == 3


def test_the_same_step_recipe_fits_any_length():
    cfg = step_cfg()
    assert milestone_steps(cfg, 182 * 351) == [31941, 47912]  # the paper's run at 45k images, batch 128
    assert milestone_steps(cfg, 20 * 351) == [3510, 5265]
    assert milestone_steps(OptimConfig(schedule="step", milestones=(0.3,)), 10) == [3]


def test_warmup_comes_before_the_steps():
    total, warmup, milestones = 100, 10, [50, 75]
    warm = [step_lr_factor(s, warmup, milestones, 0.1) for s in range(warmup)]
    assert warm == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # the same linear warmup as cosine
    assert warm == pytest.approx([lr_factor(s, total, warmup, 0.0) for s in range(warmup)])
    assert step_lr_factor(warmup, warmup, milestones, 0.1) == 1.0
    assert step_lr_factor(49, warmup, milestones, 0.1) == 1.0
    assert step_lr_factor(50, warmup, milestones, 0.1) == pytest.approx(0.1)
    assert step_lr_factor(99, warmup, milestones, 0.1) == pytest.approx(0.01)
    cfg = step_cfg(warmup_epochs=0.5)
    opt = build_optimizer(Tiny(), cfg, 128)
    sched = build_scheduler(opt, cfg, 20, 10)  # 200 steps, 10 of warmup, milestones at 100 and 150
    assert sched.lr_lambdas[0].warmup_steps == 10 and sched.lr_lambdas[0].milestone_steps == [100, 150]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 10)


def test_cosine_stays_the_default():
    assert OptimConfig().schedule == "cosine" and OptimConfig().milestones == ()
    opt = build_optimizer(Tiny(), OptimConfig(lr=0.1, warmup_epochs=1), 256)
    sched = build_scheduler(opt, OptimConfig(lr=0.1, warmup_epochs=1), 5, 4)
    assert type(sched.lr_lambdas[0]).__name__ == "WarmupCosine"


def test_step_scheduler_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = step_cfg(warmup_epochs=1)

    def make():
        opt = build_optimizer(Tiny(), cfg, 128)
        return opt, build_scheduler(opt, cfg, 5, 4)  # 20 steps: warmup 5, milestones at 10 and 15

    opt_a, sched_a = make()
    for _ in range(8):
        opt_a.step()
        sched_a.step()
    torch.save({"scheduler": sched_a.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["scheduler"]
    opt_b, sched_b = make()
    sched_b.load_state_dict(state)
    for _ in range(10):
        opt_a.step()
        sched_a.step()
        opt_b.step()
        sched_b.step()
        assert [g["lr"] for g in opt_b.param_groups] == pytest.approx([g["lr"] for g in opt_a.param_groups])
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)
    # a resumed session puts a fresh scheduler at its step (session.restore): the lr the next step uses
    opt_c, sched_c = make()
    set_schedule_step(sched_c, 12)
    assert opt_c.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)
    assert sched_c.last_epoch == 12
