"""Inside each Ray Train worker: a thin Ray wrapper around :class:`resnet_ray.session.WorkerSession` (dataset
shards, ``ray.train.report``, checkpoints, restore after a restart) and the ``train.fail_at_epoch`` debug hook."""

from __future__ import annotations

import logging
import os
import tempfile
import time

from resnet_ray import storage
from resnet_ray.checkpoint import load_training_state, save_training_state
from resnet_ray.config import Config
from resnet_ray.config_files import from_dict
from resnet_ray.elastic import at_world_size
from resnet_ray.live import counted
from resnet_ray.run_folder import config_file, latest_checkpoint_epoch, write_history
from resnet_ray.session import WorkerSession, epoch_seed
from resnet_ray.tracking import MLflow, TensorBoard

log = logging.getLogger(__name__)

FAILURE_MARKER = ".injected-failure"


def _val_batches(shard, batch_size: int, rank: int, world: int):
    """This rank's part of the unsplit validation set: rows with row_id % world == rank, each row once."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu"):
        mask = batch["row_id"] % world == rank
        yield {"image": batch["image"][mask], "label": batch["label"][mask]}


def _restore(session: WorkerSession) -> None:
    """Continue from the latest checkpoint Ray Train hands over (after a restart or a resumed run), if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, meta = load_training_state(folder)
        session.restore(state, meta["history"])


def _preempted() -> bool:
    """Whether one of the run's nodes is being preempted (drained with reason preemption: a spot reclaim notice).
    A barrier on every rank, asked once per epoch."""
    import ray.train

    return ray.train.get_preemption_info() is not None


def _report(session: WorkerSession, metrics: dict, checkpoint_now: bool = False) -> None:
    """ray.train.report on every rank (a barrier); rank 0 attaches a checkpoint on the epochs that are due, and
    on every epoch with ``checkpoint_now`` (a node of the run is being preempted).

    The checkpoint is written to a fresh temporary folder that Ray uploads (in the background with
    train.async_checkpoint) and then deletes.
    """
    import ray.train

    cfg = session.cfg.train
    checkpoint = None
    if session.rank == 0 and (checkpoint_now or cfg.checkpoint_due(session.epoch)):
        folder = tempfile.mkdtemp(prefix="resnet_ray-checkpoint-")
        save_training_state(folder, session.state(), session.checkpoint_meta())
        checkpoint = ray.train.Checkpoint.from_directory(folder)
    mode = ray.train.CheckpointUploadMode.ASYNC if cfg.async_checkpoint else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(
        metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True
    )


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: rebuild the config, train cfg.train.epochs epochs, report each one, checkpoint when due.
    Rank 0 also writes the history files and the TensorBoard events of the run (and logs to MLflow when set)."""
    import ray.train
    import ray.train.torch

    planned = from_dict(loop_config["config"])
    meta, run_dir = loop_config["meta"], loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = at_world_size(planned, world)  # an elastic run's batch and lr on the workers it has now
    session = WorkerSession(cfg, meta, ray.train.torch.get_device(), rank, world)
    session.model_meta["config"] = loop_config["config"]  # the run's config, not this restart's
    _restore(session)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if session.val_rows else None
    pin = session.device.type == "cuda"  # pinned host batches: the non_blocking copies really overlap
    board = TensorBoard(planned, run_dir, resume_step=session.epoch * session.steps) if rank == 0 else None
    mlflow_run = MLflow(planned, run_dir) if rank == 0 and cfg.train.mlflow_tracking_uri else None
    config_name = config_file(planned)  # which config the epochs of this attempt run under

    progress = loop_config.get("progress") if rank == 0 else None  # the driver's live bar, on a terminal
    for epoch in range(session.epoch + 1, cfg.train.epochs + 1):
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            drop_last=True,
            prefetch_batches=cfg.train.prefetch_batches,
            local_shuffle_buffer_size=4 * cfg.train.batch_size if cfg.data.shuffle else None,
            local_shuffle_seed=epoch_seed(cfg, epoch),
            device="cpu",
            pin_memory=pin,
        )
        if progress:
            batches = counted(batches, lambda step, e=epoch: progress.update.remote(e, step, session.steps))

        def on_step(step, loss, epoch=epoch):
            if board:
                board.step((epoch - 1) * session.steps + step, loss, session.optimizer.param_groups[0]["lr"])

        val = _val_batches(val_shard, cfg.eval.batch_size, rank, world) if val_shard else []
        metrics = session.run_epoch(epoch, batches, val, on_step=on_step, log_every=max(1, session.steps // 4))
        metrics["config"] = config_name
        report_start = time.perf_counter()
        preempted = _preempted()
        if preempted and rank == 0:
            log.warning("a node of the run is being preempted: checkpointing epoch %d", epoch)
        # an elastic run restarts from its latest checkpoint at every resize: each epoch is kept
        checkpoint_now = preempted or planned.scaling.elastic
        _report(session, dict(metrics), checkpoint_now)
        metrics["report_s"] = time.perf_counter() - report_start  # in the history from now on
        if board:
            write_history(run_dir, session.history)
            board.epoch(session.history)
        if mlflow_run:
            mlflow_run.epoch(session.history)
        _maybe_inject_failure(cfg, epoch, rank, world, run_dir, checkpoint_now or cfg.train.checkpoint_due(epoch))
    if board:
        board.close()
    if mlflow_run:
        mlflow_run.close()


def _maybe_inject_failure(
    cfg: Config, epoch: int, rank: int, world: int, run_dir: str, checkpointed: bool, timeout_s: float = 120.0
) -> None:
    """Debug hook (train.fail_at_epoch): the last rank dies once, after reporting that epoch and, when the epoch
    is checkpointed, once Ray Train has registered its checkpoint (uploaded in the background: a worker that
    died before would make the restart replay from the previous checkpoint, which is not what this proves)."""
    if cfg.train.fail_at_epoch != epoch or rank != world - 1:
        return
    marker = storage.join(run_dir, FAILURE_MARKER)
    if storage.exists(marker):
        return
    deadline = time.monotonic() + timeout_s
    while checkpointed and latest_checkpoint_epoch(run_dir) < epoch:
        if time.monotonic() > deadline:
            log.warning("train.fail_at_epoch=%d: the checkpoint was not registered within %g s", epoch, timeout_s)
            break
        time.sleep(0.2)
    storage.write_text(marker, f"worker {rank} killed after epoch {epoch}\n")
    log.warning("train.fail_at_epoch=%d: killing worker %d now", epoch, rank)
    os._exit(1)
