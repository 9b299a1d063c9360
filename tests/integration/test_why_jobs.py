"""The "why" jobs as a user runs them: jobs/lesion.py on a 1-epoch ResNet-20 (on the session's Ray, Ray Data
actors like the evaluation) and jobs/init_stats.py (no Ray, seconds)."""

import json
import os
import runpy
import subprocess
import sys

import pytest
from conftest import tiny_config

from resnet_ray import cli

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resnet20_run(ray_session, data_root, tmp_path_factory):
    from resnet_ray.train import fit

    cfg = tiny_config(
        data_root,
        str(tmp_path_factory.mktemp("runs")),
        **{"model.arch": "resnet20", "train.epochs": 1, "train.name": "r20", "optim.name": "sgd", "optim.lr": 0.05},
    )
    return fit(cfg)


def test_the_lesion_job_removes_each_of_resnet20s_nine_blocks_and_k_random_ones(
    resnet20_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "lesion"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["jobs/lesion.py", "--local", "--model", resnet20_run.run_dir, "--output", str(out), "--draws", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(cli, "finish", sys.exit)  # the job ends its process with os._exit: here, a plain exit
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "jobs", "lesion.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed
    study = json.load(open(out / "lesion.json"))
    assert study["rows"] == 240 and study["arch"] == "resnet20"  # the tiny run's test split (data.limit), each row once
    assert len(study["blocks"]) == 9
    assert [b["block"] for b in study["blocks"] if b["downsampling"]] == ["layer2.0", "layer3.0"]
    assert all(0.0 <= b["accuracy"] <= 1.0 for b in study["blocks"])
    assert [r["k"] for r in study["random_k"]] == list(range(1, 8))  # the 7 non-downsampling blocks
    assert [r["draws"] for r in study["random_k"]] == [3, 3, 3, 3, 3, 3, 1]  # all 7 at once: one set only
    assert len(study["responses"]) == 19 and study["chance"] == 0.1
    assert (out / "lesion.png").read_bytes()[:8] == PNG and (out / "responses.png").read_bytes()[:8] == PNG
    assert "without layer2.0 (downsampling): " in printed and "without 7 random blocks: " in printed


def test_init_stats_compares_nets_in_seconds(tmp_path):
    out = tmp_path / "signal"
    nets = ["plain-20 xavier:model.arch=plain20,model.norm=none,model.init=xavier", "resnet-20:model.arch=resnet20"]
    proc = subprocess.run(
        [sys.executable, "jobs/init_stats.py", "--noise", "--rows", "16", "--output", str(out)]
        + [arg for net in nets for arg in ("--net", net)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.load(open(out / "signal.json"))
    ratios = {n["net"]: n["activation_grad_first_last"] for n in result["nets"]}
    assert list(ratios) == ["plain-20 xavier", "resnet-20"]
    assert ratios["plain-20 xavier"] < 1e-2 < ratios["resnet-20"]  # vanishing without BN under Xavier: 2^-9 or so
    assert [(r["net"], r["layer"]) for r in result["rows"]] == [(n, i) for n in ratios for i in range(1, 20)]
    assert (out / "signal.png").read_bytes()[:8] == PNG
    assert "plain-20 xavier" in proc.stdout and "N(0, 1) noise" in proc.stdout


def test_a_net_that_is_not_model_fields_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/init_stats.py", "--noise", "--net", "x:optim.lr=1", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --net 'x:optim.lr=1': 'optim.lr=1' is not model.field=value"
    ]
