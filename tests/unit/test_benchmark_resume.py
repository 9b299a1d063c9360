"""benchmarks/degradation.py continues where a killed run stopped: the seeds its degradation.json holds in full are
kept, a seed cut off half-way is run again, and figures of another recipe are refused (nothing is trained here)."""

import argparse
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


@pytest.fixture
def degradation(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import degradation

    yield degradation
    sys.modules.pop("degradation", None)


def args(out, **values):
    recipe = {
        "seeds": 3,
        "per_class": 500,
        "test_per_class": None,
        "epochs": 8,
        "warmup_steps": 200,
        "depths": [20, 56],
    }
    return argparse.Namespace(out=str(out), **{**recipe, **values})


def nets(seed, names=("plain-20", "plain-56", "resnet-20", "resnet-56")):
    return [{"net": name, "seed": seed, "train_error": 50.0, "test_error": 50.0} for name in names]


def test_a_rerun_keeps_the_finished_seeds_and_reruns_the_rest(degradation, tmp_path, capsys):
    assert degradation.kept_nets(args(tmp_path)) == []  # a first run: nothing to keep
    # seed 0 finished, seed 1 killed after two of its four nets (as an older script wrote them)
    figures = {"args": vars(args(tmp_path)), "nets": nets(0) + nets(1, ("plain-20", "plain-56"))}
    degradation.write_json(str(tmp_path), figures)
    assert os.listdir(tmp_path) == ["degradation.json"]  # written by rename: no temporary file left
    kept = degradation.kept_nets(args(tmp_path))
    assert kept == nets(0)
    assert capsys.readouterr().out.endswith(f"kept from {tmp_path / 'degradation.json'}: seeds [0]\n")
    assert degradation.kept_nets(args(tmp_path, seeds=1)) == nets(0)


def test_figures_of_another_recipe_are_refused_with_the_flags_that_made_them(degradation, tmp_path):
    degradation.write_json(str(tmp_path), {"args": vars(args(tmp_path, epochs=12)), "nets": nets(0)})
    with pytest.raises(SystemExit, match=r"degradation.json holds runs of another recipe \(.*--epochs 12"):
        degradation.kept_nets(args(tmp_path))
