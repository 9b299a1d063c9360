"""TensorBoard event files of a training run, written by rank 0 into ``<run>/tensorboard`` (local path or URI).

Per epoch: every metric of the history row (train/, val/, time/ and lr scalars, x = epoch); sparsely per step:
the training loss and learning rate at the logging points (x = global step); and the run's hyperparameters
(``hparams/``, with its best and last validation top-1, or its last training accuracy in a refit). On URI storage the events are written to a local
folder and uploaded after every epoch. ``tensorboard --logdir <run or storage folder>`` shows them.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from resnet_ray import storage
from resnet_ray.config import Config, to_dict

log = logging.getLogger(__name__)

FOLDER = "tensorboard"
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_top1": "val/top1",
              "val_top5": "val/top5", "lr": "lr", "images_per_s": "time/images_per_s", "epoch_s": "time/epoch_s",
              "data_wait_s": "time/data_wait_s", "val_s": "time/val_s", "report_s": "time/report_s"}
HPARAM_SECTIONS = ("model", "optim", "train", "scaling")


def hyperparameters(cfg: Config) -> dict:
    """The scalar settings of the model, optimizer, training and scaling sections, as dotted keys."""
    tree = to_dict(cfg)
    return {f"{section}.{key}": value for section in HPARAM_SECTIONS for key, value in tree[section].items()
            if isinstance(value, (int, float, str, bool))}


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
            self.writers = tuple(SummaryWriter(folder, purge_step=self.purge_step, filename_suffix=suffix)
                                 for folder in (self.local, os.path.join(self.local, "hparams")))
            self.purge_step = None  # the purge marker belongs only in the first files after a restart
        return self.writers

    def step(self, step: int, loss: float, lr: float) -> None:
        """Training loss and learning rate (of the first parameter group, as in the history) at a logging point
        (``step``: global step)."""
        writer, _ = self._open()
        writer.add_scalar("step/train_loss", loss, step)
        writer.add_scalar("step/lr", lr, step)

    def epoch(self, history: list) -> None:
        """The last history row's metrics (x = epoch) and the hyperparameters with their metrics; then the epoch's files are closed (and uploaded on URI storage)."""
        writer, hparams_writer = self._open()
        row = history[-1]
        for key, tag in EPOCH_TAGS.items():
            if isinstance(row.get(key), (int, float)):
                writer.add_scalar(tag, row[key], row["epoch"])
        if "val_top1" in row:
            metrics = {"hparams/best_val_top1": max(h["val_top1"] for h in history),
                       "hparams/last_val_top1": row["val_top1"]}
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
