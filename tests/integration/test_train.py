import glob
import json
import os
import shutil

import pytest
import ray.train
from conftest import tiny_config
from rich.console import Console
from tensorboard_events import read_events

from resnet_ray import storage
from resnet_ray.console import print_training_summary
from resnet_ray.run_folder import config_for_resume
from resnet_ray.saved_model import load_model
from resnet_ray.train import fit
from resnet_ray.worker import FAILURE_MARKER

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_top1",
    "val_top5",
    "val_count",
    "lr",
    "images_per_s",
    "epoch_s",
    "data_wait_s",
    "val_s",
    "backbone_frozen",
    "report_s",
    "config",
    "finished_at",
    "world_size",
    # train.diagnostics: the mean gradient norm of each stage of the tiny ResNet-18
    *(f"grad_norm_{stage}" for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "head")),
}


def test_two_worker_run_reports_checkpoints_and_exports(tiny_run):
    cfg, result = tiny_run
    assert [h["epoch"] for h in result.history] == [1, 2]
    for row in result.history:
        assert set(row) == METRIC_KEYS
        assert all(row[f"grad_norm_{stage}"] > 0 for stage in ("stem", "layer4", "head"))
        assert row["val_count"] == 144 and row["world_size"] == 2  # the whole validation split, each image once
        assert 0.0 <= row["val_top1"] <= row["val_top5"] <= 1.0
    checkpoints = sorted(p for p in glob.glob(os.path.join(result.run_dir, "checkpoint_*")) if os.path.isdir(p))
    assert 1 <= len(checkpoints) <= cfg.train.keep_checkpoints
    for folder in checkpoints:
        assert {"state.pt", "meta.json"} <= set(os.listdir(folder))
    meta = json.load(open(os.path.join(checkpoints[-1], "meta.json")))
    assert meta["config"]["train"]["name"] == "tiny" and meta["classes"] == [str(i) for i in range(10)]
    assert storage.exists(os.path.join(result.run_dir, "config.yaml"))
    assert open(os.path.join(result.run_dir, "history.csv")).read().count("\n") == 3
    assert open(os.path.join(result.run_dir, "history.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    loaded = load_model(result.model_dir)
    assert loaded.info["num_classes"] == 10 and loaded.info["epoch"] == result.best["epoch"]
    assert result.best["val_top1"] == max(h["val_top1"] for h in result.history)
    console = Console(record=True, width=200)
    print_training_summary(result, console)
    shown = console.export_text()
    assert f"{result.history[-1]['val_top1']:.4f}" in shown and result.model_dir in shown
    assert f"temperature {result.calibration['temperature']:.4g} fitted on val (144 rows" in shown
    assert "most confident mistakes (" in shown and f"{result.evaluation['output']}/errors.png" in shown
    # TensorBoard: every epoch's metrics, sparse step scalars, the hyperparameters
    scalars, _ = read_events(os.path.join(result.run_dir, "tensorboard"))
    assert [(e, round(v, 4)) for e, v in scalars["val/top1"]] == [
        (h["epoch"], round(h["val_top1"], 4)) for h in result.history
    ]
    assert len(scalars["step/train_loss"]) >= 2 and "time/report_s" in scalars
    _, plugins = read_events(os.path.join(result.run_dir, "tensorboard", "hparams"))
    assert "hparams" in plugins


def test_the_driver_logs_one_line_per_epoch(tiny_run, caplog):
    from resnet_ray.live import EpochLog

    cfg, result = tiny_run
    with caplog.at_level("INFO", logger="resnet_ray.live"):
        EpochLog(result.run_dir, cfg.train.epochs).poll()
    lines = [r.getMessage() for r in caplog.records if r.name == "resnet_ray.live"]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert f"top1 {result.history[1]['val_top1']:.4f}" in lines[1] and "ETA 00:00:00" in lines[1]


def test_on_a_terminal_the_driver_shows_rank_0s_steps_in_a_live_bar(tiny_run):
    """The bar reads (epoch, step, steps) from the progress actor that rank 0 updates; it is drawn on a terminal
    only, and it replaces itself epoch by epoch."""
    import io

    import ray
    from rich.console import Console

    from resnet_ray.live import EpochLog, step_progress_actor

    cfg, result = tiny_run
    actor = step_progress_actor()
    try:
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, width=120)
        log = EpochLog(result.run_dir, cfg.train.epochs, progress=actor, console=console)
        with log:
            ray.get(actor.update.remote(1, 3, 6))
            log.poll_steps()
            assert log.bar.tasks[0].description == "epoch 1/2" and log.bar.tasks[0].completed == 3
            ray.get(actor.update.remote(2, 1, 6))
            log.poll_steps()
            assert log.bar.tasks[0].description == "epoch 2/2" and log.bar.tasks[0].completed == 1
            assert log.bar.tasks[0].total == 6
        assert "epoch 2/2" in out.getvalue()
        assert EpochLog(result.run_dir, 2, progress=actor, console=Console(file=io.StringIO())).bar is None
    finally:
        ray.kill(actor)


@pytest.fixture(scope="module")
def failing_run(ray_session, data_root, tmp_path_factory):
    """A 3-epoch run checkpointed every 2 epochs (and at the end) whose last worker is killed once after
    epoch 2; one restart allowed."""
    cfg = tiny_config(
        data_root,
        str(tmp_path_factory.mktemp("runs")),
        **{
            "train.epochs": 3,
            "train.fail_at_epoch": 2,
            "train.max_failures": 1,
            "train.checkpoint_every": 2,
            "train.name": "failover",
        },
    )
    return cfg, fit(cfg)


def test_worker_failure_resumes_without_losing_or_repeating_epochs(failing_run):
    cfg, result = failing_run
    assert os.path.exists(os.path.join(result.run_dir, FAILURE_MARKER))  # the failure did happen
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    lines = open(os.path.join(result.run_dir, "history.jsonl")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # checkpoints only where due (epoch 2 and the last one), each holding the history up to its epoch
    epochs = {}
    for folder in glob.glob(os.path.join(result.run_dir, "checkpoint_*", "meta.json")):
        meta = json.load(open(folder))
        epochs[meta["epoch"]] = [h["epoch"] for h in meta["history"]]
    assert epochs == {2: [1, 2], 3: [1, 2, 3]}
    assert all(h["report_s"] > 0 for h in result.history[2:])  # epochs run after the restart
    # the restart resumed from epoch 2's checkpoint: epochs 1-2 were trained before the failure, 3 after it
    killed_at = os.path.getmtime(os.path.join(result.run_dir, FAILURE_MARKER))
    assert [h["finished_at"] < killed_at for h in result.history] == [True, True, False]


def test_stopped_run_resumes_and_same_seed_gives_same_first_epoch(failing_run, data_root, tmp_path):
    _, reference = failing_run
    cfg = tiny_config(
        data_root,
        str(tmp_path),
        **{"train.epochs": 3, "train.fail_at_epoch": 1, "train.max_failures": 0, "train.name": "stopped"},
    )
    with pytest.raises(ray.train.TrainingFailedError):
        fit(cfg)  # no restart allowed: the run stops after epoch 1's checkpoint
    run_dir = os.path.join(str(tmp_path), "stopped")
    resumed = fit(config_for_resume(run_dir))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.run_dir == run_dir and os.path.isdir(os.path.join(run_dir, "model"))
    # epoch 1 ran before the stop with the same seed and config as the reference run (2 workers each)
    assert resumed.history[0]["train_loss"] == reference.history[0]["train_loss"]


def test_a_finished_run_resumed_with_more_epochs_follows_the_new_schedule(failing_run, tmp_path):
    """Resumes a copy of failing_run's folder (the shared fixture stays as it was) with a fourth epoch."""
    from resnet_ray.optim import lr_factor, peak_lr

    cfg, finished = failing_run
    copy = shutil.copytree(finished.run_dir, tmp_path / "failover")
    resumed = fit(config_for_resume(str(copy), ["--train.epochs", "4"]))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[0]["config"] == resumed.history[2]["config"] != resumed.history[3]["config"]
    assert os.path.isfile(os.path.join(resumed.run_dir, resumed.history[3]["config"]))
    # epoch 4's steps continue the cosine over 4 epochs from step 3 x steps; the 3-epoch schedule had ended at 0
    scalars, _ = read_events(os.path.join(resumed.run_dir, "tensorboard"))
    steps = 240 // cfg.scaling.num_workers // cfg.train.batch_size
    logged = {step: lr for step, lr in scalars["step/lr"] if step > 3 * steps}
    peak = peak_lr(cfg.optim, cfg.global_batch_size)
    assert logged and all(
        lr == pytest.approx(peak * lr_factor(step, 4 * steps, 0, 0.0), rel=1e-5) for step, lr in logged.items()
    )
    assert max(logged.values()) > 0


def test_a_final_refit_through_a_uri_filesystem_trains_on_train_and_val_and_exports_the_last_epoch(
    ray_session, data_root, tmp_path
):
    """storage_path as a file:// URI: the same pyarrow-filesystem code path as s3:// or gs://."""
    cfg = tiny_config(
        data_root,
        f"file://{tmp_path}",
        **{"train.refit_on_val": True, "train.name": "refit", "train.evaluate_test": True},
    )
    result = fit(cfg)
    assert result.run_dir == f"file://{tmp_path}/refit"
    for name in (
        "config.yaml",
        "history.csv",
        "model/model.json",
        "model/model.pt",
        "eval-test/report.json",
        "eval-test/predictions.parquet",
        "eval-test/confusion_matrix.png",
    ):
        assert os.path.isfile(tmp_path / "refit" / name), name
    assert json.load(open(tmp_path / "refit" / "eval-test" / "report.json"))["total_support"] == 240
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all("val_top1" not in h for h in result.history)
    assert (
        load_model(str(tmp_path / "refit" / "model")).info["epoch"] == 2 == result.best["epoch"]
    )  # the last, no ranking
    console = Console(record=True, width=200)
    print_training_summary(result, console)
    shown = console.export_text()
    assert "refit on train+val (no validation): the last epoch, 2, is exported" in shown
    # no validation split to fit a temperature on: the run says so and keeps T = 1
    assert "temperature 1 (not fitted: a refit on train+val has no validation split" in shown
    info = json.load(open(tmp_path / "refit" / "model" / "model.json"))
    assert info["temperature"] == 1.0 and info["calibration"]["fitted"] is False
