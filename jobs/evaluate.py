"""Evaluate a trained model on a prepared split with Ray Data batch inference.

python jobs/evaluate.py --model RUN_DIR_OR_MODEL_FOLDER [--split test] [--config CFG] [--eval.num_actors 4 ...]
Without --config, the config saved with the model is used (overrides still apply), also with --local.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder, checkpoint folder or run folder")
    p.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate (default: eval.split)")
    p.add_argument("--output", help="report folder (default: <run>/eval-<split>)")
    args, overrides = cli.parse(p, local_config=None)  # --local: the model's own config
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.console import print_summary
    from resnet_ray.evaluate import evaluate
    from resnet_ray.saved_model import SavedModel

    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    init_ray(local=args.local, num_cpus=args.num_cpus)
    result = evaluate(cfg, args.model, split=args.split, output=args.output)
    print_summary(result["report"], output=result["output"])
    print(
        f"{result['report']['rows']} images in {result['seconds']:.1f} s ({result['images_per_s']:.0f} img/s); "
        f"report in {result['output']}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
