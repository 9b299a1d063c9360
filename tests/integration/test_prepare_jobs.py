"""jobs/prepare.py as separate processes: two at once on a new dataset, and one SIGKILLed mid-write."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare_job(root, *extra):
    return subprocess.Popen(
        [sys.executable, "jobs/prepare.py", "--local", "--data.root", root, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def datasets(root):
    """The prepared folders of digits below root, and every temporary folder."""
    entries = glob.glob(os.path.join(root, "digits", "*"))
    return (
        [e for e in entries if os.path.isfile(os.path.join(e, "metadata.json"))],
        [e for e in entries if ".tmp-" in os.path.basename(e)],
    )


def test_two_concurrent_prepares_both_succeed_and_leave_one_dataset(tmp_path):
    root = str(tmp_path / "datasets")
    jobs = [prepare_job(root), prepare_job(root)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    prepared, temporary = datasets(root)
    assert len(prepared) == 1 and temporary == []
    assert all(output.rstrip().endswith(f"-> {prepared[0]}") for output in outputs), outputs
    assert all("; no exact duplicate images -> " in output for output in outputs), (
        outputs
    )  # the closing line counts them
    assert sum("prepared digits at" in output for output in outputs) == 1  # the other one waited and reused it


def test_a_killed_prepare_is_cleaned_up_by_the_next_one(tmp_path):
    root = str(tmp_path / "datasets")
    extra = ["--data.image_size", "96"]  # bigger images: writing takes long enough to be caught at it
    job = prepare_job(root, *extra)
    deadline = time.monotonic() + 120
    while not datasets(root)[1]:
        assert job.poll() is None, "the prepare finished before it could be killed: " + job.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=30)
    assert datasets(root)[1]  # it died mid-write and left its temporary folder

    rerun = prepare_job(root, *extra)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    prepared, temporary = datasets(root)
    assert len(prepared) == 1 and temporary == []
