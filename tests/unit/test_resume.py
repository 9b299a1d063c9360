"""Resuming a run folder with overrides: what may change, what is refused (no Ray needed)."""

import os

import pytest

from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import load_config, to_yaml
from resnet_ray.run_folder import config_file, config_for_resume, write_config


@pytest.fixture
def run_dir(tmp_path):
    cfg = load_config(None, {"train.storage_path": str(tmp_path), "train.name": "run", "train.epochs": 10})
    write_config(os.path.join(tmp_path, "run"), cfg)
    return os.path.join(tmp_path, "run"), cfg


def test_schedule_workers_and_epochs_may_change_on_resume(run_dir):
    folder, saved = run_dir
    cfg = config_for_resume(folder, ["--train.epochs", "20", "--scaling.num_workers", "4", "--optim.lr", "0.02"])
    assert (cfg.train.epochs, cfg.scaling.num_workers, cfg.optim.lr) == (20, 4, 0.02)
    assert cfg.train.name == "run" and cfg.train.storage_path == os.path.dirname(folder)
    # the run folder holds the config each epoch ran under, named in its history rows
    assert open(os.path.join(folder, config_file(saved))).read() == to_yaml(saved)
    assert config_file(cfg) != config_file(saved)


@pytest.mark.parametrize(
    "override, value",
    [
        ("model.arch", "resnet18"),
        ("model.image_size", "64"),
        ("data.source", "cifar10"),
        ("data.seed", "3"),
        ("data.limit", "100"),
    ],
)
def test_overrides_that_cannot_apply_to_a_trained_run_are_refused(run_dir, override, value):
    with pytest.raises(ConfigError, match=f"^{override}: a resumed run keeps"):
        config_for_resume(run_dir[0], [f"--{override}", value])


def test_a_resumed_cifar_resnet_keeps_its_shortcuts(tmp_path):
    """plain vs residual: the same weights fit both, so only this check stops a silent change of network."""
    cfg = load_config(
        None,
        {"train.storage_path": str(tmp_path), "train.name": "r20", "model.arch": "resnet20", "model.weights": "none"},
    )
    write_config(os.path.join(tmp_path, "r20"), cfg)
    with pytest.raises(ConfigError, match="^model.shortcut: a resumed run keeps 'identity'"):
        config_for_resume(os.path.join(tmp_path, "r20"), ["--model.shortcut", "none"])
    same = config_for_resume(os.path.join(tmp_path, "r20"), ["--model.shortcut", "identity"])  # its own: allowed
    assert same.model.shortcut == "identity"


def test_preemptions_have_their_own_budget_beside_worker_failures(tmp_path):
    """train.max_preemptions reaches Ray's FailureConfig apart from train.max_failures: a reclaimed spot node does
    not spend the budget of worker errors."""
    from resnet_ray.train import build_trainer

    overrides = {"train.max_failures": 2, "train.max_preemptions": 5, "train.name": "spot"}
    cfg = load_config(None, {**overrides, "train.storage_path": str(tmp_path)})
    failure = build_trainer(cfg, {"classes": ["a", "b"]}, None).run_config.failure_config
    assert (failure.max_failures, failure.max_preemption_failures) == (2, 5)
    assert load_config(None, {}).train.max_preemptions == -1  # Ray's default: any number of preemptions
