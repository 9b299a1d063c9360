"""The stream watchdog on plain iterables: items pass, errors pass, a stall fails in bounded time."""

import threading
import time

import pytest

from resnet_ray.watchdog import StallError, watched


def test_items_and_errors_pass_through():
    assert list(watched(iter(range(10)), 5.0, "counting", "x.timeout")) == list(range(10))

    def failing():
        yield 1
        raise ValueError("bad row 7")

    stream = watched(failing(), 5.0, "reading", "x.timeout")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(stream)


def test_a_stalled_stream_fails_naming_the_stage_and_the_setting_and_is_closed():
    release, closed = threading.Event(), threading.Event()

    def stalling():
        try:
            yield "first"
            release.wait(30)  # a Ray Data execution whose next block never comes
            yield "late"
            yield "never"
        finally:
            closed.set()

    start = time.monotonic()
    stream = watched(stalling(), 0.5, "evaluation of test", "eval.stall_timeout_s")
    assert next(stream) == "first"
    with pytest.raises(StallError, match=r"evaluation of test made no progress for 0.5 s \(eval.stall_timeout_s\)"):
        next(stream)
    assert time.monotonic() - start < 5
    release.set()  # once the source moves again, the abandoned stream is closed, not left running
    assert closed.wait(30)


def test_a_waiting_stream_says_so_every_report_interval(monkeypatch, caplog):
    import resnet_ray.watchdog as watchdog

    monkeypatch.setattr(watchdog, "REPORT_EVERY_S", 0.2)
    release = threading.Event()

    def slow():
        yield 1
        release.wait(30)
        yield 2

    stream = watched(slow(), 10.0, "prediction of test", "eval.stall_timeout_s")
    assert next(stream) == 1
    with caplog.at_level("WARNING", logger="resnet_ray.watchdog"):
        threading.Timer(0.7, release.set).start()
        assert next(stream) == 2
    lines = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(lines) >= 2, lines
    assert lines[0].startswith("prediction of test: waiting 0 s for the next batch (eval.stall_timeout_s at 10 s)")


TWO_WORKERS = {"CPU": 2.0}
ONE_NODE_LEFT = [{"CPU": 0.0}, {"CPU": 2.0}]  # the head (0 CPUs) and one 2-CPU worker node of two
BOTH_NODES = [{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]


def test_a_run_whose_workers_no_longer_fit_stops_after_the_capacity_timeout():
    from resnet_ray.watchdog import CapacityError, CapacityWatch

    watch = CapacityWatch(2, TWO_WORKERS, timeout_s=120, pending_timeout_s=900)
    assert watch.check(0.0, BOTH_NODES, None) is None  # they fit: nothing to decide
    assert watch.check(10.0, ONE_NODE_LEFT, None) is None  # the node is gone: the wait starts
    assert watch.check(129.0, ONE_NODE_LEFT, 0) is None
    error = watch.check(131.0, ONE_NODE_LEFT, 0)
    assert isinstance(error, CapacityError)
    assert str(error) == (
        "training needs 2 workers x {CPU: 2}; the cluster has 2 nodes: 0 CPU, 2 CPU (1 of them fit now); "
        "no node pending; stopped after waiting 121 s (train.capacity_timeout_s)"
    )


def test_a_run_waits_longer_while_nodes_are_pending_and_starts_over_once_they_fit():
    from resnet_ray.watchdog import CapacityWatch

    watch = CapacityWatch(2, TWO_WORKERS, timeout_s=120, pending_timeout_s=900)
    assert watch.check(0.0, ONE_NODE_LEFT, 1) is None
    assert watch.check(500.0, ONE_NODE_LEFT, 1) is None  # the autoscaler launches a node: wait on
    assert watch.check(510.0, BOTH_NODES, 0) is None  # it came
    assert watch.check(600.0, ONE_NODE_LEFT, None) is None  # lost again: a new wait, from 600
    assert watch.check(719.0, ONE_NODE_LEFT, None) is None
    error = watch.check(901.0, ONE_NODE_LEFT, 2)  # still nothing after 301 s, though nodes are pending now
    assert error is None  # the pending bound (900 s) applies while nodes are pending
    error = watch.check(1501.0, ONE_NODE_LEFT, 2)
    assert "3 nodes" not in str(error) and "2 nodes pending (the autoscaler is launching them)" in str(error)
    assert "stopped after waiting 901 s (train.pending_node_timeout_s)" in str(error)
    assert "no autoscaler (no node comes by itself)" in CapacityWatch(1, TWO_WORKERS, 1, 1).cluster_line([], None)


def test_a_search_whose_trials_all_wait_says_so_once_a_minute(monkeypatch, caplog):
    from types import SimpleNamespace

    import resnet_ray.watchdog as watchdog
    from resnet_ray import tune

    clock = [1000.0]
    monkeypatch.setattr(tune.time, "monotonic", lambda: clock[0])
    trial_log = tune._trial_log_class()("val_top1", 2)
    pending, running = SimpleNamespace(status="PENDING"), SimpleNamespace(status="RUNNING")
    with caplog.at_level("WARNING", logger="resnet_ray.tune"):
        for t in range(0, 200, 5):  # 200 s with two trials pending and none running
            clock[0] = 1000.0 + t
            trial_log.on_step_end(iteration=t, trials=[pending, pending])
        trial_log.on_step_end(iteration=0, trials=[running, pending])  # one runs: the wait is over
        clock[0] += 120
        trial_log.on_step_end(iteration=0, trials=[pending, running])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # at 60, 120 and 180 s
    assert lines[0].startswith("waiting 60 s: 2 trials pending, none running (each needs 1 CPU for its driver")
    assert lines[0].endswith(watchdog.diagnose())


def test_serving_says_what_its_replicas_wait_for_and_fails_after_its_start_timeout(monkeypatch, caplog):
    from types import SimpleNamespace

    from ray.serve.schema import ApplicationStatus

    import resnet_ray.serve as serving
    import resnet_ray.watchdog as watchdog

    monkeypatch.setattr(watchdog, "REPORT_EVERY_S", 0.05)
    apps = {}
    monkeypatch.setattr(serving.serve, "status", lambda: SimpleNamespace(applications=apps))
    unschedulable = "Deployment 'Classifier' has 1 replica that cannot be scheduled: {CPU: 8}"
    apps["app"] = SimpleNamespace(status=ApplicationStatus.DEPLOYING, message=unschedulable)
    with caplog.at_level("WARNING", logger="resnet_ray.serve"):
        with pytest.raises(StallError, match=r"serving app: not running after 0.3 s \(serve.start_timeout_s\): Deploy"):
            serving.wait_until_running("app", 0.3, poll_s=0.01)
    assert any(r.getMessage().startswith(f"waiting 0 s for app's replicas: {unschedulable}") for r in caplog.records)
    apps["app"] = SimpleNamespace(status=ApplicationStatus.DEPLOY_FAILED, message="replica crashed: out of memory")
    with pytest.raises(
        watchdog.DeployError, match="serving app: the deployment failed: replica crashed: out of memory"
    ):
        serving.wait_until_running("app", 10, poll_s=0.01)
    apps["app"] = SimpleNamespace(status=ApplicationStatus.RUNNING, message="")
    serving.wait_until_running("app", 10, poll_s=0.01)  # returns
