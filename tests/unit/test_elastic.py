"""Elastic runs (scaling.num_workers: [min, max]): the config, the batch and lr rule, what a worker trains with
at each world size, the forced checkpoint of a preempted epoch and the lines a user sees on a restart."""

import pytest
import torch

from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import from_dict, load_config, to_dict, to_yaml
from resnet_ray.elastic import at_world_size, batch_at, describe
from resnet_ray.optim import peak_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**values):
    base = {"train.batch_size": 64, "optim.lr": 0.1, "optim.reference_batch_size": 256, "scaling.num_workers": [1, 2]}
    return load_config(None, {**base, **values})


def test_num_workers_takes_a_count_or_a_range_that_round_trips():
    c = cfg()
    assert c.scaling.elastic and (c.scaling.min_workers, c.scaling.max_workers) == (1, 2)
    assert from_dict(to_dict(c)).scaling == c.scaling and "num_workers:\n  - 1\n  - 2\n" in to_yaml(c)
    assert c.global_batch_size == 128 and c.trial_workers == 2  # planned on all workers; trials fixed at max
    assert load_config(None, ["--scaling.num_workers", "[1, 2]"]).scaling.num_workers == (1, 2)
    fixed = cfg(**{"scaling.num_workers": [3, 3]}).scaling
    assert not fixed.elastic and fixed.num_workers == 3 and fixed.min_workers == fixed.max_workers == 3


@pytest.mark.parametrize(
    "value, message",
    [
        ([2, 1], "scaling.num_workers: needs 1 <= min <= max, got [2, 1]"),
        ([0, 2], "scaling.num_workers: needs 1 <= min <= max"),
        ([1], "scaling.num_workers: expected a count or [min, max], got [1]"),
        ([1, 2.5], "scaling.num_workers: expected a count or [min, max]"),
        ("two", "scaling.num_workers: expected a count or [min, max], got 'two'"),
        (True, "scaling.num_workers: expected a count or [min, max], got True"),
    ],
)
def test_bad_worker_ranges_name_the_field(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg(**{"scaling.num_workers": value})


def test_max_batch_size_cannot_be_below_the_batch():
    with pytest.raises(ConfigError, match="train.max_batch_size: must be >= train.batch_size=64, got 32"):
        cfg(**{"train.max_batch_size": 32})


def test_the_global_batch_holds_while_the_workers_can_absorb_it_else_the_lr_follows_the_batch():
    planned = peak_lr(cfg().optim, 128)
    # no headroom (train.max_batch_size defaults to train.batch_size): half the workers, half the batch and lr
    one = batch_at(cfg(), 1)
    assert (one.per_worker, one.global_batch, one.lr) == (64, 64, pytest.approx(planned / 2))
    # headroom: one worker takes the whole global batch, the lr stays
    roomy = batch_at(cfg(**{"train.max_batch_size": 128}), 1)
    assert (roomy.per_worker, roomy.global_batch, roomy.lr) == (128, 128, pytest.approx(planned))
    # some headroom, not enough: 3 -> 2 workers of 32 each wants 48 each; 40 fit, so the global batch is 80
    c = cfg(**{"train.batch_size": 32, "train.max_batch_size": 40, "scaling.num_workers": [1, 3]})
    two = batch_at(c, 2)
    assert (two.per_worker, two.global_batch, two.lr) == (40, 80, pytest.approx(peak_lr(c.optim, 96) * 80 / 96))
    full = batch_at(c, 3)
    assert (full.per_worker, full.global_batch, full.lr) == (32, 96, pytest.approx(peak_lr(c.optim, 96)))
    assert describe(c) == (
        "elastic run, 3 workers: batch 32 each, global 96, lr 0.0375; 2 workers: batch 40 each, global 80, "
        "lr 0.03125; 1 worker: batch 40 each, global 40, lr 0.01563"
    )


@pytest.mark.parametrize("scale_lr", [True, False])
def test_a_worker_trains_with_the_rules_batch_and_peak_lr(scale_lr):
    c = cfg(**{"optim.scale_lr": scale_lr})
    for workers in (1, 2):
        worker = at_world_size(c, workers)
        rule = batch_at(c, workers)
        assert (worker.scaling.num_workers, worker.train.batch_size) == (workers, rule.per_worker)
        # what WorkerSession builds its optimizer with
        assert peak_lr(worker.optim, worker.global_batch_size) == pytest.approx(rule.lr)
    fixed = cfg(**{"scaling.num_workers": 2})
    assert at_world_size(fixed, 2) is fixed


def test_a_preempted_epoch_is_checkpointed_even_when_not_due(monkeypatch, tmp_path):
    import ray.train
    from test_session import META, batches, tiny_cfg

    from resnet_ray import worker
    from resnet_ray.session import WorkerSession

    session = WorkerSession(tiny_cfg(**{"train.epochs": 10, "train.checkpoint_every": 5}), META, torch.device("cpu"))
    session.run_epoch(1, batches(16, 8, 0), batches(10, 5, 1))
    assert session.history[-1]["world_size"] == 1
    reported = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, **kw: reported.append(checkpoint))
    worker._report(session, {"epoch": 1})
    worker._report(session, {"epoch": 1}, checkpoint_now=True)
    assert reported[0] is None and reported[1] is not None  # epoch 1 is not due (every 5), but preempted


def test_restarts_resizes_and_preemptions_are_told_in_one_line_each():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.execution.controller.state import (
        PreemptingState,
        ResizingState,
        RestartingState,
        RunningState,
        SchedulingState,
    )
    from ray.train.v2._internal.execution.scaling_policy.scaling_policy import ResizeDecision
    from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError
    from ray.train.v2.api.preemption import PreemptionInfo

    from resnet_ray.watchdog import _controller_event

    info = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n1": [1]})
    two = ResizeDecision(num_workers=2, resources_per_worker={"CPU": 2})
    trace = 'Traceback (most recent call last):\n  File "worker.py", line 113\nRuntimeError: Connection closed by peer'
    lost = WorkerGroupError(f"[Rank 0]\n{trace}", {0: RuntimeError(), 1: ActorDiedError()})
    assert _controller_event(PreemptingState(info, 0.0), 1).startswith("a node of the run is being preempted")
    assert _controller_event(RestartingState(PreemptionError(info, False)), 1) == (
        "restarting from the latest checkpoint after a preemption (train.max_preemptions)"
    )
    assert _controller_event(RestartingState(lost), 1) == (
        "restarting from the latest checkpoint after a failure (train.max_failures): "
        "RuntimeError: Connection closed by peer"
    )
    assert _controller_event(ResizingState(two), 1).startswith("the cluster has room for 2 workers now")
    assert _controller_event(SchedulingState(two), 1) is None  # the first start: nothing to tell
    assert _controller_event(SchedulingState(two), 2) == "starting 2 workers from the latest checkpoint"
    assert _controller_event(RunningState(), 2) is None
