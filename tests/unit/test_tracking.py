"""TensorBoard event files of a run, read back as TensorBoard would (TFRecord framing + Event protos)."""
import os

from tensorboard_events import read_events

from resnet_ray.config import load_config
from resnet_ray.tracking import TensorBoard, hyperparameters


def history_row(epoch, top1):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5, "val_loss": 0.9, "val_top1": top1,
            "val_top5": 0.9, "lr": 0.01, "images_per_s": 100.0, "epoch_s": 2.0, "data_wait_s": 0.1, "val_s": 0.2,
            "backbone_frozen": False, "report_s": 0.3}


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
