"""A search's space is validated before any trial starts (the search itself: tests/integration/test_multinode_s3.py)."""

import pytest
from conftest import tiny_config

from resnet_ray.config_checks import ConfigError
from resnet_ray.tune import validate_search_space


def test_search_space_values_are_validated_before_any_trial(data_root, tmp_path):
    cfg = tiny_config(
        data_root,
        str(tmp_path),
        **{"tune.search_space": {"optim.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}}},
    )
    with pytest.raises(ConfigError, match="tune.search_space.optim.momentum: 1.5 makes an invalid config"):
        validate_search_space(cfg)


def test_grid_values_are_validated_and_a_grid_takes_only_values(data_root, tmp_path):
    grid = {"model.arch": {"type": "grid", "values": ["resnet20", "resnet50"]}}
    cfg = tiny_config(
        data_root, str(tmp_path), **{"tune.search_space": grid, "model.arch": "resnet20", "model.shortcut": "none"}
    )
    with pytest.raises(ConfigError, match="tune.search_space.model.arch: 'resnet50' makes an invalid config"):
        validate_search_space(cfg)  # torchvision's resnet50 has no plain (shortcut none) variant
    with pytest.raises(ConfigError, match="tune.search_space.model.arch: grid takes only 'values'"):
        tiny_config(data_root, str(tmp_path), **{"tune.search_space": {"model.arch": {**grid["model.arch"], "low": 1}}})
    with pytest.raises(ConfigError, match="tune.scheduler: 'fifo' is not one of 'asha', 'none'"):
        tiny_config(data_root, str(tmp_path), **{"tune.scheduler": "fifo"})


def test_search_curves_are_labelled_by_the_varied_values_and_count_each_epoch_once():
    from resnet_ray.tune import _curves

    def row(arch, shortcut, history):
        params = {"model.arch": arch, "model.shortcut": shortcut, "optim.lr": 0.1}
        return {"trial_id": arch + shortcut, "params": params, "history": history}

    rows = [
        row("resnet20", "none", [{"epoch": 1, "train_acc": 0.5, "val_top1": 0.4}]),
        # epoch 1 reported again after a restart: the last report counts
        row(
            "resnet56",
            "identity",
            [
                {"epoch": 1, "train_acc": 0.2, "val_top1": 0.1},
                {"epoch": 1, "train_acc": 0.3, "val_top1": 0.25},
                {"epoch": 2, "train_acc": 0.6, "val_top1": 0.5},
            ],
        ),
    ]
    first, second = _curves(rows)
    assert first["label"] == "arch resnet20, shortcut none"  # optim.lr is the same in every trial: not named
    assert second["label"] == "arch resnet56, shortcut identity"
    assert second["epoch"] == [1, 2]
    assert second["train_error"] == pytest.approx([0.7, 0.4]) and second["val_error"] == pytest.approx([0.75, 0.5])
