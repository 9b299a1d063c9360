"""benchmarks/gpu_check.py: the GPU check's stages in a process where Ray cannot be imported (the GPU machine has
no Ray), so that it runs the product's own code and nothing of Ray's. --cpu (tiny sizes) runs everywhere; the real
check runs where a CUDA GPU is (pytest -m gpu)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = (
    "process group",
    "build the worker session",
    "measured epoch",
    "checkpoint save / load",
    "Predictor",
    "CIFAR ResNets",
)


def run_check(tmp_path, *args: str, timeout_s: float) -> dict:
    """Runs the check without Ray; asserts that every stage passed; returns its figures."""
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('Ray is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_ray"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), *args]
    out = subprocess.run(
        [*command, "--json", str(tmp_path / "figures.json")], capture_output=True, text=True, env=env, timeout=timeout_s
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    passed = [line for line in lines if line.startswith("PASS")]
    assert not [line for line in lines if line.startswith("FAIL")]
    for stage in STAGES:
        assert any(stage in line for line in passed), stage
    assert "'ray' imported: False" in out.stdout and "ALL STAGES PASSED" in out.stdout
    figures = json.load(open(tmp_path / "figures.json"))
    assert figures["failed"] == [] and figures["eager"]["train_img_s"] > 0 and figures["eager"]["inference_img_s"] > 0
    assert figures["cifar"]["resnet20_train_img_s"] > 0
    return figures


def test_gpu_check_cpu_mode_passes_without_ray(tmp_path):
    run_check(tmp_path, "--cpu", timeout_s=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_passes_on_a_gpu(tmp_path):
    run_check(tmp_path, "--skip-compile", timeout_s=600)
