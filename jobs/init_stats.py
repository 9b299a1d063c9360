"""The signal at initialization: activations, activation gradients and weight gradients per conv layer of several
nets, on one batch, without training (He et al. 2015; Glorot & Bengio 2010; Philipp et al. 2018).

python jobs/init_stats.py --local [--net "LABEL:model.arch=plain56,model.init=xavier" ...] [--noise] [--output DIR]
Each --net is the config's model with model.* overrides (default: plain-56 without BN under Xavier and He init,
plain-56 with BN, ResNet-56). The batch: the first --rows training images of the config's data (--local: the
digits of configs/local.yaml), or N(0, 1) noise with --noise. Writes signal.json and signal.png into --output.
Seconds on a CPU; no Ray.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--net", action="append", help="LABEL:model.field=value[,...] (repeat for several nets)")
    p.add_argument("--noise", action="store_true", help="a batch of N(0, 1) noise instead of training images")
    p.add_argument("--rows", type=int, default=64, help="images in the batch (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="init-stats", help="output folder (default: ./init-stats)")
    args, overrides = cli.parse(p)
    cli.setup_logging()
    if args.rows < 2:
        p.error(f"--rows must be >= 2 (BatchNorm needs a batch), got {args.rows}")
    from resnet_ray.init_stats import DEFAULT_NETS, init_signal

    cfg = cli.config_from(args, overrides)
    result = init_signal(cfg, args.net or list(DEFAULT_NETS), args.output, args.rows, args.noise, args.seed)
    print(f"batch: {result['batch']}")
    print(f"{'net':<28} {'layers':>6} {'activation grad first/last':>27} {'weight grad first/last':>23}")
    for net in result["nets"]:
        print(
            f"{net['net']:<28} {net['layers']:>6} {net['activation_grad_first_last']:>27.3g} "
            f"{net['weight_grad_first_last']:>23.3g}"
        )
    print(f"signal.json and signal.png in {result['output']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
