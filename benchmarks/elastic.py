"""What a resize of an elastic run costs on the loopback multi-node cluster (issue 34).

Each run is the elastic test of tests/integration/test_multinode_s3.py with the fixtures it needs (a fresh 3-node
cluster on 127.0.0.1 with the S3 server, the data, the search, the node-loss run): that run's --resume continues it
with scaling.num_workers [1, 2] through a preemption notice and the reclaim of that node, then a node joining.
It prints two times, each from the event to the start of the first epoch on the new worker group:
  shrink   the preemption notice's deadline (Ray Train restarts the run then; the node goes) -> training on 1 worker
  grow     a node has joined the cluster -> training on 2 workers
Every finished run is appended to --out at once: a rerun continues until --runs are there.

    python benchmarks/elastic.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from _common import ROOT, summary

LINE = re.compile(
    r"elastic: training on 1 worker (-?\d+) s after the notice's deadline .*?, on 2 workers (\d+) s after a node joined"
)
NAMES = ("shrink_s", "grow_s")


def one_run() -> dict:
    """One pass of the elastic test; its two times."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        os.path.join(ROOT, "tests", "integration", "test_multinode_s3.py"),
        "-k",
        "elastic",
    ]
    # Ray's default GCS health check (the test checks every second to finish sooner)
    env = {**os.environ, "RAY_health_check_period_ms": "3000"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    found = LINE.search(done.stdout)
    if done.returncode != 0 or not found:
        sys.exit(f"the elastic test failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return dict(zip(NAMES, map(float, found.groups())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "elastic.json"))
    args = parser.parse_args()
    runs = json.load(open(args.out)) if os.path.exists(args.out) else []
    if runs:
        print(f"{args.out}: {len(runs)} run(s) kept, {max(0, args.runs - len(runs))} to go", flush=True)
    while len(runs) < args.runs:
        runs.append(one_run())
        print(f"run {len(runs)}: {runs[-1]}", flush=True)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(tmp, args.out)
    for name in NAMES:
        summary(name, [r[name] for r in runs], unit="s")


if __name__ == "__main__":
    main()
