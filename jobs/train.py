"""Fine-tune a ResNet with Ray Train.  python jobs/train.py --config configs/cifar10.yaml [--optim.lr 0.01 ...]

--local runs the offline single-node test mode (configs/local.yaml); --resume RUN_DIR continues a stopped run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    args, overrides = cli.parse(p)
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.console import print_training_summary
    from resnet_ray.run_folder import config_for_resume, interrupted_run, run_dir_of, with_run_name
    from resnet_ray.train import fit

    cfg = with_run_name(config_for_resume(args.resume, overrides) if args.resume else cli.config_from(args, overrides))
    run_dir = run_dir_of(cfg)
    cli.on_interrupt(lambda: interrupted_run(run_dir, cli.resume_command("train", run_dir, args)))
    init_ray(local=args.local, num_cpus=args.num_cpus)
    result = fit(cfg)
    print_training_summary(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
