"""Hyperparameter search: Ray Tune (ASHA + a TPE searcher) over Ray Train runs (Train V2 pattern).

Each trial is a function trainable that launches a TorchTrainer through ``train.fit`` with Tune's
``TuneReportCallback``, so the trial's metrics reach ASHA and its checkpoints stay in the trial's run folder,
``<experiment>/trials/<trial id>``. The experiment folder may be a local/NFS path or a URI (s3://, gs://):
everything is written through pyarrow filesystems, and the best checkpoint is found through Ray Train's own
record of the trial's run (``ray.train.Result.from_path``), never by listing folders.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from resnet_ray import plots, storage
from resnet_ray.checkpoint import export_checkpoint
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import from_dict, load_config, replace, to_dict, to_yaml
from resnet_ray.model import fetch_weights
from resnet_ray.resources import (
    TRIAL_DRIVER_CPUS,
    alive_nodes,
    count,
    local_search_cpus,
    release_train_reservations,
    trial_concurrency,
)
from resnet_ray.tracking import check_mlflow

log = logging.getLogger(__name__)

TRIALS_FOLDER = "trials"
SEARCH_CONFIG = "search_config.yaml"


def _domain(spec: dict):
    from ray import tune

    kind = spec["type"]
    if kind == "choice":
        return tune.choice(spec["values"])
    if kind == "grid":
        return tune.grid_search(spec["values"])
    if kind == "randint":
        return tune.randint(int(spec["low"]), int(spec["high"]))
    return getattr(tune, kind)(spec["low"], spec["high"])


def validate_search_space(cfg: Config) -> None:
    """Every value the space can produce must make a valid config (checked at its bounds / choices)."""
    for key, spec in cfg.tune.search_space.items():
        values = spec["values"] if "values" in spec else [spec["low"], spec["high"]]
        if spec["type"] == "randint":
            values = [int(spec["low"]), int(spec["high"]) - 1]
        for value in values:
            try:
                replace(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: {value!r} makes an invalid config ({exc})") from None
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space: is empty; nothing to search")


def experiment_dir(cfg: Config) -> str:
    return storage.join(cfg.tune.storage_path or cfg.train.storage_path, cfg.tune.name)


def with_search_name(cfg: Config) -> Config:
    """Give the search a name (so it can be resumed) when the config has none."""
    if cfg.tune.name:
        return cfg
    return replace(cfg, {"tune.name": f"tune-{cfg.data.dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"})


def interrupted_search(exp_dir: str, command: str) -> str:
    """What a search stopped by a person has kept, and the command that continues it."""
    from ray import tune

    if not tune.Tuner.can_restore(exp_dir):
        return "nothing was kept: Tune had not saved the search's state yet; run the same command again"
    return f"kept the search's state and its trials' checkpoints in {exp_dir}; continue with: {command}"


def config_for_resume(exp_dir: str, overrides=()) -> Config:
    """The config saved in an experiment folder (local path or URI), pointed back at that folder."""
    path = storage.join(exp_dir, SEARCH_CONFIG)
    if not storage.exists(path):
        raise ConfigError(f"--resume {exp_dir}: no {SEARCH_CONFIG} there; is it an experiment folder?")
    with storage.local_file(path, suffix=".yaml") as local:
        cfg = load_config(local, overrides)
    parent, name = storage.split(exp_dir)
    return replace(cfg, {"tune.storage_path": parent, "tune.name": name})


def trial_config(base: Config, params: dict, trial_id: str, exp_dir: str) -> Config:
    """The trial's full config: base <- sampled params, tune.max_epochs and tune.trial_workers, its own folder."""
    return replace(
        base,
        {
            **params,
            "train.epochs": base.tune.max_epochs,
            "scaling.num_workers": base.trial_workers,
            "train.name": trial_id,
            "train.storage_path": storage.join(exp_dir, TRIALS_FOLDER),
            "train.evaluate_test": False,
            "train.fail_at_epoch": None,
        },
    )


def run_trial(params: dict, base: dict, exp_dir: str) -> None:
    """Tune function trainable: one Ray Train run whose per-epoch reports go to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from resnet_ray.train import fit

    cfg = trial_config(from_dict(base), params, ray.tune.get_context().get_trial_id(), exp_dir)
    fit(cfg, callbacks=[TuneReportCallback()], epoch_log=False)


@dataclass
class SearchResult:
    experiment_dir: str
    metric: str  # what the search maximised or minimised (tune.metric)
    trials: list  # one dict per trial: trial_id, status, epochs, best_epoch, val_top1, params, history
    best: dict  # the best trial's row
    best_config_path: str  # YAML that jobs/train.py --config takes as is
    model_dir: str  # the best trial's best checkpoint, exported
    curves_path: str  # curves.png: training (dashed) and validation (solid) error per epoch of every trial
    evaluation: Optional[dict] = None


def _searcher(cfg: Config):
    """Optuna's TPE (better than random on small budgets); random search if optuna is missing, and for a grid
    (every combination of the grid's values, the other keys sampled at random)."""
    if any(spec["type"] == "grid" for spec in cfg.tune.search_space.values()):
        return None
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        log.warning("optuna is not installed: falling back to random search")
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on the console
    return OptunaSearch(seed=cfg.train.seed)


def _trial_log_class():
    from ray import tune

    class TrialLog(tune.Callback):
        """One log line per finished, early-stopped or failed trial (Tune's own status table is off), and one a
        minute while trials wait for resources with none running."""

        def __init__(self, metric: str, max_epochs: int):
            self.metric, self.max_epochs = metric, max_epochs
            self.waiting_since: Optional[float] = None
            self.last_line = 0.0

        def on_step_end(self, iteration, trials, **info):
            from resnet_ray import watchdog

            pending = sum(t.status == "PENDING" for t in trials)
            if not pending or any(t.status == "RUNNING" for t in trials):
                self.waiting_since = None
                return
            now = time.monotonic()
            self.waiting_since = self.waiting_since or now
            waited = now - self.waiting_since
            if waited >= watchdog.REPORT_EVERY_S and now - self.last_line >= watchdog.REPORT_EVERY_S:
                self.last_line = now
                log.warning(
                    "waiting %.0f s: %s pending, none running (each needs %g CPU for its driver besides its "
                    "workers); %s",
                    waited,
                    count(pending, "trial"),
                    TRIAL_DRIVER_CPUS,
                    watchdog.diagnose(),
                )

        def _line(self, trial, outcome: str) -> None:
            result = trial.last_result or {}
            epochs = int(result.get("epoch", 0))
            if outcome == "finished" and epochs < self.max_epochs:
                outcome = f"stopped early (ASHA) after epoch {epochs}"
            elif outcome == "finished":
                outcome = f"completed {count(epochs, 'epoch')}"
            value = result.get(self.metric)
            params = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(trial.config.items())
            )
            log.info(
                "trial %s %s: %s %s | %s",
                trial.trial_id,
                outcome,
                self.metric,
                "-" if value is None else f"{value:.4f}",
                params,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

    return TrialLog


def local_cpus_for(cfg: Config) -> float:
    """Logical CPUs of the local Ray instance of this search (``jobs/tune.py --local`` without --num-cpus): this
    machine's cores (or $RESNET_RAY_NUM_CPUS) for the trials' workers, one more per concurrent trial for its idle
    driver (:func:`resnet_ray.resources.local_search_cpus`); says what it chose in one log line."""
    from resnet_ray.runtime import local_cpus

    cpus, line = local_search_cpus(
        local_cpus(),
        cfg.tune.max_concurrent_trials,
        cfg.trial_workers,
        cfg.scaling.resources_per_worker,
        not cfg.data.cache,
    )
    log.info(line)
    return cpus


def _tuner(cfg: Config, exp_dir: str, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), exp_dir=exp_dir), {"CPU": TRIAL_DRIVER_CPUS}
    )
    if restore:
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    parent, name = storage.split(exp_dir)
    return tune.Tuner(
        trainable,
        param_space={key: _domain(spec) for key, spec in cfg.tune.search_space.items()},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            search_alg=_searcher(cfg),
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.tune.max_epochs,
                grace_period=cfg.tune.grace_period,
                reduction_factor=cfg.tune.reduction_factor,
            )
            if cfg.tune.scheduler == "asha"
            else None,  # FIFO: every trial runs to tune.max_epochs
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=parent,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
            callbacks=[_trial_log_class()(cfg.tune.metric, cfg.tune.max_epochs)],
        ),
    )


def _trial_rows(grid, cfg: Config) -> list:
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        history = [] if frame is None or cfg.tune.metric not in frame else frame.to_dict("records")
        best = max(history, key=lambda h: h[cfg.tune.metric] * (1 if cfg.tune.mode == "max" else -1)) if history else {}
        epochs = int(max((h["epoch"] for h in history), default=0))
        status = "error" if result.error else ("completed" if epochs >= cfg.tune.max_epochs else "stopped early")
        rows.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path or "?"),
                "status": status,
                "epochs": epochs,
                "best_epoch": best.get("epoch"),
                cfg.tune.metric: best.get(cfg.tune.metric),
                "params": result.config,
                "history": history,
            }
        )
    return rows


def _curves(rows: list) -> list:
    """Per trial: its label (the values that vary between trials) and its training / validation error per epoch
    (1 - train_acc, 1 - val_top1; an epoch reported twice after a restart counts once, the last time)."""
    keys = sorted({k for row in rows for k in row["params"]})
    varied = [k for k in keys if len({repr(row["params"].get(k)) for row in rows}) > 1] or keys
    curves = []
    for row in rows:
        by_epoch = {int(h["epoch"]): h for h in row["history"]}
        epochs = sorted(by_epoch)
        label = ", ".join(f"{k.split('.')[-1]} {_short(row['params'].get(k))}" for k in varied) or row["trial_id"]
        curves.append(
            {
                "label": label,
                "epoch": epochs,
                "train_error": [1 - by_epoch[e]["train_acc"] for e in epochs],
                "val_error": [1 - by_epoch[e]["val_top1"] if "val_top1" in by_epoch[e] else None for e in epochs],
            }
        )
    return curves


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_checkpoint(run_dir: str, metric: str, mode: str):
    """The ``ray.train.Checkpoint`` of a trial's run (local path or URI) with the best ``metric``.

    Read from Ray Train's record of the run (its checkpoint manager snapshot), which knows every kept
    checkpoint and its metrics wherever the run was stored.
    """
    import ray.train

    try:
        checkpoint = ray.train.Result.from_path(storage.normalize(run_dir)).get_best_checkpoint(metric, mode)
    except RuntimeError as exc:  # no such run folder, or no snapshot in it
        raise FileNotFoundError(f"{run_dir}: no Ray Train run with checkpoints ({exc})") from None
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint reported {metric}")
    return checkpoint


def _write_trials_csv(path: str, rows: list, metric: str) -> None:
    keys = sorted({k for row in rows for k in row["params"]})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", "status", "epochs", "best_epoch", metric, *keys])
    for row in rows:
        writer.writerow(
            [
                row["trial_id"],
                row["status"],
                row["epochs"],
                row["best_epoch"],
                row[metric],
                *(row["params"].get(k) for k in keys),
            ]
        )
    storage.write_text(path, out.getvalue())


def search(cfg: Config, resume: bool = False) -> SearchResult:
    """Run (or resume) the search; write trials.csv, best_config.yaml, best_model/ and the test report."""
    from resnet_ray.data.prepare import ensure_prepared

    cfg = with_search_name(cfg)
    validate_search_space(cfg)
    if cfg.train.mlflow_tracking_uri and not cfg.train.mlflow_experiment:  # one MLflow experiment per search
        cfg = replace(cfg, {"train.mlflow_experiment": cfg.tune.name})
    check_mlflow(cfg)
    fetch_weights(cfg.model)  # before the trials: each would fail the same way
    cfg = replace(
        cfg,
        {
            "tune.max_concurrent_trials": trial_concurrency(
                cfg.tune.max_concurrent_trials,
                cfg.trial_workers,
                cfg.scaling.resources_per_worker,
                alive_nodes(),
                not cfg.data.cache,
            )
        },
    )  # what the cluster holds at once (fewer, with a warning)
    exp_dir = experiment_dir(cfg)
    ensure_prepared(cfg.data)  # once, before trials start in parallel
    if resume and not storage.exists(exp_dir):
        raise ConfigError(f"--resume {exp_dir}: no such experiment folder")
    storage.write_text(storage.join(exp_dir, SEARCH_CONFIG), to_yaml(cfg))
    # Tune's console output off (verbose=0 in _tuner; its newer engine would still print a configuration box,
    # the experiment path and a TensorBoard hint for Ray's own artifacts folder): the job logs a line per trial
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's Ctrl-C handler ends the search as if it were done; without it the job stops and says how to resume
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    grid = _tuner(cfg, exp_dir, restore=resume).fit()
    release_train_reservations()  # stopped trials' Ray Data reservations would starve the final evaluation

    rows = _trial_rows(grid, cfg)
    _write_trials_csv(storage.join(exp_dir, "trials.csv"), rows, cfg.tune.metric)
    curves = _curves(rows)
    curves_path = plots.write_search_curves(curves, storage.join(exp_dir, "curves.png"))
    plots.write_gradients_plot(  # per trial beside the curves (train.diagnostics)
        [{"label": c["label"], "history": r["history"]} for c, r in zip(curves, rows)],
        storage.join(exp_dir, "gradients.png"),
    )
    scored = [r for r in rows if r[cfg.tune.metric] is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {cfg.tune.metric}; see {exp_dir}")
    best = (max if cfg.tune.mode == "max" else min)(scored, key=lambda r: r[cfg.tune.metric])
    best_run = storage.join(exp_dir, TRIALS_FOLDER, best["trial_id"])
    # the full-length run: the search config's train.epochs and scaling.num_workers (not the trials'), the best
    # trial's sampled values on top; the learning rate follows the global batch (optim.reference_batch_size)
    best_cfg = replace(
        cfg, {**best["params"], "train.name": None, "train.evaluate_test": True, "train.fail_at_epoch": None}
    )
    best_config_path = storage.join(exp_dir, "best_config.yaml")
    storage.write_text(
        best_config_path,
        "# best trial " + best["trial_id"] + f": {cfg.tune.metric} {best[cfg.tune.metric]:.4f}\n" + to_yaml(best_cfg),
    )
    model_dir = storage.join(exp_dir, "best_model")
    export_checkpoint(best_checkpoint(best_run, cfg.tune.metric, cfg.tune.mode), model_dir)
    from resnet_ray.evaluate import evaluate

    evaluation = evaluate(best_cfg, model_dir, split="test", output=storage.join(exp_dir, "best_model_eval-test"))
    return SearchResult(exp_dir, cfg.tune.metric, rows, best, best_config_path, model_dir, curves_path, evaluation)
