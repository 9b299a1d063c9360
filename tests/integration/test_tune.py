import csv
import os

import pytest

from conftest import tiny_config
from rich.console import Console

from resnet_ray.config import ConfigError, load_config
from resnet_ray.report import print_search_summary
from resnet_ray.tune import search, validate_search_space

pytestmark = pytest.mark.slow

SPACE = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
         "optim.label_smoothing": {"type": "choice", "values": [0.0, 0.1]}}


def test_search_space_values_are_validated_before_any_trial(data_root, tmp_path):
    cfg = tiny_config(data_root, str(tmp_path), **{"tune.search_space": {
        "optim.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}}})
    with pytest.raises(ConfigError, match="tune.search_space.optim.momentum: 1.5 makes an invalid config"):
        validate_search_space(cfg)


def test_small_search_stops_early_and_its_best_config_trains(ray_session, data_root, tmp_path):
    # the full-length run that best_config.yaml describes: 3 epochs on 2 workers; the trials: 2 epochs on 1
    cfg = tiny_config(data_root, str(tmp_path), **{
        "train.epochs": 3, "scaling.num_workers": 2, "tune.trial_workers": 1, "tune.num_samples": 4, "tune.max_concurrent_trials": 2, "tune.max_epochs": 2,
        "tune.grace_period": 1, "tune.reduction_factor": 2, "tune.name": "search", "tune.search_space": SPACE})
    result = search(cfg)
    assert len(result.trials) == 4
    assert all(row["status"] in ("completed", "stopped early") for row in result.trials)
    # the final evaluation ran in the same driver right after the trials (ASHA may have stopped some), and did
    # not starve on what they still held (issue 14: minutes in Dataset.materialize)
    assert result.evaluation["seconds"] < 120
    assert {row["epochs"] for row in result.trials} <= {1, 2}
    assert result.best["val_top1"] == max(r["val_top1"] for r in result.trials)
    rows = list(csv.DictReader(open(os.path.join(result.experiment_dir, "trials.csv"))))
    assert len(rows) == 4 and {"optim.lr", "optim.label_smoothing", "val_top1"} <= set(rows[0])
    trial = load_config(os.path.join(result.experiment_dir, "trials", result.best["trial_id"], "config.yaml"))
    assert (trial.train.epochs, trial.scaling.num_workers) == (2, 1)
    assert result.evaluation["report"]["total_support"] == 240
    console = Console(record=True, width=200)
    print_search_summary(result, console)
    shown = console.export_text()
    assert result.best["trial_id"] in shown and result.best["status"] in shown

    # jobs/train.py --config takes it as is (tests/integration/test_multinode_s3.py trains one from the bucket)
    best = load_config(result.best_config_path)
    assert best.optim.lr == pytest.approx(result.best["params"]["optim.lr"])
    assert (best.train.epochs, best.scaling.num_workers, best.train.name) == (3, 2, None)  # the full-length run
