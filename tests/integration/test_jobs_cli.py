"""The jobs as a user runs them (subprocesses): a dead cluster address, a 2-CPU Ray, a Parquet-trained run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import foreground_job, tiny_config

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job_env(**values):
    """This worktree's package, no inherited cluster address, wide log lines (rich wraps at COLUMNS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=ROOT, COLUMNS="250", **values)
    return env


def job(script, *args, **env):
    return subprocess.Popen(
        [sys.executable, os.path.join("jobs", script), *args],
        cwd=ROOT,
        env=job_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout):
    """(exit status, output) of a job started by job(); killed (and the test failed) after timeout s."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} still ran after {timeout} s")
    return proc.returncode, out


def test_a_job_pointed_at_a_dead_cluster_exits_within_60_s_naming_the_address(tmp_path):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    # a `ray start` marker left behind by a crashed cluster, in a temp dir that Ray reads instead of /tmp/ray
    marker = tmp_path / "ray" / "ray_current_cluster"
    marker.parent.mkdir()
    marker.write_text(dead)
    start = time.monotonic()
    by_env = job("train.py", "--train.epochs", "1", RAY_ADDRESS=dead)
    by_marker = job(
        "evaluate.py",
        "--model",
        str(tmp_path),
        "--config",
        os.path.join(ROOT, "configs", "local.yaml"),
        RAY_TMPDIR=str(tmp_path),
    )
    (rc_env, out_env), (rc_marker, out_marker) = finish(by_env, 90), finish(by_marker, 90)
    assert time.monotonic() - start < 60
    assert rc_env == 1 and f"error: cannot reach the Ray cluster at {dead} (from RAY_ADDRESS)" in out_env, out_env
    assert rc_marker == 1, out_marker
    assert f"at {dead} (from the `ray start` marker file {marker})" in out_marker
    assert "ray stop" in out_marker and "--local" in out_marker


def test_ray_address_local_evaluates_on_two_cpus_with_fewer_actors(tiny_run, tmp_path):
    cfg, result = tiny_run
    out_dir = tmp_path / "eval"
    rc, out = finish(
        job(
            "evaluate.py",
            "--model",
            result.run_dir,
            "--eval.num_actors",
            "2",
            "--output",
            str(out_dir),
            RAY_ADDRESS="local",
            RESNET_RAY_NUM_CPUS="2",
        ),
        600,
    )
    assert rc == 0, out[-3000:]
    # a plain 2-CPU Ray instance: the pool is resized, with a warning
    assert "eval.num_actors: 2 actors" in out and "do not fit on 1 node: 2 CPU; using 1" in out
    report = json.load(open(out_dir / "report.json"))
    assert report["total_support"] == 240 and report["dataset"] == "digits"


def write_parquet_source(folder, n_train=300, n_test=100):
    """A Parquet source (PNG bytes + labels, own class names) made from the embedded digits."""
    import io

    from PIL import Image

    from resnet_ray.config import DataConfig
    from resnet_ray.data.digits import read_digits

    digits = read_digits(DataConfig()).splits["train"]
    folder.mkdir()
    for name, rows in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        blobs = []
        for image in digits.images[rows]:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        pq.write_table(
            pa.table(
                {"image": pa.array(blobs, pa.binary()), "label": pa.array(np.asarray(digits.labels[rows]), pa.int64())}
            ),
            folder / f"{name}.parquet",
        )
    (folder / "classes.json").write_text(json.dumps([f"digit-{i}" for i in range(10)]))


def test_a_parquet_trained_run_is_evaluated_again_with_local_and_model(ray_session, tmp_path):
    from resnet_ray.train import fit

    write_parquet_source(tmp_path / "source")
    cfg = tiny_config(
        str(tmp_path / "datasets"),
        str(tmp_path / "runs"),
        **{
            "data.source": "parquet",
            "data.path": str(tmp_path / "source"),
            "data.name": "digitspq",
            "train.epochs": 1,
            "train.name": "pq",
        },
    )
    run = fit(cfg)
    rc, out = finish(job("evaluate.py", "--local", "--model", run.run_dir), 600)  # the README's command
    assert rc == 0, out[-3000:]
    report = json.load(open(os.path.join(run.run_dir, "eval-test", "report.json")))
    assert report["dataset"] == "digitspq" and report["total_support"] == 100
    assert report["config"]["data"]["root"] == str(tmp_path / "datasets")  # the model's config, not local.yaml
    assert [c["class"] for c in report["per_class"]][:2] == ["digit-0", "digit-1"]


def test_local_training_on_a_small_image_folder_finishes_with_its_test_evaluation(tmp_path):
    """A new user's first run: 3 classes x 20 photos in class folders (no train/test split of their own), the
    README's local mode. The validation split is far under calibration.MIN_ROWS: the model keeps T = 1 and says
    why, and the run ends with its test evaluation, exit status 0."""
    from PIL import Image

    from resnet_ray.calibration import MIN_ROWS

    rng = np.random.default_rng(0)
    for label in range(3):
        (tmp_path / "photos" / f"kind{label}").mkdir(parents=True)
        for k in range(20):
            h, w = rng.integers(24, 64, 2)
            pixels = np.clip(rng.normal(60 + 60 * label, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / f"kind{label}" / f"{k:02d}.jpg")
    runs = tmp_path / "runs"
    rc, out = finish(
        job(
            "train.py",
            "--local",
            *("--data.source", "imagefolder", "--data.path", str(tmp_path / "photos")),
            *("--data.root", str(tmp_path / "datasets"), "--data.image_size", "32"),
            *("--model.arch", "resnet18", "--train.epochs", "2", "--train.batch_size", "8"),
            *("--train.storage_path", str(runs), "--train.name", "small"),
        ),
        900,
    )
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out
    info = json.load(open(runs / "small" / "model" / "model.json"))
    rows = info["calibration"]["rows"]
    assert 0 < rows < MIN_ROWS and info["temperature"] == 1.0 and not info["calibration"]["fitted"]
    assert f"temperature 1 (not fitted: only {rows} val rows; a fit needs at least {MIN_ROWS})" in out
    report = json.load(open(runs / "small" / "eval-test" / "report.json"))
    assert report["total_support"] == 12  # 20% of the 60 photos carved for test (data.test_fraction), each once
    assert "total support 12" in out


def test_ctrl_c_of_a_training_run_says_what_was_kept_and_its_resume_command_finishes_it(digits_prepared, tmp_path):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) once epoch 1's checkpoint is registered:
    exit status 130 within a minute, one line naming the kept epoch and the exact `--resume` command, no traceback,
    none of the job's processes left. That command, run as printed, trains the remaining epochs only, and shows
    the README's local mode as a user sees it: no Ray noise (its INFO lines, its workers' output, 'Reporting training
    result'), one log line per epoch, then the summary tables and the test evaluation's."""
    import shlex

    from resnet_ray.run_folder import latest_checkpoint_epoch

    data_cfg, _, _ = digits_prepared
    run = tmp_path / "runs" / "stopped"
    common = ("--model.arch", "resnet18", "--data.limit", "240", "--data.root", data_cfg.root)
    with foreground_job(
        [sys.executable, "jobs/train.py", "--local", *common, "--train.epochs", "4", "--train.checkpoint_every", "1"]
        # each epoch's checkpoint registered before the next starts: Ctrl-C lands with epochs to go (each takes ~3 s)
        + ["--train.async_checkpoint", "false", "--train.storage_path", str(run.parent), "--train.name", "stopped"],
        cwd=ROOT,
        env=job_env(),
    ) as (proc, lines):
        deadline = time.monotonic() + 600
        while latest_checkpoint_epoch(str(run)) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        stopped_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    out = "".join(lines)
    assert rc == 130 and time.monotonic() - stopped_at < 60, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("interrupted by SIGINT"))
    kept = latest_checkpoint_epoch(str(run))
    command = f"python jobs/train.py --resume {run} --local"
    assert line == f"interrupted by SIGINT: kept the checkpoint of epoch {kept} in {run}; continue with: {command}"
    deadline = time.monotonic() + 30  # the local Ray instance's processes stop with the job
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "processes of the interrupted job remain"
        time.sleep(0.5)

    argv = shlex.split(line.split("continue with: ")[1])
    rc, out = finish(
        subprocess.Popen(
            [sys.executable, *argv[1:]],
            cwd=ROOT,
            env=job_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
        600,
    )
    assert rc == 0, out[-3000:]
    history = [json.loads(line) for line in open(run / "history.jsonl")]
    assert kept < 4 and [h["epoch"] for h in history] == [1, 2, 3, 4]  # each once: the resume trained the rest
    assert (run / "model" / "model.pt").exists()
    # nothing before the summary but our epoch lines (the local mode evaluates its few test images in the job's
    # process: no actor whose creation Ray's C++ core would comment on)
    lines = [line for line in out.splitlines() if line.strip()]
    summary = next(i for i, line in enumerate(lines) if "Training run" in line)
    assert all(" epoch " in line for line in lines[:summary]), lines[:summary]
    # (the epochs before the interruption too: the run's whole history, each epoch once)
    assert [line.split(" epoch ")[1].split()[0] for line in lines[:summary]] == ["1/4", "2/4", "3/4", "4/4"]
    assert "Reporting training result" not in out and "Traceback" not in out and "Warning" not in out
    assert "accuracy" in out and "total support 240" in out  # the evaluation summary follows


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
