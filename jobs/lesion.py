"""The lesion study of a trained net (Veit et al. 2016) and its layer responses (He et al. 2016a, Fig. 7).

python jobs/lesion.py --model RUN_DIR_OR_MODEL_FOLDER [--split test] [--draws 5] [--output DIR] [--local]
The accuracy with each block's residual branch removed (its shortcut kept), one block at a time, and with k random
non-downsampling blocks removed (--draws seeded draws per k), on the evaluation's inference; then the std of each
3x3 layer's response (CIFAR nets). Writes lesion.json, lesion.png and responses.png into --output (default:
<run>/lesion-<split>). Without --config, the config saved with the model is used (overrides still apply).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder, checkpoint folder or run folder")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="split (default: test)")
    p.add_argument("--draws", type=int, default=5, help="random draws of k removed blocks, for every k (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--output", help="output folder (default: <run>/lesion-<split>)")
    args, overrides = cli.parse(p, local_config=None)  # --local: the model's own config
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.lesion_study import lesion_study
    from resnet_ray.saved_model import SavedModel

    if args.draws < 1:
        p.error(f"--draws must be >= 1, got {args.draws}")
    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    init_ray(local=args.local, num_cpus=args.num_cpus)
    study = lesion_study(cfg, args.model, split=args.split, output=args.output, draws=args.draws, seed=args.seed)
    print(f"{study['arch']} on {study['split']} ({study['rows']} images): accuracy {study['baseline_accuracy']:.4f}")
    for row in study["blocks"]:
        kind = " (downsampling)" if row["downsampling"] else ""
        shown = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "cannot be removed (a plain net's)"
        print(f"  without {row['block']}{kind}: {shown}")
    for row in study["random_k"]:
        print(f"  without {row['k']} random blocks: {row['mean']:.4f} +- {row['std']:.4f} ({row['draws']} draws)")
    files = "lesion.json, lesion.png and responses.png" if study["responses"] else "lesion.json and lesion.png"
    print(f"{files} in {study['output']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
