"""Where the local mode's wall time goes: start-up, training epochs, validation + checkpoints, test evaluation.

python benchmarks/local_mode.py [--runs 3] [-- extra overrides for jobs/train.py]

Each run is the README's ``python jobs/train.py --local`` in a fresh process (its own run folder under a temporary
storage path; the digits data is prepared once before the first run, as a user's first run does it). Per run:
- wall: the process from launch to exit;
- epochs: the sum of the history's ``epoch_s`` (the training steps of every epoch, data waits included);
- validation + report: the sum of ``val_s`` and ``report_s`` (validation pass, ray.train.report, checkpoint);
- evaluation: the test evaluation's own wall time (report.json: total support / images_per_s);
- rest: everything else (Python and Ray start, data loading, worker start, export, the final summary, shutdown).
"outside the epochs" = wall - epochs (issue 13's target: <= 30 s on the 2-core dev machine).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, summary


def one_run(storage: str, root: str, name: str, extra: list) -> dict:
    cmd = [
        sys.executable,
        os.path.join(ROOT, "jobs", "train.py"),
        "--local",
        "--data.root",
        root,
        "--train.storage_path",
        storage,
        "--train.name",
        name,
        *extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    run_dir = os.path.join(storage, name)
    history = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
    report = json.load(open(os.path.join(run_dir, "eval-test", "report.json")))
    parts = {
        "wall": wall,
        "epochs": sum(h["epoch_s"] for h in history),
        "validation + report": sum(h["val_s"] + h.get("report_s", 0.0) for h in history),
        "evaluation": report["total_support"] / report["images_per_s"],
    }
    parts["rest"] = wall - parts["epochs"] - parts["validation + report"] - parts["evaluation"]
    parts["outside the epochs"] = wall - parts["epochs"]
    parts["accuracy"] = report["accuracy"]
    print(
        f"  {name}: " + ", ".join(f"{k} {v:.3f}" if k == "accuracy" else f"{k} {v:.1f} s" for k, v in parts.items()),
        flush=True,
    )
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("extra", nargs="*", help="overrides passed to jobs/train.py (after --)")
    args = p.parse_args()

    from resnet_ray.cli import LOCAL_CONFIG
    from resnet_ray.config_files import load_config
    from resnet_ray.data.prepare import ensure_prepared

    with tempfile.TemporaryDirectory(prefix="resnet_ray-bench-local-") as tmp:
        root = os.path.join(tmp, "datasets")
        ensure_prepared(load_config(LOCAL_CONFIG, {"data.root": root}).data)
        runs = [one_run(os.path.join(tmp, "runs"), root, f"local-{i}", args.extra) for i in range(args.runs)]
    print(f"python jobs/train.py --local {' '.join(args.extra)}: {args.runs} runs")
    for key in runs[0]:
        if key == "accuracy":
            print(
                f"{'test accuracy':<48} median {statistics.median(r[key] for r in runs):10.4f}     runs: "
                + ", ".join(f"{r[key]:.4f}" for r in runs)
            )
        else:
            summary(key, [r[key] for r in runs], unit="s")


if __name__ == "__main__":
    main()
