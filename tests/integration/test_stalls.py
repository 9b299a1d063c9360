"""Stalled Ray work fails with a diagnosis in bounded time: evaluation actors and Train workers that cannot start."""

import contextlib
import signal
import time

import pytest
from conftest import tiny_config

from resnet_ray.config_files import replace
from resnet_ray.evaluate import evaluate
from resnet_ray.train import fit
from resnet_ray.watchdog import StallError

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def cpus_taken(ray, cpus):
    """Another workload holds `cpus` CPUs of the session's instance (a placement group) meanwhile."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": cpus}])
    ray.get(group.ready(), timeout=60)
    try:
        yield
    finally:
        remove_placement_group(group)
        deadline = time.monotonic() + 60  # the next tests need the CPUs back
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.5)


def test_an_evaluation_whose_actors_cannot_start_fails_with_a_diagnosis(ray_session, tiny_run, tmp_path):
    cfg, result = tiny_run
    cfg = replace(cfg, {"eval.stall_timeout_s": 10, "eval.num_actors": 1})
    start = time.monotonic()
    with cpus_taken(ray_session, ray_session.cluster_resources()["CPU"]):
        with pytest.raises(StallError) as err:
            evaluate(cfg, result.model_dir, output=str(tmp_path / "eval"))
    assert time.monotonic() - start < 120
    message = str(err.value)
    assert "evaluation of test made no progress for 10 s (eval.stall_timeout_s)" in message
    assert "free 0/4 CPU" in message and "waiting for" in message  # what is pending, what is free


def test_training_whose_workers_cannot_start_fails_with_a_diagnosis(ray_session, data_root, tmp_path, caplog):
    cfg = tiny_config(data_root, str(tmp_path), **{"train.epochs": 1, "train.stall_timeout_s": 15})
    start = time.monotonic()
    with cpus_taken(ray_session, ray_session.cluster_resources()["CPU"] - 1):  # reads fit, 2 workers do not
        with pytest.raises(StallError) as err, caplog.at_level("DEBUG", logger="resnet_ray.resources"):
            fit(cfg)
    assert time.monotonic() - start < 180
    message = str(err.value)
    assert "training made no progress for 15 s (train.stall_timeout_s) after 0 reports" in message
    assert "placement group waiting for" in message
    # the killed controller's placement group, still waiting for CPUs, is gone too: it would otherwise be
    # created now and hold 2 CPUs for the rest of this driver's life (deadlocking the next evaluation)
    groups = ray_session.util.placement_group_table().values()
    assert [g["state"] for g in groups if g["state"] != "REMOVED"] == []
    # and what it asked Ray's autoscaling coordinator for: held 180 s more otherwise, an elastic run started
    # meanwhile (a --resume) would wait that long for its workers
    withdrawn = [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if "released the Ray Data" in r.getMessage()]
    assert len(withdrawn) == 1 and withdrawn[0].startswith("train-"), caplog.text
    coordinator = ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    assert ray_session.get(coordinator.get_reserved_resources.remote(withdrawn[0]), timeout=10) == {}


def test_an_unanswering_autoscaling_coordinator_is_replaced_before_an_elastic_run(ray_session, monkeypatch):
    """Ray's AutoscalingCoordinator (a detached actor pinned to the node that created it) whose node is gone never
    answers again: an elastic run replaces it rather than wait in InitializingState for good. Stand-in: an actor
    under the coordinator's name that never finishes starting."""
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinators

    from resnet_ray import train

    @ray_session.remote(num_cpus=0)
    class Stuck:
        def __init__(self):
            time.sleep(3600)

    deadline = time.monotonic() + 30  # the session's own goes first, if an earlier test's Ray Data created it
    while True:
        try:
            ray_session.kill(ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"))
        except ValueError:  # none (left): its name is free
            break
        assert time.monotonic() < deadline, "the session's autoscaling coordinator would not go"
        time.sleep(0.5)
    stuck = Stuck.options(name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", lifetime="detached")
    stuck = stuck.remote()
    real = coordinators.get_or_create_autoscaling_coordinator
    calls = []
    monkeypatch.setattr(coordinators, "get_or_create_autoscaling_coordinator", lambda: calls.append(1) or real())
    train._live_autoscaling_coordinator(timeout_s=2)
    assert len(calls) == 2  # the stuck one, then a new one that answered
    fresh = ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    assert ray_session.get(fresh.__ray_ready__.remote(), timeout=10) and fresh._actor_id != stuck._actor_id


def test_a_job_stopped_in_training_frees_what_its_run_held(ray_session, data_root, tmp_path):
    """Ctrl-C or SIGTERM of a job while it trains (KeyboardInterrupt, SystemExit out of fit): the run's controller
    stops with it, not at the driver's exit, and what it held is free at once: its CPUs, its placement groups and
    its request with Ray's autoscaling coordinator (which would hold them 180 s more: a --resume of an elastic run
    meanwhile waited that long)."""
    import _thread
    import threading

    def train_requests() -> list:
        """The coordinator's Train requesters (Ray Data's are data-<execution id>)."""
        try:
            coordinator = ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            return []
        ask = coordinator.__ray_call__.remote(lambda actor: list(actor._ongoing_reqs))
        return [r for r in ray_session.get(ask, timeout=10) if r.startswith("train-")]

    def interrupt_once_the_run_asked():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if train_requests():
                    break
            except Exception as exc:  # said by the assertion below, not lost with this thread
                seen.append(exc)
            time.sleep(0.5)
        _thread.interrupt_main()

    seen = []
    cfg = tiny_config(data_root, str(tmp_path), **{"train.epochs": 30})
    # Python's own Ctrl-C handler: interrupt_main does nothing under SIG_IGN (a suite run under nohup) or SIG_DFL
    # (which cli.run leaves after an interrupted job)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_the_run_asked, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            fit(cfg)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not seen and train_requests() == [], seen
    groups = ray_session.util.placement_group_table().values()
    assert [g["state"] for g in groups if g["state"] != "REMOVED"] == []
    deadline = time.monotonic() + 30  # the workers go with their controller
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_session.available_resources()
        time.sleep(0.5)
