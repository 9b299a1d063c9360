"""Compare two evaluations of the same split: accuracy difference with McNemar's exact test, per-class F1.

python jobs/compare.py EVAL_A EVAL_B [--output DIR] [--alpha 0.05]
EVAL_A, EVAL_B: evaluation output folders of jobs/evaluate.py (report.json + predictions.parquet), local or URI.
Writes comparison.json and comparison.md into --output (default: the current directory). No Ray needed.
An evaluation with test-time augmentation (eval.tta flip) is paired with a plain one only with --allow-tta: the
gain of TTA on the same split, tested by McNemar like any other pair.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.compare import compare_folders, print_comparison, write_comparison

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_a", metavar="EVAL_A", help="the first evaluation folder (A)")
    p.add_argument("eval_b", metavar="EVAL_B", help="the second evaluation folder (B)")
    p.add_argument("--output", default=".", help="folder for comparison.json/.md (default: current directory)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict (default 0.05)")
    p.add_argument(
        "--allow-tta",
        action="store_true",
        help="pair evaluations of different eval.tta (a flip-TTA one with a plain one: the gain of TTA)",
    )
    args = p.parse_args()
    cli.setup_logging()
    result = compare_folders(args.eval_a, args.eval_b, alpha=args.alpha, allow_tta=args.allow_tta)
    print_comparison(result)
    paths = write_comparison(result, args.output)
    print(f"comparison written to {paths['json']} and {paths['markdown']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
