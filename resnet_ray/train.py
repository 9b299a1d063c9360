"""Ray Train (TorchTrainer, DDP) fine-tuning: the per-worker function and ``fit(cfg)``."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

from resnet_ray import report, storage
from resnet_ray.checkpoint import export_checkpoint, load_training_state, save_training_state
from resnet_ray.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml
from resnet_ray.data.load import IN_MEMORY_BYTES, load_split, load_split_in_memory, quiet_data_progress, split_nbytes
from resnet_ray.data.prepare import ensure_prepared
from resnet_ray.model import fetch_weights
from resnet_ray.resources import alive_nodes, check_training
from resnet_ray.session import WorkerSession, epoch_seed, process_group_backend, training_rows
from resnet_ray.tracking import MLflow, TensorBoard, check_mlflow
from resnet_ray.watchdog import watch_fit

log = logging.getLogger(__name__)

FAILURE_MARKER = ".injected-failure"
METRIC = "val_top1"


# ---------------------------------------------------------------------------
# inside each Ray Train worker: a thin Ray wrapper (shards, report, checkpoint, restore) around session.WorkerSession


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


def _report(session: WorkerSession, metrics: dict) -> None:
    """ray.train.report on every rank (a barrier); rank 0 attaches a checkpoint on the epochs that are due.

    The checkpoint is written to a fresh temporary folder that Ray uploads (in the background with
    train.async_checkpoint) and then deletes.
    """
    import ray.train

    cfg = session.cfg.train
    checkpoint = None
    if session.rank == 0 and cfg.checkpoint_due(session.epoch):
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

    cfg = from_dict(loop_config["config"])
    meta, run_dir = loop_config["meta"], loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    session = WorkerSession(cfg, meta, ray.train.torch.get_device(), rank, world)
    _restore(session)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if session.val_rows else None
    pin = session.device.type == "cuda"  # pinned host batches: the non_blocking copies really overlap
    board = TensorBoard(cfg, run_dir, resume_step=session.epoch * session.steps) if rank == 0 else None
    mlflow_run = MLflow(cfg, run_dir) if rank == 0 and cfg.train.mlflow_tracking_uri else None
    config_name = config_file(cfg)  # which config the epochs of this attempt run under

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
        _report(session, dict(metrics))
        metrics["report_s"] = time.perf_counter() - report_start  # in the history from now on
        if board:
            write_history(run_dir, session.history)
            board.epoch(session.history)
        if mlflow_run:
            mlflow_run.epoch(session.history)
        _maybe_inject_failure(cfg, epoch, rank, world, run_dir)
    if board:
        board.close()
    if mlflow_run:
        mlflow_run.close()


def _maybe_inject_failure(
    cfg: Config, epoch: int, rank: int, world: int, run_dir: str, timeout_s: float = 120.0
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
    while cfg.train.checkpoint_due(epoch) and _latest_checkpoint_epoch(run_dir) < epoch:
        if time.monotonic() > deadline:
            log.warning("train.fail_at_epoch=%d: the checkpoint was not registered within %g s", epoch, timeout_s)
            break
        time.sleep(0.2)
    storage.write_text(marker, f"worker {rank} killed after epoch {epoch}\n")
    log.warning("train.fail_at_epoch=%d: killing worker %d now", epoch, rank)
    os._exit(1)


def _latest_checkpoint_epoch(run_dir: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for the run (0: none yet), read from its
    checkpoint manager's snapshot in the run folder (Ray is pinned)."""
    try:
        latest = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return 0
    return int(((latest.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


# ---------------------------------------------------------------------------
# on the driver


@dataclass
class FitResult:
    run_dir: str
    history: list  # one metrics dict per epoch, in order
    best: dict  # metrics of the best epoch by validation top-1
    model_dir: str  # exported best model
    evaluation: Optional[dict] = None  # test report (resnet_ray.evaluate) when train.evaluate_test


def run_dir_of(cfg: Config) -> str:
    return storage.join(cfg.train.storage_path, cfg.train.name)


def with_run_name(cfg: Config) -> Config:
    """Give the run a name (so it can be resumed) when the config has none."""
    if cfg.train.name:
        return cfg
    tree = to_dict(cfg)
    tree["train"]["name"] = f"{cfg.data.dataset_name}-{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return from_dict(tree)


# what a resumed run cannot change: the weights and the data it was trained on would no longer fit
RESUME_FIXED = (
    "model.arch",
    "model.image_size",
    "data.source",
    "data.path",
    "data.name",
    "data.image_size",
    "data.resize",
    "data.on_bad_image",
    "data.classes",
    "data.val_fraction",
    "data.test_fraction",
    "data.seed",
    "data.limit",
)


def config_for_resume(run_dir: str, overrides=()) -> Config:
    """The config saved in a run folder, pointed back at that folder, with optional overrides.

    Overrides of the schedule, optimizer, workers or epochs apply from the resumed epoch on; an override of a
    field in RESUME_FIXED is refused (ConfigError naming it).
    """
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    with storage.local_file(path, suffix=".yaml") as local:
        saved = load_config(local)
        cfg = load_config(local, overrides)
    old, new = to_dict(saved), to_dict(cfg)
    for key in RESUME_FIXED:
        section, name = key.split(".")
        if old[section][name] != new[section][name]:
            raise ConfigError(
                f"{key}: a resumed run keeps {old[section][name]!r} (it was trained with it); "
                f"start a new run to change it"
            )
    new["train"].update(zip(("storage_path", "name"), storage.split(run_dir)))
    return from_dict(new)


def _check_batches(cfg: Config, meta: dict) -> None:
    rows = training_rows(cfg, meta)
    if rows // cfg.scaling.num_workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} per worker is more than the "
            f"{rows // cfg.scaling.num_workers} training rows each of the "
            f"{cfg.scaling.num_workers} workers gets"
        )


def write_history(run_dir: str, history: list) -> None:
    """history.jsonl and history.csv in the run folder (the CSV's columns: every key any epoch has)."""
    storage.write_text(storage.join(run_dir, "history.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(key for h in history for key in h)))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(run_dir, "history.csv"), out.getvalue())


def _export_best(result, cfg: Config, run_dir: str) -> tuple[dict, str]:
    """Export the best checkpoint by val_top1 (the last one in a refit on train+val, which has no validation)
    to <run_dir>/model (local path or URI); returns its epoch's metrics and the model folder."""
    model_dir = storage.join(run_dir, "model")
    chosen = result.checkpoint if cfg.train.refit_on_val else result.get_best_checkpoint(metric=METRIC, mode="max")
    return export_checkpoint(chosen, model_dir)["metrics"], model_dir


def training_datasets(cfg: Config, prepared: str, meta: dict) -> dict:
    """train and val as Ray Data datasets (train+val as "train" alone in a refit); cached in the object store
    when cfg.data.cache (read once, not every epoch; splits of up to IN_MEMORY_BYTES by this process, without a
    Ray Data job), the training blocks in a new random order every epoch
    when cfg.data.shuffle."""
    import ray.data

    datasets = {}
    for split in ("train", "val"):
        in_memory = cfg.data.cache and split_nbytes(meta, split, cfg.data.limit) <= IN_MEMORY_BYTES
        # small and cached: no Ray Data read job to start
        ds = load_split_in_memory(cfg.data, split, prepared) if in_memory else load_split(cfg.data, split, prepared)
        ds.context.execution_options.preserve_order = True  # block order set by the seed, not by timing
        datasets[split] = ds.materialize() if cfg.data.cache and not in_memory else ds
    if cfg.train.refit_on_val:  # the final refit trains on both and validates on nothing
        datasets = {"train": datasets["train"].union(datasets.pop("val"))}
    if cfg.data.shuffle:  # a new, seeded block order every epoch
        seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
        datasets["train"] = datasets["train"].randomize_block_order(seed=seed)
    return datasets


def config_file(cfg: Config) -> str:
    """Name of the run folder's copy of ``cfg`` that history rows point at: config-<hash of its YAML>.yaml."""
    return f"config-{hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:8]}.yaml"


def write_config(run_dir: str, cfg: Config) -> None:
    """config.yaml (the config the run trains with now) and config-<hash>.yaml, the copy that the history rows
    of the epochs trained with it name (a resumed run with overrides adds a second one)."""
    text = to_yaml(cfg)
    for name in ("config.yaml", config_file(cfg)):
        storage.write_text(storage.join(run_dir, name), text)


def read_history(run_dir: str) -> list:
    """The run's history.jsonl (written by rank 0 after every epoch) as a list of per-epoch metric dicts."""
    return [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, "history.jsonl")).splitlines()]


def build_trainer(cfg: Config, meta: dict, datasets: Optional[dict], callbacks: Optional[list] = None, progress=None):
    """The TorchTrainer of a run: workers, process-group backend (cpu:gloo,cuda:nccl on GPUs), storage,
    checkpoint ranking, failure policy and the Ray Data ingest of ``datasets`` (train split per worker)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # batches in the seeded block order, not in order of completion (built here: Ray's default_ingest_options()
    # sets a deprecated option and warns)
    ingest_options = ray.data.ExecutionOptions(preserve_order=True)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": to_dict(cfg), "meta": meta, "run_dir": run_dir_of(cfg), "progress": progress},
        torch_config=TorchConfig(backend=process_group_backend(cfg.scaling.use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=storage.normalize(cfg.train.storage_path),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(  # the latest K in a refit (no validation metric)
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_order="max",
                checkpoint_score_attribute=None if cfg.train.refit_on_val else METRIC,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options),
    )


def counted(batches, report, every_s: float = 0.5):
    """``batches``, calling ``report(steps so far)`` after a step at most every ``every_s`` seconds and after the
    last one (a counter and a clock: no host-device synchronization)."""
    last, step = time.monotonic(), 0
    for step, batch in enumerate(batches, 1):
        yield batch
        if time.monotonic() - last >= every_s:
            report(step)
            last = time.monotonic()
    report(step)


def step_progress_actor():
    """A tiny actor (no CPU) that holds rank 0's (epoch, step, steps), for the driver's live progress bar."""
    import ray

    @ray.remote(num_cpus=0)
    class StepProgress:
        def __init__(self):
            self.state = (0, 0, 0)

        def update(self, epoch: int, step: int, steps: int) -> None:
            self.state = (epoch, step, steps)

        def get(self) -> tuple:
            return self.state

    return StepProgress.remote()


class EpochLog:
    """While a run trains: one log line on the driver per finished epoch (losses, top-1/top-5, learning rate,
    img/s, ETA), read from the history.jsonl that rank 0 writes after every epoch (a local path or a URI); and,
    given ``progress`` (a :func:`step_progress_actor`) and a terminal ``console``, a live bar of the current
    epoch's steps below those lines."""

    def __init__(self, run_dir: str, epochs: int, interval_s: float = 2.0, progress=None, console=None):
        self.run_dir, self.epochs, self.interval_s = run_dir, epochs, interval_s
        self.shown = 0  # the last epoch logged
        self.progress, self.bar, self.task, self.bar_epoch = progress, None, None, 0
        self.lock = threading.Lock()
        if progress is not None and console is not None and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="epoch-log", daemon=True)

    def __enter__(self) -> EpochLog:
        if self.bar:
            self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.poll()
        if self.bar:
            self.bar.stop()

    def _watch(self) -> None:
        tick = 0.5 if self.bar else self.interval_s
        last_poll = time.monotonic()
        while not self.stopped.wait(tick):
            if self.bar:
                self.poll_steps()
            if time.monotonic() - last_poll >= self.interval_s:
                self.poll()
                last_poll = time.monotonic()

    def poll_steps(self) -> None:
        """Move the live bar to rank 0's current step (an unanswered actor leaves it as it is)."""
        import ray

        with self.lock:  # the watcher thread and a final call: one read-and-draw at a time, in order
            try:
                epoch, step, steps = ray.get(self.progress.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - the bar is decoration: a slow or lost actor must not stop the run
                return
            if epoch and epoch >= self.bar_epoch:
                self._draw(epoch, step, steps)

    def _draw(self, epoch: int, step: int, steps: int) -> None:
        description = f"epoch {epoch}/{self.epochs}"
        if self.task is None:
            self.task = self.bar.add_task(description, total=steps)
        elif epoch != self.bar_epoch:
            self.bar.reset(self.task, total=steps, description=description)
        self.bar_epoch = epoch
        self.bar.update(self.task, completed=step)

    def poll(self) -> None:
        """Log the epochs finished since the last call (after a restart the history may start over)."""
        try:
            rows = read_history(self.run_dir)
        except (OSError, ValueError):  # not written yet, or caught mid-replace on a store without atomic moves
            return
        for row in rows:
            if row["epoch"] > self.shown:
                self.shown = row["epoch"]
                per_epoch = row["epoch_s"] + row["val_s"] + row.get("report_s", 0.0)
                eta = time.strftime("%H:%M:%S", time.gmtime(per_epoch * (self.epochs - row["epoch"])))
                val = (
                    f" | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f}"
                    if "val_top1" in row
                    else ""
                )
                log.info(
                    "epoch %d/%d  train loss %.4f acc %.4f%s | lr %.2e | %.0f img/s | ETA %s",
                    row["epoch"],
                    self.epochs,
                    row["train_loss"],
                    row["train_acc"],
                    val,
                    row["lr"],
                    row["images_per_s"],
                    eta,
                )


def fit(cfg: Config, callbacks: Optional[list] = None, epoch_log: bool = True) -> FitResult:
    """Prepare data if needed, train with TorchTrainer, export the best model, evaluate it on test.

    ``epoch_log``: log one line per finished epoch on this process (off for Tune trials)."""
    cfg = with_run_name(cfg)
    check_mlflow(cfg)
    fetch_weights(cfg.model)  # an offline machine without cached weights fails here, not in every worker
    quiet_data_progress()
    prepared, meta = ensure_prepared(cfg.data)
    _check_batches(cfg, meta)
    check_training(cfg.scaling.num_workers, cfg.scaling.resources_per_worker, alive_nodes(), not cfg.data.cache)
    run_dir = run_dir_of(cfg)
    write_config(run_dir, cfg)
    console = report.logging_console()
    progress = step_progress_actor() if epoch_log and console is not None and console.is_terminal else None
    try:
        with (
            EpochLog(run_dir, cfg.train.epochs, progress=progress, console=console)
            if epoch_log
            else contextlib.nullcontext()
        ):
            # fails with a diagnosis instead of hanging
            result = watch_fit(
                build_trainer(cfg, meta, training_datasets(cfg, prepared, meta), callbacks, progress),
                cfg.train.stall_timeout_s,
            )
    finally:
        if progress is not None:
            import ray

            ray.kill(progress)
    history = read_history(run_dir)
    report.write_history_plot(history, storage.join(run_dir, "history.png"))
    best, model_dir = _export_best(result, cfg, run_dir)
    evaluation = None
    if cfg.train.evaluate_test:
        from resnet_ray.evaluate import evaluate

        evaluation = evaluate(cfg, model_dir, split="test", output=storage.join(run_dir, "eval-test"))
    return FitResult(run_dir, history, best, model_dir, evaluation)
