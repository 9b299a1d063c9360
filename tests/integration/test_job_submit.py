"""The real `ray job submit` command line against a real single-node Ray cluster started on loopback."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def cluster_env(token):
    """Token authentication on (as Ray 2.60 does by default), with this test's own token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def default_marker():
    """What Ray's default marker file (/tmp/ray/ray_current_cluster) holds now, or None."""
    from resnet_ray.runtime import marker_file

    path = marker_file()
    return open(path).read() if os.path.exists(path) else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head --block` with the dashboard on 127.0.0.1; terminating it stops only this cluster.

    Its own --temp-dir (short: Ray's socket paths must fit 107 bytes) keeps its `ray_current_cluster`
    marker out of /tmp/ray, where a later plain ``ray.init()`` would dial the dead cluster.
    """
    gcs, dash, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    log = open(tmp_path_factory.mktemp("cluster") / "ray-start.log", "w")
    env = cluster_env(uuid.uuid4().hex)
    temp_dir = tempfile.mkdtemp(prefix="rr-")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
         "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=6", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 when Ray's token authentication is on)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed; see {log.name}")
                time.sleep(1)
        yield address, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert f":{gcs}" not in (default_marker() or ""), "the test cluster left its address in /tmp/ray"


def submit(cluster, *args, timeout=900):
    address, env = cluster
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ROOT, "--", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_train_then_evaluate_through_ray_job_submit(cluster, tmp_path):
    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    tiny = ["--train.epochs", "1", "--model.arch", "resnet18", "--data.limit", "240", "--data.root", data]
    train = submit(cluster, "python", "jobs/train.py", "--local", *tiny, "--train.storage_path", runs,
                   "--train.name", "submitted", "--train.evaluate_test", "false")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "succeeded" in (train.stdout + train.stderr)
    run_dir = os.path.join(runs, "submitted")
    assert os.path.isfile(os.path.join(run_dir, "model", "model.json"))

    evaluate = submit(cluster, "python", "jobs/evaluate.py", "--model", run_dir, "--split", "test",
                      "--eval.num_actors", "2")
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    report = json.load(open(os.path.join(run_dir, "eval-test", "report.json")))
    assert report["total_support"] == 240 and report["split"] == "test"
    assert f"{report['accuracy']:.4f}" in open(os.path.join(run_dir, "eval-test", "report.md")).read()


def test_bad_config_fails_the_job_with_a_clear_message(cluster):
    bad = submit(cluster, "python", "jobs/train.py", "--local", "--optim.lr", "-1", timeout=300)
    assert bad.returncode != 0
    assert "error: optim.lr: must be > 0" in bad.stdout + bad.stderr


def test_job_api_refuses_requests_without_the_token(cluster):
    address, _ = cluster
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
