"""Plain-PyTorch train/eval epochs on tiny CPU models (no Ray)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_ray.config import ModelConfig, OptimConfig
from resnet_ray.loop import (
    StepSettings,
    WeightEMA,
    _train_step,
    evaluate_epoch,
    smooth_one_hot,
    soft_cross_entropy,
    train_epoch,
)
from resnet_ray.model import build_model
from resnet_ray.optim import build_optimizer, build_scheduler
from resnet_ray.transforms import Preprocess

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_batches(n_batches, b, size=32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, classes, (b,), generator=g),
        }
        for _ in range(n_batches)
    ]


def thirds_batches(n_batches, b, size=32, seed=0):
    """Trivially learnable: the label is which vertical third of the image is bright."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, 3, (b,), generator=g)
        images = torch.randint(0, 40, (b, size, size, 3), dtype=torch.uint8, generator=g)
        edges = [0, size // 3, 2 * size // 3, size]
        for i, c in enumerate(labels.tolist()):
            images[i, :, edges[c] : edges[c + 1]] += 200
        out.append({"image": images, "label": labels})
    return out


def settings(**kw):
    kw.setdefault("preprocess", Preprocess(32, MEAN, STD))
    return StepSettings(num_classes=3, device=CPU, **kw)


def resnet18(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="resnet18", weights="none", image_size=32), num_classes)


def optimizer(model, lr=0.05, steps=100, **kw):
    cfg = OptimConfig(lr=lr, scale_lr=False, **kw)
    opt = build_optimizer(model, cfg, 8)
    return opt, build_scheduler(opt, cfg, steps, 1)


def test_train_epoch_sums_are_consistent_with_batches():
    model = resnet18()
    opt, sched = optimizer(model)
    batches = random_batches(3, 4) + random_batches(1, 2, seed=1)
    losses = []
    out = train_epoch(
        model, batches, opt, sched, settings(), on_step=lambda step, loss: losses.append((step, loss)), log_every=1
    )
    assert set(out) == {"loss_sum", "correct", "count", "steps", "seconds", "data_wait_s"}
    assert out["count"] == 14 and out["steps"] == 4
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert out["loss_sum"] == pytest.approx(sum(loss * n for (_, loss), n in zip(losses, [4, 4, 4, 2])), rel=1e-5)
    assert isinstance(out["correct"], int) and 0 <= out["correct"] <= 14
    assert out["seconds"] >= out["data_wait_s"] >= 0
    assert sched.last_epoch == 4
    assert model.training


def test_on_step_is_called_only_at_logging_points():
    model = resnet18()
    opt, sched = optimizer(model)
    seen = []
    train_epoch(
        model, random_batches(5, 2), opt, sched, settings(), on_step=lambda step, loss: seen.append(step), log_every=2
    )
    assert seen == [2, 4]
    train_epoch(model, random_batches(2, 2), opt, sched, settings(), on_step=lambda step, loss: seen.append(step))
    assert seen == [2, 4]  # log_every=0: never


def test_train_epoch_learns_trivial_task():
    torch.manual_seed(0)
    model = resnet18()
    opt, sched = optimizer(model, lr=0.05, steps=1000)  # practically constant lr
    batches = thirds_batches(4, 8)
    s = settings()
    means = [train_epoch(model, batches, opt, sched, s)["loss_sum"] / 32 for _ in range(3)]
    assert means[-1] < means[0] * 0.5, means
    final = evaluate_epoch(model, batches, s)
    assert final["count"] == 32 and final["loss_sum"] / 32 < means[0]


def test_frozen_parameters_and_norms_stay_unchanged():
    model = resnet18()
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:  # non-trivial running stats, so a wrong update is visible
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt, sched = optimizer(model, weight_decay=1e-2, momentum=0.9)
    s = settings(frozen=backbone, frozen_norms=norms)
    train_epoch(model, random_batches(2, 4), opt, sched, s)
    for n, p in model.named_parameters():
        if n.startswith("fc."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(not m.training for m in norms)
    assert model.fc.training


def test_unfrozen_training_updates_backbone_and_running_stats():
    model = resnet18()
    before = model.conv1.weight.detach().clone()
    mean_before = model.bn1.running_mean.clone()
    opt, sched = optimizer(model)
    train_epoch(model, random_batches(1, 4), opt, sched, settings())
    assert not torch.equal(model.conv1.weight, before)
    assert not torch.equal(model.bn1.running_mean, mean_before)


class FixedLogits(nn.Module):
    """Logits chosen by the image's top-left red value (after normalization with mean 0, std 1)."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # index -> logits row
        self.w = nn.Parameter(torch.zeros(()))  # something for an optimizer

    def forward(self, x):
        idx = (x[:, 0, 0, 0] * 255).round().long()
        return self.table[idx] + self.w


def test_evaluate_epoch_counts_top1_top5_and_loss():
    classes = 7
    table = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # ranking 0,1,2,3,4,5,6
            [0.0, 1, 2, 3, 4, 5, 6],  # ranking 6,5,4,3,2,1,0
            [0.0, 0, 5, 0, 0, 0, 0],  # 2 first, then ties
        ]
    )
    model = FixedLogits(table)

    def batch(rows, labels):
        img = torch.zeros(len(rows), 4, 4, 3, dtype=torch.uint8)
        img[:, 0, 0, 0] = torch.tensor(rows, dtype=torch.uint8)
        return {"image": img, "label": torch.tensor(labels)}

    batches = [
        batch([0, 0, 0], [0, 4, 6]),  # top1, top5, miss
        batch([1, 1], [6, 0]),
    ]  # top1, miss
    s = StepSettings(preprocess=Preprocess(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), num_classes=classes, device=CPU)
    out = evaluate_epoch(model, batches, s)
    assert out["count"] == 5
    assert out["top1"] == 2 and out["top5"] == 3
    logits = torch.stack([table[0]] * 3 + [table[1]] * 2)
    expected = F.cross_entropy(logits, torch.tensor([0, 4, 6, 6, 0]), reduction="sum")
    assert out["loss_sum"] == pytest.approx(float(expected), rel=1e-6)
    assert not model.training


def test_evaluate_epoch_top5_with_fewer_than_five_classes():
    model = FixedLogits(torch.tensor([[3.0, 2, 1]]))
    img = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    s = StepSettings(preprocess=Preprocess(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), num_classes=3, device=CPU)
    out = evaluate_epoch(model, [{"image": img, "label": torch.tensor([0, 2])}], s)
    assert out == {
        "loss_sum": pytest.approx(
            float(F.cross_entropy(torch.tensor([[3.0, 2, 1]] * 2), torch.tensor([0, 2]), reduction="sum"))
        ),
        "top1": 1.0,
        "top5": 2.0,
        "count": 2.0,
    }


def test_evaluate_epoch_uses_evaluation_preprocessing():
    model = resnet18()
    batches = random_batches(2, 4)
    s = settings(
        preprocess=Preprocess(32, MEAN, STD, augment="crop", crop_padding=4, hflip=True),
        generator=torch.Generator().manual_seed(0),
    )
    a = evaluate_epoch(model, batches, s)
    b = evaluate_epoch(model, batches, s)
    assert a == b
    # and it is the eval twin: same as a settings object that never augments
    assert evaluate_epoch(model, batches, settings()) == pytest.approx(a)


def test_smooth_one_hot_rows_sum_to_one():
    labels = torch.tensor([0, 2, 1, 2])
    t = smooth_one_hot(labels, 3, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t.argmax(1).tolist() == labels.tolist()
    assert float(t[0, 0]) == pytest.approx(0.9 + 0.1 / 3)
    assert float(t[0, 1]) == pytest.approx(0.1 / 3)
    assert torch.equal(smooth_one_hot(labels, 3, 0.0), F.one_hot(labels, 3).float())


def test_soft_cross_entropy_matches_cross_entropy_with_smoothing():
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    got = soft_cross_entropy(logits, smooth_one_hot(labels, 4, 0.2))
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_train_epoch_with_mixup_and_clipping_runs():
    model = resnet18()
    opt, sched = optimizer(model)
    s = settings(
        label_smoothing=0.1,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        grad_clip_norm=1.0,
        generator=torch.Generator().manual_seed(0),
        preprocess=Preprocess(32, MEAN, STD, augment="crop", hflip=True),
    )
    out = train_epoch(model, random_batches(2, 4), opt, sched, s)
    assert out["count"] == 8 and out["steps"] == 2
    assert torch.isfinite(torch.tensor(out["loss_sum"]))


def test_training_step_reads_no_tensor_value_on_the_host(monkeypatch):
    """Every Python-level read of a tensor's value (item, float, int, bool, tolist, cpu, numpy) would be a
    host-device synchronization on a GPU; inside the steps there must be none (SGD, crop, flip, rrc, label
    smoothing, clipping, weight EMA, TrivialAugment, random erasing). The GPU check proves the same with
    torch.cuda.set_sync_debug_mode("error")."""
    model = resnet18()
    opt, sched = optimizer(model)
    reads = []

    def forbid(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    for augment in ("crop", "rrc"):
        s = settings(
            preprocess=Preprocess(32, MEAN, STD, augment, 4, True, auto_augment="trivialaugment", random_erasing=0.5),
            grad_clip_norm=1.0,
            label_smoothing=0.1,
            generator=torch.Generator().manual_seed(0),
            ema=WeightEMA(model, 0.99),
        )
        for name in ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy"):
            forbid(name)
        loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        for batch in random_batches(2, 4):
            _train_step(model, batch, opt, sched, s, loss_sum, correct)
        monkeypatch.undo()
        assert reads == [], f"{augment}: the step read tensor values on the host: {sorted(set(reads))}"


def test_counted_reports_steps_at_most_every_interval_and_after_the_last(monkeypatch):
    """The live bar's feed from rank 0: a step count, throttled by the clock (no device sync), and the final
    count always."""
    import resnet_ray.live as live

    clock = iter([0.0, 0.1, 0.6, 0.7, 0.8, 1.2, 1.3, 1.4, 1.5, 1.6])
    monkeypatch.setattr(live.time, "monotonic", lambda: next(clock))
    reported = []
    assert list(live.counted(range(6), reported.append)) == list(range(6))
    assert reported == [2, 4, 6]  # at 0.6 s (>= 0.5 after 0.0), at 1.2 s (>= 0.5 after 0.7), then the end


def test_stage_gradient_norms_are_the_norms_of_each_stages_gradients_averaged_over_the_steps():
    from resnet_ray.loop import StageGradNorms, stage_of

    assert [stage_of(n) for n in ("conv1.weight", "module.bn1.bias", "layer2.0.conv1.weight", "fc.bias")] == [
        "stem",
        "stem",
        "layer2",
        "head",
    ]
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet20", weights="none", image_size=32), 10)
    norms = StageGradNorms(model, torch.device("cpu"))
    assert norms.stages == ["stem", "layer1", "layer2", "layer3", "head"]
    expected = []
    for step in range(2):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
        if step == 1:
            model.fc.weight.grad = None  # a frozen parameter counts as 0
            model.fc.bias.grad = None
        expected.append(
            {
                stage: math.sqrt(
                    sum(
                        float((p.grad.double() ** 2).sum())
                        for n, p in model.named_parameters()
                        if stage_of(n) == stage and p.grad is not None
                    )
                )
                for stage in norms.stages
            }
        )
        norms.add()
    taken = norms.take()
    for stage in norms.stages:
        assert taken[f"grad_norm_{stage}"] == pytest.approx((expected[0][stage] + expected[1][stage]) / 2, rel=1e-6)
    assert taken["grad_norm_head"] == pytest.approx(expected[0]["head"] / 2, rel=1e-6)
    assert all(v == 0 for v in norms.take().values())  # take() starts a new epoch


def test_the_gradient_picture_draws_one_run_or_the_trials_of_a_search(tmp_path):
    from resnet_ray.plots import write_gradients_plot

    history = [
        {"epoch": e, "grad_norm_stem": 0.1 * e, "grad_norm_layer1": 1.0, "grad_norm_head": 2.0 / e} for e in (1, 2)
    ]
    assert write_gradients_plot([{"label": "run", "history": history}], str(tmp_path / "one.png"))
    trials = [{"label": f"lr {lr}", "history": history} for lr in (0.1, 0.01)]
    assert write_gradients_plot(trials, str(tmp_path / "search.png"))
    assert (tmp_path / "one.png").stat().st_size > 10_000 and (tmp_path / "search.png").stat().st_size > 10_000
    assert (
        write_gradients_plot([{"label": "off", "history": [{"epoch": 1, "train_loss": 1.0}]}], str(tmp_path / "n.png"))
        is None
    )
    assert not (tmp_path / "n.png").exists()
