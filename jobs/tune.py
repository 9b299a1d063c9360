"""Search fine-tuning hyperparameters with Ray Tune (ASHA) over Ray Train runs.

python jobs/tune.py --config configs/tune-cifar10.yaml      --local: configs/tune-local.yaml on this machine
python jobs/tune.py --resume EXPERIMENT_DIR                 continue an interrupted search (path or URI)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue the search saved in EXPERIMENT_DIR")
    args, overrides = cli.parse(p, local_config=cli.LOCAL_TUNE_CONFIG)
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.console import print_search_summary
    from resnet_ray.tune import (
        config_for_resume,
        experiment_dir,
        interrupted_search,
        local_cpus_for,
        search,
        with_search_name,
    )

    cfg = config_for_resume(args.resume, overrides) if args.resume else cli.config_from(args, overrides)
    cfg = with_search_name(cfg)
    exp_dir = experiment_dir(cfg)
    cli.on_interrupt(lambda: interrupted_search(exp_dir, cli.resume_command("tune", exp_dir, args)))
    num_cpus = local_cpus_for(cfg) if args.local and args.num_cpus is None else args.num_cpus
    init_ray(local=args.local, num_cpus=num_cpus)
    result = search(cfg, resume=bool(args.resume))
    print_search_summary(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
