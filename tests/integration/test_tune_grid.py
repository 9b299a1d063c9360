"""The degradation grid as a user runs it (jobs/tune.py --local --config configs/tune-degradation.yaml), shrunk by
overrides: every cell of depth x shortcut exactly once, no early stopping, and the search's curves.png."""

import csv
import os
import runpy
import sys

import pytest

from resnet_ray import cli

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_degradation_grid_runs_every_cell_once_to_the_end_and_draws_the_curves(
    ray_session, data_root, tmp_path, monkeypatch, capsys
):
    overrides = {
        "data.source": "digits",
        "data.root": data_root,
        "data.limit": 240,
        "train.batch_size": 32,
        "train.storage_path": str(tmp_path),
        "optim.warmup_epochs": 0.5,
        "scaling.cpus_per_worker": 1,
        "eval.in_process_rows": 0,
        "tune.name": "grid",
        "tune.max_epochs": 2,
        "tune.max_concurrent_trials": 2,  # the session's 4 logical CPUs: two trials (driver + worker each) at once
        "tune.search_space.model.arch": "{type: grid, values: [resnet20, resnet32]}",
    }
    argv = ["jobs/tune.py", "--local", "--config", os.path.join(ROOT, "configs", "tune-degradation.yaml")]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(cli, "finish", sys.exit)  # the job ends its process with os._exit: here, a plain exit
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "jobs", "tune.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed

    experiment = tmp_path / "grid"
    rows = list(csv.DictReader(open(experiment / "trials.csv")))
    cells = sorted((row["model.arch"], row["model.shortcut"]) for row in rows)
    assert cells == [(a, s) for a in ("resnet20", "resnet32") for s in ("identity", "none")]  # each cell once
    assert all(row["status"] == "completed" and row["epochs"] == "2" for row in rows)  # none stopped early
    assert (experiment / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"curves: {experiment / 'curves.png'}" in printed
