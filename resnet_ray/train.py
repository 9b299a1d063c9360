"""Ray Train (TorchTrainer, DDP) training on the driver: ``fit(cfg)`` prepares the data, builds the trainer
(workers: :mod:`resnet_ray.worker`), watches it, exports the best model, fits its temperature on val
(:mod:`resnet_ray.calibration`) and evaluates it on test."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

from resnet_ray import elastic, plots, storage
from resnet_ray.checkpoint import export_checkpoint
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import to_dict
from resnet_ray.console import logging_console
from resnet_ray.data.load import IN_MEMORY_BYTES, load_split, load_split_in_memory, quiet_data_progress, split_nbytes
from resnet_ray.data.prepare import ensure_prepared
from resnet_ray.live import EpochLog, step_progress_actor
from resnet_ray.model import fetch_weights
from resnet_ray.resources import ResourceError, alive_nodes, check_training, describe_pending, pending_nodes
from resnet_ray.run_folder import interrupted_run, read_history, run_dir_of, with_run_name, write_config
from resnet_ray.session import process_group_backend, training_rows
from resnet_ray.tracking import check_mlflow
from resnet_ray.watchdog import CapacityError, CapacityWatch, watch_fit
from resnet_ray.worker import train_fn_per_worker

METRIC = "val_top1"
# An elastic run's restart is sized by what Ray's autoscaling coordinator last saw; a node that died a moment ago
# still counts there for 20-30 s (measured, even with a 1 s GCS health check), and the group sized with it waits for
# its placement group for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s) before Ray sizes it again.
# Elastic runs wait less.
ELASTIC_START_TIMEOUT_S = "10"
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # passed on to the Train controller by Ray

log = logging.getLogger(__name__)


class AfterTrainingError(RuntimeError):
    """A step after the training (the temperature fit, the test evaluation) failed; the model is exported."""


@dataclass
class FitResult:
    run_dir: str
    history: list  # one metrics dict per epoch, in order
    best: dict  # metrics of the best epoch by validation top-1
    model_dir: str  # exported best model
    evaluation: Optional[dict] = None  # test report (resnet_ray.evaluate) when train.evaluate_test
    calibration: Optional[dict] = (
        None  # the temperature fitted on val (resnet_ray.calibration) when train.evaluate_test
    )


def _check_batches(cfg: Config, meta: dict) -> None:
    """Every worker gets a batch (an elastic run's batches are smaller at fewer workers: elastic.batch_at)."""
    rows, workers = training_rows(cfg, meta), cfg.scaling.max_workers
    if rows // workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} per worker is more than the "
            f"{rows // workers} training rows each of the {workers} workers gets"
        )


def _export_best(result, cfg: Config, run_dir: str) -> tuple[dict, str]:
    """Export the best checkpoint by val_top1 (the last one in a refit on train+val, which has no validation)
    to <run_dir>/model (local path or URI); returns its epoch's metrics and the model folder."""
    model_dir = storage.join(run_dir, "model")
    chosen = result.checkpoint if cfg.train.refit_on_val else result.get_best_checkpoint(metric=METRIC, mode="max")
    return export_checkpoint(chosen, model_dir)["metrics"], model_dir


def _live_autoscaling_coordinator(timeout_s: float = 10.0) -> None:
    """An elastic run sizes itself through Ray's AutoscalingCoordinator, a detached actor pinned to the node that
    first created it (Ray Data's, on whatever node ran that). When that node is gone (a spot node reclaimed) the
    actor can never come back, and every elastic run would wait in InitializingState for good: an unresponsive
    one is replaced by one on this (the driver's) node."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    try:
        ray.get(coordinator.__ray_ready__.remote(), timeout=timeout_s)
        return
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        pass
    log.warning(
        "Ray's autoscaling coordinator did not answer within %g s (its node is gone?): starting a new one", timeout_s
    )
    ray.kill(coordinator, no_restart=True)
    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=60)


@contextlib.contextmanager
def _start_timeout(cfg: Config):
    """ELASTIC_START_TIMEOUT_S for an elastic run's Train controller while it runs (a user's own setting wins)."""
    if not cfg.scaling.elastic or START_TIMEOUT_VAR in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_VAR] = ELASTIC_START_TIMEOUT_S
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_VAR, None)


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
            num_workers=cfg.scaling.num_workers,  # (min, max) for an elastic run
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
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
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures, max_preemption_failures=cfg.train.max_preemptions
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options),
    )


def fit(cfg: Config, callbacks: Optional[list] = None, epoch_log: bool = True) -> FitResult:
    """Prepare data if needed, train with TorchTrainer, export the best model; with train.evaluate_test, fit its
    temperature on val (stored in model.json; T = 1 in a refit on train+val) and evaluate it on test.

    ``epoch_log``: log one line per finished epoch on this process (off for Tune trials)."""
    cfg = with_run_name(cfg)
    check_mlflow(cfg)
    fetch_weights(cfg.model)  # an offline machine without cached weights fails here, not in every worker
    quiet_data_progress()
    prepared, meta = ensure_prepared(cfg.data)
    _check_batches(cfg, meta)
    try:
        check_training(cfg.scaling.min_workers, cfg.scaling.resources_per_worker, alive_nodes(), not cfg.data.cache)
    except ResourceError as exc:
        pending = pending_nodes()
        if not pending:  # no node is coming (a read-only autoscaler, as `ray start` runs one, reports 0)
            raise
        log.warning("%s; %s: waiting for them (train.pending_node_timeout_s)", exc, describe_pending(pending))
    if cfg.scaling.elastic:
        log.info("%s", elastic.describe(cfg))
        _live_autoscaling_coordinator()
    run_dir = run_dir_of(cfg)
    write_config(run_dir, cfg)
    console = logging_console()
    progress = step_progress_actor() if epoch_log and console is not None and console.is_terminal else None
    try:
        with (
            EpochLog(run_dir, cfg.train.epochs, progress=progress, console=console)
            if epoch_log
            else contextlib.nullcontext(),
            _start_timeout(cfg),
        ):
            # fails with a diagnosis instead of hanging
            result = watch_fit(
                build_trainer(cfg, meta, training_datasets(cfg, prepared, meta), callbacks, progress),
                cfg.train.stall_timeout_s,
                capacity=CapacityWatch(
                    cfg.scaling.min_workers,
                    cfg.scaling.resources_per_worker,
                    cfg.train.capacity_timeout_s,
                    cfg.train.pending_node_timeout_s,
                ),
            )
    except CapacityError as exc:  # the checkpoint is kept: say how to continue once the cluster has room again
        resume = interrupted_run(run_dir, f"python jobs/train.py --resume {run_dir}")
        raise CapacityError(f"{exc}; {resume}") from None
    finally:
        if progress is not None:
            import ray

            ray.kill(progress)
    history = read_history(run_dir)
    plots.write_history_plot(history, storage.join(run_dir, "history.png"))
    plots.write_gradients_plot([{"label": cfg.train.name, "history": history}], storage.join(run_dir, "gradients.png"))
    best, model_dir = _export_best(result, cfg, run_dir)
    evaluation = calibration = None
    if cfg.train.evaluate_test:  # the end of a run: a temperature fitted on val (T = 1 in a refit), then test
        from resnet_ray.evaluate import calibrate, evaluate

        step = f"fitting its temperature (python jobs/calibrate.py --model {run_dir})"
        try:  # the model is exported: a failure from here on names the step to rerun, it never costs the training
            calibration = calibrate(cfg, model_dir)
            step = f"its test evaluation (python jobs/evaluate.py --model {run_dir})"
            evaluation = evaluate(cfg, model_dir, split="test", output=storage.join(run_dir, "eval-test"))
        except Exception as exc:
            log.warning("after training: %s failed", step, exc_info=True)
            raise AfterTrainingError(
                f"the run trained and its model is saved in {model_dir}, but {step} failed: {exc}"
            ) from exc
    return FitResult(run_dir, history, best, model_dir, evaluation, calibration)
