"""Storage helpers: locks (local flock and object-store lock objects), path splitting, local copies."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from resnet_ray import storage


@pytest.fixture
def fast_locks(monkeypatch):
    monkeypatch.setattr(storage, "LOCK_POLL_S", 0.05)
    monkeypatch.setattr(storage, "LOCK_SETTLE_S", 0.05)


@pytest.mark.parametrize("uri", [False, True], ids=["local", "object"])
def test_second_holder_waits_for_the_first(tmp_path, fast_locks, uri):
    path = f"file://{tmp_path}/x.lock" if uri else str(tmp_path / "x.lock")
    events = []

    def second():
        with storage.lock(path, wait_s=10):
            events.append("second in")

    with storage.lock(path, wait_s=1):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        events.append("first out")
    thread.join(timeout=10)
    assert events == ["first out", "second in"]


@pytest.mark.parametrize("uri", [False, True], ids=["local", "object"])
def test_waiting_is_bounded_and_names_the_holder(tmp_path, fast_locks, uri):
    path = f"file://{tmp_path}/x.lock" if uri else str(tmp_path / "x.lock")
    errors = []

    def second():
        try:
            with storage.lock(path, wait_s=0.3):
                errors.append(None)
        except storage.LockTimeout as exc:
            errors.append(str(exc))

    with storage.lock(path):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=10)
    assert errors and errors[0] and path in errors[0] and f"pid {os.getpid()}" in errors[0]


def test_local_lock_of_a_killed_process_is_free_at_once(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
sys.path.insert(0, {os.getcwd()!r})
from resnet_ray import storage
with storage.lock({path!r}):
    print("held", flush=True)
    time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(storage.LockTimeout):
            with storage.lock(path, wait_s=0.2):
                pass
        holder.kill()
        holder.wait(timeout=10)
        with storage.lock(path, wait_s=5):  # the dead holder's lock is free (a LockTimeout otherwise)
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_expired_object_lock_is_taken_over_and_a_live_one_renewed(tmp_path, fast_locks):
    path = f"file://{tmp_path}/x.lock"
    storage.write_text(path, json.dumps({"host": "gone", "pid": 1, "token": "dead", "expires": time.time() - 1}))
    with storage.lock(path, wait_s=1, ttl_s=0.6):  # the dead owner's lock is taken over
        time.sleep(1.0)  # longer than the ttl: the heartbeat keeps it alive
        with pytest.raises(storage.LockTimeout):
            with storage.lock(path, wait_s=0.3):
                pass
    assert not os.path.exists(tmp_path / "x.lock")  # released


def test_split_and_local_file(tmp_path):
    assert storage.split("s3://bucket/a/b/") == ("s3://bucket/a", "b")
    assert storage.split(str(tmp_path / "runs" / "x")) == (str(tmp_path / "runs"), "x")
    storage.write_text(str(tmp_path / "c.yaml"), "a: 1\n")
    with storage.local_file(f"file://{tmp_path}/c.yaml", suffix=".yaml") as local:
        assert local != str(tmp_path / "c.yaml") and open(local).read() == "a: 1\n"
    assert not os.path.exists(local)  # the temporary copy is gone
    with storage.local_file(str(tmp_path / "c.yaml")) as local:
        assert local == str(tmp_path / "c.yaml")
    assert storage.list_names(f"file://{tmp_path}") == ["c.yaml"] and storage.list_names(str(tmp_path / "no")) == []


def test_search_and_run_resume_from_a_uri(tmp_path):
    from resnet_ray import run_folder, tune
    from resnet_ray.config import Config
    from resnet_ray.config_checks import ConfigError
    from resnet_ray.config_files import to_yaml

    storage.write_text(str(tmp_path / "exp" / tune.SEARCH_CONFIG), to_yaml(Config()))
    cfg = tune.config_for_resume(f"file://{tmp_path}/exp/", ["--tune.num_samples", "3"])
    assert (cfg.tune.storage_path, cfg.tune.name, cfg.tune.num_samples) == (f"file://{tmp_path}", "exp", 3)
    assert tune.experiment_dir(cfg) == f"file://{tmp_path}/exp"
    storage.write_text(str(tmp_path / "run" / "config.yaml"), to_yaml(Config()))
    run = run_folder.config_for_resume(f"file://{tmp_path}/run")
    assert run_folder.run_dir_of(run) == f"file://{tmp_path}/run"
    with pytest.raises(ConfigError, match="no search_config.yaml there"):
        tune.config_for_resume(f"file://{tmp_path}/run")


def test_a_new_local_folder_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with storage.new_local_folder(str(out)) as tmp:
            (Path(tmp) / "half.txt").write_text("half")
            raise RuntimeError("the export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "old.txt").exists()
    with storage.new_local_folder(str(out)) as tmp:
        (Path(tmp) / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and sorted(os.listdir(out)) == ["new.txt"]
