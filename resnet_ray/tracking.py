"""TensorBoard event files of a training run, written by rank 0 into ``<run>/tensorboard`` (local path or URI).

Per epoch: every metric of the history row (train/, val/, time/ and lr scalars, x = epoch); sparsely per step:
the training loss and learning rate at the logging points (x = global step); and the run's hyperparameters
(``hparams/``, with its best and last validation top-1, or its last training accuracy in a refit). On URI
storage the events are written to a local folder and uploaded after every epoch.
``tensorboard --logdir <run or storage folder>`` shows them.

With ``train.mlflow_tracking_uri`` set (the ``mlflow`` extra), rank 0 also logs the hyperparameters and every
epoch's metrics to MLflow through Ray's ``setup_mlflow``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from resnet_ray import storage
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import to_dict

log = logging.getLogger(__name__)

FOLDER = "tensorboard"
EPOCH_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_top1": "val/top1",
    "val_top5": "val/top5",
    "lr": "lr",
    "images_per_s": "time/images_per_s",
    "epoch_s": "time/epoch_s",
    "data_wait_s": "time/data_wait_s",
    "val_s": "time/val_s",
    "report_s": "time/report_s",
}
HPARAM_SECTIONS = ("model", "optim", "train", "scaling")
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run that a restart or a resume continues


def hyperparameters(cfg: Config) -> dict:
    """The scalar settings of the model, optimizer, training and scaling sections, as dotted keys."""
    tree = to_dict(cfg)
    return {
        f"{section}.{key}": value
        for section in HPARAM_SECTIONS
        for key, value in tree[section].items()
        if isinstance(value, (int, float, str, bool))
    }


class TensorBoard:
    """TensorBoard events of one run, written by rank 0. ``resume_step``: the global step a restarted run
    continues after (TensorBoard drops the earlier attempt's events from there on, so replayed steps are not
    shown twice).

    Each epoch's events go to files that are closed at the end of the epoch: tensorboardX writes from a
    background queue that its flush() does not drain, and an upload must see every event.
    """

    def __init__(self, cfg: Config, run_dir: str, resume_step: Optional[int] = None):
        self.cfg = cfg
        self.target = storage.join(run_dir, FOLDER)
        self.local = tempfile.mkdtemp(prefix="resnet_ray-tb-") if storage.is_uri(run_dir) else self.target
        self.purge_step = resume_step + 1 if resume_step else None
        self.writers = None
        self.hparams_written = False

    def _open(self):
        """(scalars writer, hparams writer) of the current epoch, opened on first use."""
        if self.writers is None:
            from tensorboardX import SummaryWriter

            suffix = f".{time.time_ns()}"  # files opened within the same second: distinct names, in order
            self.writers = tuple(
                SummaryWriter(folder, purge_step=self.purge_step, filename_suffix=suffix)
                for folder in (self.local, os.path.join(self.local, "hparams"))
            )
            self.purge_step = None  # the purge marker belongs only in the first files after a restart
        return self.writers

    def step(self, step: int, loss: float, lr: float) -> None:
        """Training loss and learning rate (of the first parameter group, as in the history) at a logging point
        (``step``: global step)."""
        writer, _ = self._open()
        writer.add_scalar("step/train_loss", loss, step)
        writer.add_scalar("step/lr", lr, step)

    def epoch(self, history: list) -> None:
        """The last history row's metrics (x = epoch) and the hyperparameters with their metrics; then the epoch's
        files are closed (and uploaded on URI storage)."""
        writer, hparams_writer = self._open()
        row = history[-1]
        for key, tag in EPOCH_TAGS.items():
            if isinstance(row.get(key), (int, float)):
                writer.add_scalar(tag, row[key], row["epoch"])
        if "val_top1" in row:
            metrics = {
                "hparams/best_val_top1": max(h["val_top1"] for h in history),
                "hparams/last_val_top1": row["val_top1"],
            }
        else:  # a refit on train+val has no validation
            metrics = {"hparams/last_train_acc": row["train_acc"]}
        if not self.hparams_written:  # the HParams dashboard's session record, once per run
            from tensorboardX.summary import hparams

            for summary in hparams(hyperparameters(self.cfg), metrics):
                hparams_writer.file_writer.add_summary(summary)
            self.hparams_written = True
        for tag, value in metrics.items():
            hparams_writer.add_scalar(tag, value, row["epoch"])
        self._close_files()

    def _close_files(self) -> None:
        if self.writers is not None:
            for writer in self.writers:
                writer.close()
            self.writers = None
        if self.local != self.target:
            storage.upload_dir(self.local, self.target)

    def close(self) -> None:
        """Write what is pending; remove the local staging folder of a URI run."""
        self._close_files()
        if self.local != self.target:
            shutil.rmtree(self.local, ignore_errors=True)


def mlflow_experiment(cfg: Config) -> str:
    """The MLflow experiment of a run: train.mlflow_experiment, or the dataset's name."""
    return cfg.train.mlflow_experiment or cfg.data.dataset_name


def check_mlflow(cfg: Config) -> None:
    """On the driver, before any Ray work, when train.mlflow_tracking_uri is set: mlflow must be installed and the
    tracking URI usable. The experiment is created here when missing (once, not by trials racing each other)."""
    uri = cfg.train.mlflow_tracking_uri
    if not uri:
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            f"train.mlflow_tracking_uri: is set ({uri!r}) but mlflow is not installed; "
            "pip install 'resnet-ray[mlflow]' (or mlflow-skinny), or leave it unset"
        ) from None
    try:
        client = MlflowClient(uri)
        if client.get_experiment_by_name(mlflow_experiment(cfg)) is None:
            client.create_experiment(mlflow_experiment(cfg))
    except Exception as exc:  # unreachable server, refused store, ...: MLflow's own message says which
        raise ConfigError(f"train.mlflow_tracking_uri: {uri!r} is not usable: {exc}") from exc


class MLflow:
    """The run in MLflow, logged by rank 0 through Ray's ``setup_mlflow``: the hyperparameters once, then every
    epoch's history row (the keys of EPOCH_TAGS, step = epoch); the MLflow run ends with the training.

    The MLflow run id is kept in the run folder, so a worker-group restart or a resumed run continues the same
    MLflow run (epochs replayed after a restart are logged again at the same step). MLflow refuses to change a
    parameter: a resume's changed values are set as ``resumed.<key>`` tags instead.
    """

    def __init__(self, cfg: Config, run_dir: str):
        from ray.air.integrations.mlflow import setup_mlflow

        uri, id_file = cfg.train.mlflow_tracking_uri, storage.join(run_dir, MLFLOW_RUN_FILE)
        logged = self._continue(uri, id_file)  # None: a new MLflow run
        params = hyperparameters(cfg)
        # a new MLflow run, or the one continued above (setup_mlflow returns the active run)
        self.mlflow = setup_mlflow(
            config={k: v for k, v in params.items() if logged is None or k not in logged},
            tracking_uri=uri,
            experiment_name=mlflow_experiment(cfg),
            run_name=cfg.train.name,
            create_experiment_if_not_exists=True,
            tags={"resnet_ray.run_dir": run_dir},
            rank_zero_only=True,
        )
        if logged:
            self.mlflow.set_tags({f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != str(v)})
        self.run_id = self.mlflow.active_run().info.run_id
        storage.write_text(id_file, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    @staticmethod
    def _continue(uri: str, id_file: str) -> Optional[dict]:
        """Make the run folder's MLflow run (if any, on the same tracking URI) the active run; its parameters."""
        previous = storage.read_json(id_file) if storage.exists(id_file) else None
        if not previous or previous.get("tracking_uri") != uri:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(uri)
        try:
            return mlflow.start_run(run_id=previous["run_id"]).data.params
        except MlflowException as exc:  # deleted meanwhile
            log.warning("MLflow run %s not continued (%s); starting a new one", previous["run_id"], exc)
            return None

    def epoch(self, history: list) -> None:
        """The last history row's metrics, at step = its epoch."""
        row = history[-1]
        self.mlflow.log_metrics(
            {key: row[key] for key in EPOCH_TAGS if isinstance(row.get(key), (int, float))}, step=row["epoch"]
        )

    def close(self) -> None:
        """End the MLflow run (status FINISHED)."""
        self.mlflow.end_run()
