"""Shared fixtures: one local Ray instance per test session, tiny prepared data, quiet logs."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# tests log to MLflow file stores (when mlflow is installed), which MLflow 3 refuses without this; Ray's workers
# inherit it
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Models fetched from URIs are cached here, not in ~/.cache/resnet_ray (set before Ray starts: its
    workers inherit it)."""
    path = str(tmp_path_factory.mktemp("model-cache"))
    previous = os.environ.get("RESNET_RAY_CACHE")
    os.environ["RESNET_RAY_CACHE"] = path
    yield path
    if previous is None:
        del os.environ["RESNET_RAY_CACHE"]
    else:
        os.environ["RESNET_RAY_CACHE"] = previous


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 4 logical CPUs, more than this 2-core machine has: the search test runs two
    trials at once, each holding 2 (its driver and its Train worker). Jobs run as subprocesses by the tests
    (tests/integration/test_jobs_cli.py) declare the real core count, as users' jobs do."""
    import ray

    from resnet_ray.runtime import init_ray

    init_ray(local=True, num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def digits_prepared(data_root):
    """The embedded digits data set prepared once for the session: (DataConfig, prepared path, metadata)."""
    from resnet_ray.config import DataConfig
    from resnet_ray.data.prepare import ensure_prepared

    cfg = DataConfig(source="digits", root=data_root)
    prepared, meta = ensure_prepared(cfg)
    return cfg, prepared, meta


@pytest.fixture(scope="session")
def shared_cifar10():
    path = os.path.abspath(SHARED_CIFAR10)
    if not os.path.exists(os.path.join(path, "train.parquet")):
        pytest.skip("../shared/data/cifar10 is not present")
    return path


def tiny_config(data_root: str, storage: str, **overrides):
    """A seconds-long 2-worker CPU training config: resnet18 at 32 px on 240 digits."""
    from resnet_ray.config_files import load_config

    values = {
        "data.source": "digits",
        "data.root": data_root,
        "data.limit": 240,
        "model.arch": "resnet18",
        "model.weights": "none",
        "model.image_size": 32,
        "optim.name": "adamw",
        "optim.lr": 0.002,
        "optim.reference_batch_size": 64,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.hflip": False,
        "train.storage_path": storage,
        "train.evaluate_test": False,
        "train.keep_checkpoints": 2,
        "scaling.num_workers": 2,
        "eval.num_actors": 2,
        "eval.batch_size": 64,
        "eval.in_process_rows": 0,  # the tests' local instance would otherwise predict in the job's process
    }
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="session")
def tiny_run(ray_session, data_root, tmp_path_factory):
    """One real 2-worker TorchTrainer run with the final test evaluation, shared by several tests."""
    from resnet_ray.train import fit

    cfg = tiny_config(
        data_root, str(tmp_path_factory.mktemp("runs")), **{"train.evaluate_test": True, "train.name": "tiny"}
    )
    return cfg, fit(cfg)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root, per_class=(9, 11, 10), corrupt=()):
    """An image folder source with train/ (PNGs of random sizes from 10 to 39 px, per_class images per class;
    the (class, index) pairs in ``corrupt`` are broken files) and test/ (2 images per class)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for label, n in enumerate(per_class):
        for k in range(n):
            h, w = rng.integers(10, 40, 2)
            path = root / "train" / f"class{label}" / f"{k:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if (label, k) in corrupt:
                path.write_bytes(b"\x89PNG broken")
                continue
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
    for label in range(len(per_class)):
        for k in range(2):
            path = root / "test" / f"class{label}" / f"t{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 30, 3), 10 * label + k, np.uint8)).save(path)
    return root


def make_parquet_source(root, corrupt_rows=()):
    """train-00000/-00001 (row groups of 3 and one of 11 rows), test.parquet; PNGs of random sizes; coarse labels."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(2)
    root.mkdir()

    def png(h, w):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    row = 0
    for name, n, group in (("train-00000.parquet", 13, 3), ("train-00001.parquet", 11, 11), ("test.parquet", 6, 4)):
        blobs, labels = [], []
        for i in range(n):
            broken = name.startswith("train") and row in corrupt_rows
            blobs.append(b"broken" if broken else png(*rng.integers(8, 30, 2)))
            labels.append(i % 3)
            row += name.startswith("train")
        table = pa.table(
            {
                "image": pa.array([{"bytes": b, "path": "x.png"} for b in blobs]),
                "label": pa.array(labels, pa.int64()),
                "coarse": pa.array([label // 2 for label in labels]),
            }
        )
        pq.write_table(table, root / name, row_group_size=group)
    return root


def ctrl_c_as_in_a_terminal():
    """Popen preexec_fn: Ctrl-C's default action in the job, as a terminal's foreground job has it. A suite run in
    the background (`nohup ... &`) ignores SIGINT, and an ignored signal stays ignored in its children."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def foreground_job(args: list, **popen_kwargs):
    """A job started as a terminal's foreground job: its own process group, with Ctrl-C's default action. Yields
    the process and the list its output lines are collected in as they come; the group is SIGKILLed on the way out
    if the job still runs."""
    import signal
    import subprocess
    import threading

    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C in a terminal goes to the whole foreground group
        preexec_fn=ctrl_c_as_in_a_terminal,
        **popen_kwargs,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
