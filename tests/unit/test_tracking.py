"""TensorBoard event files of a run, read back as TensorBoard would (TFRecord framing + Event protos); the MLflow
run (when mlflow is installed) and the error when it is set but missing."""

import json
import os
import sys

import pytest
from conftest import tiny_config
from tensorboard_events import read_events

from resnet_ray import train, tune
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import load_config
from resnet_ray.tracking import EPOCH_TAGS, MLFLOW_RUN_FILE, MLflow, TensorBoard, check_mlflow, hyperparameters


def history_row(epoch, top1):
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5,
        "val_loss": 0.9,
        "val_top1": top1,
        "val_top5": 0.9,
        "lr": 0.01,
        "images_per_s": 100.0,
        "epoch_s": 2.0,
        "data_wait_s": 0.1,
        "val_s": 0.2,
        "backbone_frozen": False,
        "report_s": 0.3,
    }


def test_epoch_and_step_scalars_and_hparams_are_written_for_tensorboard(tmp_path):
    cfg = load_config(None, {"optim.lr": 0.03})
    board = TensorBoard(cfg, str(tmp_path / "run"))
    board.step(5, 2.5, 0.02)
    history = [history_row(1, 0.6)]
    board.epoch(history)
    history.append(history_row(2, 0.4))
    board.epoch(history)
    board.close()
    scalars, _ = read_events(tmp_path / "run" / "tensorboard")
    assert scalars["val/top1"] == [(1, 0.6000000238418579), (2, 0.4000000059604645)]
    assert scalars["train/loss"][1] == (2, 0.5) and scalars["time/report_s"][0][0] == 1
    assert scalars["step/train_loss"] == [(5, 2.5)]
    hp_scalars, plugins = read_events(tmp_path / "run" / "tensorboard" / "hparams")
    assert "hparams" in plugins
    best = [round(v, 4) for _, v in hp_scalars["hparams/best_val_top1"]]
    assert best == [0.6, 0.6]  # the best so far, not the last
    assert hyperparameters(cfg)["optim.lr"] == 0.03 and "train.epochs" in hyperparameters(cfg)


def test_uri_run_folders_get_the_events_uploaded(tmp_path):
    cfg = load_config(None, {})
    board = TensorBoard(cfg, f"file://{tmp_path}/run")
    board.epoch([history_row(1, 0.5)])
    scalars, _ = read_events(tmp_path / "run" / "tensorboard")  # uploaded after the epoch, before close
    assert scalars["val/top1"] == [(1, 0.5)]
    board.close()
    assert not os.path.exists(board.local)  # the local staging folder is removed


def test_a_restarted_run_purges_the_replayed_steps(tmp_path):
    cfg = load_config(None, {})
    first = TensorBoard(cfg, str(tmp_path))
    for step in (1, 2, 3, 4):
        first.step(step, float(step), 0.1)
    first.close()
    again = TensorBoard(cfg, str(tmp_path), resume_step=2)  # the checkpoint was after step 2
    again.step(3, 30.0, 0.1)
    again.close()
    purges = []
    scalars, _ = read_events(tmp_path / "tensorboard", purges)
    # TensorBoard drops the earlier attempt's events at or after a START marker's step when it reads them
    assert purges == [3]
    assert scalars["step/train_loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 30.0)]  # files in order


def test_mlflow_set_without_mlflow_installed_stops_on_the_driver_before_any_work(monkeypatch, data_root, tmp_path):
    for name in ("mlflow", "mlflow.tracking"):  # as if not installed (None in sys.modules: ImportError)
        monkeypatch.setitem(sys.modules, name, None)
    space = {"optim.lr": {"type": "choice", "values": [0.01, 0.1]}}
    cfg = tiny_config(
        data_root, str(tmp_path), **{"train.mlflow_tracking_uri": "http://127.0.0.1:5000", "tune.search_space": space}
    )
    check_mlflow(load_config(None, {}))  # unset: nothing to check
    with pytest.raises(ConfigError, match=r"train.mlflow_tracking_uri: is set .* mlflow is not installed"):
        check_mlflow(cfg)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(train, "ensure_prepared", no_work)
    monkeypatch.setattr(tune, "trial_concurrency", no_work)
    with pytest.raises(ConfigError, match="train.mlflow_tracking_uri"):
        train.fit(cfg)
    with pytest.raises(ConfigError, match="train.mlflow_tracking_uri"):
        tune.search(cfg)
    with pytest.raises(ConfigError, match="train.mlflow_experiment: must not be empty"):
        load_config(None, {"train.mlflow_experiment": " "})


def test_mlflow_logs_the_hyperparameters_and_epochs_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"
    cfg = load_config(None, {"train.mlflow_tracking_uri": uri, "train.name": "r1", "train.epochs": 1})
    check_mlflow(cfg)  # creates the experiment (named after the dataset)
    run = MLflow(cfg, str(tmp_path / "run"))
    run.epoch([history_row(1, 0.6)])
    run.close()
    longer = load_config(
        None,
        {"train.mlflow_tracking_uri": uri, "train.name": "r1", "train.epochs": 2, "train.mlflow_experiment": "digits"},
    )  # new key: logged; changed value: a tag
    again = MLflow(longer, str(tmp_path / "run"))
    again.epoch([history_row(1, 0.6), history_row(2, 0.4)])
    again.close()

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert found.info.run_id == run.run_id == again.run_id and found.info.status == "FINISHED"
    assert found.info.run_name == "r1" and found.data.tags["resnet_ray.run_dir"] == str(tmp_path / "run")
    assert found.data.params == {
        key: str(value) for key, value in hyperparameters(longer).items() if key != "train.epochs"
    } | {"train.epochs": "1"}
    assert found.data.tags["resumed.train.epochs"] == "2"
    top1 = client.get_metric_history(found.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in top1] == [(1, 0.6), (2, 0.4)]
    assert set(found.data.metrics) == set(EPOCH_TAGS)
    assert json.loads((tmp_path / "run" / MLFLOW_RUN_FILE).read_text()) == {"tracking_uri": uri, "run_id": run.run_id}
