"""A person stops a job (Ctrl-C, SIGTERM): one line with what was kept and the command that continues it, exit
status 130 or 143; no traceback."""

import argparse
import json
import signal

import pytest

from resnet_ray import cli
from resnet_ray.run_folder import interrupted_run


@pytest.fixture
def exits(monkeypatch):
    """cli.finish records the exit status instead of ending the test process."""
    codes = []

    def finish(code):
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli, "finish", finish)
    monkeypatch.setattr(cli, "_interrupt_hint", None)
    yield codes
    signal.signal(signal.SIGINT, signal.default_int_handler)  # cli.run leaves a second Ctrl-C to the default
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted(signum):
    def main():
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # what Python raises on Ctrl-C
        signal.raise_signal(signal.SIGTERM)  # cli.run's handler, the same as ray.init's: SystemExit(15)

    return main


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_job_says_what_was_kept_and_exits_128_plus_the_signal(exits, capsys, signum, status):
    cli.on_interrupt(
        lambda: "kept the checkpoint of epoch 3 in runs/a; continue with: python jobs/train.py --resume runs/a"
    )
    with pytest.raises(SystemExit):
        cli.run(interrupted(signum))
    assert exits == [status]
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert err == (
        f"interrupted by {name}: kept the checkpoint of epoch 3 in runs/a; continue with: "
        "python jobs/train.py --resume runs/a\n"
    )


def test_a_job_without_a_hint_still_says_it_was_interrupted(exits, capsys):
    with pytest.raises(SystemExit):
        cli.run(interrupted(signal.SIGINT))
    assert exits == [130] and capsys.readouterr().err == "interrupted by SIGINT\n"


def test_a_failing_hint_does_not_hide_the_line(exits, capsys):
    def hint():
        raise OSError("the bucket did not answer")

    cli.on_interrupt(hint)
    with pytest.raises(SystemExit):
        cli.run(interrupted(signal.SIGTERM))
    assert exits == [143]
    assert (
        "interrupted by SIGTERM: what was kept is unknown (OSError: the bucket did not answer)"
        in capsys.readouterr().err
    )


def test_usage_errors_keep_their_own_exit_status(exits):
    def main():
        raise SystemExit(2)  # argparse

    with pytest.raises(SystemExit) as info:
        cli.run(main)
    assert info.value.code == 2 and exits == []


def test_the_resume_command_keeps_the_options_that_choose_the_ray_instance():
    local = argparse.Namespace(local=True, num_cpus=3.0)
    assert cli.resume_command("train", "/tmp/my runs/a", local) == (
        "python jobs/train.py --resume '/tmp/my runs/a' --local --num-cpus 3"
    )
    cluster = argparse.Namespace(local=False, num_cpus=None)
    assert cli.resume_command("tune", "s3://b/tune/s", cluster) == "python jobs/tune.py --resume s3://b/tune/s"


def test_what_an_interrupted_run_kept(tmp_path):
    run = tmp_path / "run"
    assert interrupted_run(str(run), "CMD") == (
        "nothing was kept: the run had not started training; run the same command again"
    )
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    assert interrupted_run(str(run), "CMD") == (
        f"no epoch checkpointed yet (it starts at epoch 1) in {run}; continue with: CMD"
    )
    snapshot = {"latest_checkpoint_result": {"metrics": {"epoch": 4}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert interrupted_run(str(run), "CMD") == f"kept the checkpoint of epoch 4 in {run}; continue with: CMD"
