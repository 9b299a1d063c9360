"""Finding and probing the cluster address, without starting Ray."""

import os
import socket
import time
import types

import pytest

from resnet_ray.resources import ResourceError
from resnet_ray.runtime import RayConnectError, cluster_address, local_cpus, marker_file, probe


def dead_address():
    """host:port where nothing listens (a port just released by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """No RAY_ADDRESS, and Ray's marker file looked up in an empty temp dir instead of /tmp/ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return tmp_path


def test_address_comes_from_ray_address_first_then_the_marker_file(no_cluster, monkeypatch):
    assert cluster_address() == (None, "")
    marker = marker_file()
    assert marker == str(no_cluster / "ray" / "ray_current_cluster")
    os.makedirs(os.path.dirname(marker))
    with open(marker, "w") as f:
        f.write("10.0.0.7:6379\n")
    assert cluster_address() == ("10.0.0.7:6379", f"the `ray start` marker file {marker}")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # auto = what the marker says
    assert cluster_address()[0] == "10.0.0.7:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address() == ("local", "RAY_ADDRESS")


def test_a_dead_address_fails_fast_naming_it_its_source_and_the_remedy(no_cluster):
    address = dead_address()
    start = time.monotonic()
    with pytest.raises(RayConnectError) as err:
        probe(address, "RAY_ADDRESS", timeout_s=30.0)
    assert time.monotonic() - start < 10  # refused: nothing listens there, no retrying until the 30 s timeout
    assert f"cannot reach the Ray cluster at {address} (from RAY_ADDRESS)" in str(err.value)
    assert "--local" in str(err.value)
    with pytest.raises(RayConnectError, match=r"ray stop.*ray_current_cluster"):
        probe(address, "the `ray start` marker file", timeout_s=0.5)
    with pytest.raises(RayConnectError, match="is not host:port"):
        probe("somewhere", "RAY_ADDRESS", timeout_s=0.5)


def test_a_live_address_passes_the_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe(f"127.0.0.1:{server.getsockname()[1]}", "RAY_ADDRESS", timeout_s=1.0)


def test_local_cpus_default_to_the_machines_cores(monkeypatch):
    monkeypatch.delenv("RESNET_RAY_NUM_CPUS", raising=False)
    assert local_cpus() == os.cpu_count()
    assert local_cpus(6) == 6
    monkeypatch.setenv("RESNET_RAY_NUM_CPUS", "3")
    assert local_cpus() == 3
    monkeypatch.setenv("RESNET_RAY_NUM_CPUS", "many")
    with pytest.raises(ResourceError, match="RESNET_RAY_NUM_CPUS='many' is not a number"):
        local_cpus()
    with pytest.raises(ResourceError, match="at least 1 CPU"):
        local_cpus(0.5)


@pytest.mark.parametrize("failures", [1, 2])
def test_a_local_ray_that_times_out_while_starting_is_started_once_more_then_named(monkeypatch, failures):
    """Ray's node start waits a fixed 30 s for its raylet; on a loaded machine it gives up with a bare
    Exception. The local mode stops what started and tries once more, then ends with one line."""
    import ray

    import resnet_ray.runtime as runtime

    calls = []

    def init(**kwargs):
        calls.append(kwargs["dashboard_port"])
        if sum(c != "shutdown" for c in calls) <= failures:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return types.SimpleNamespace(address_info={"gcs_address": "127.0.0.1:1"})

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setenv(runtime.API_SERVER_ENV, "")
    monkeypatch.setattr(runtime, "_started_here", runtime._started_here)  # the session's instance stays its own
    if failures == 2:
        with pytest.raises(RayConnectError, match="did not start within Ray's 30 s, twice"):
            runtime.start_local(2)
    else:
        runtime.start_local(2)
        assert os.environ[runtime.API_SERVER_ENV] == f"http://127.0.0.1:{calls[-1]}"  # the second start's
    assert calls[1] == "shutdown" and len(calls) == (4 if failures == 2 else 3)


def test_quieting_ray_data_leaves_handlers_it_does_not_own_as_they_were():
    """pytest attaches its log capture to every non-propagating logger, Ray Data's too: a job run inside a test
    process must not raise that handler's level (it hid every later test's warnings)."""
    import logging

    from resnet_ray.data.load import quiet_data_progress

    theirs = logging.StreamHandler()
    logger = logging.getLogger("ray.data")
    logger.addHandler(theirs)
    try:
        quiet_data_progress()
        assert theirs.level == logging.NOTSET
        ours = [h for h in logger.handlers if type(h).__module__.startswith("ray.")]
        assert all(h.level == logging.ERROR for h in ours if not isinstance(h, logging.FileHandler))
    finally:
        logger.removeHandler(theirs)
