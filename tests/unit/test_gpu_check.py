"""benchmarks/gpu_check.py --cpu: the GPU check's stages at tiny sizes, in a process where Ray cannot be imported
(the GPU machine has no Ray), so that it runs the product's own code and nothing of Ray's."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_cpu_mode_passes_without_ray(tmp_path):
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('Ray is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_ray"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_check.py"),
            "--cpu",
            "--json",
            str(tmp_path / "figures.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    passed = [line for line in lines if line.startswith("PASS")]
    assert not [line for line in lines if line.startswith("FAIL")]
    for stage in (
        "process group",
        "build the worker session",
        "measured epoch",
        "checkpoint save / load",
        "Predictor batch inference",
    ):
        assert any(stage in line for line in passed), stage
    assert "'ray' imported: False" in out.stdout and "ALL STAGES PASSED" in out.stdout

    figures = json.load(open(tmp_path / "figures.json"))
    assert figures["failed"] == [] and figures["eager"]["train_img_s"] > 0 and figures["eager"]["inference_img_s"] > 0
