"""Fit a trained model's temperature on its validation split (Guo et al. 2017) and store it in its model.json.

python jobs/calibrate.py --model RUN_OR_MODEL_FOLDER [--config CFG] [--eval.tta flip ...]
One temperature T minimises the NLL of softmax(logits / T) on the val split; predictions keep their top-1, and
evaluation, prediction and serving give calibrated probabilities from then on. Without --config, the config saved
with the model is used (overrides still apply), also with --local. A refit on train+val has no validation split:
the model keeps T = 1, and the job says so.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder or run folder (its model/)")
    args, overrides = cli.parse(p, local_config=None)  # --local: the model's own config
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.console import calibration_line
    from resnet_ray.evaluate import calibrate
    from resnet_ray.saved_model import SavedModel

    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    init_ray(local=args.local, num_cpus=args.num_cpus)
    record = calibrate(cfg, args.model)
    print(f"{calibration_line(record)}; stored in {record['model']}/model.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
