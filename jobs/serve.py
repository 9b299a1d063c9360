"""Serve a trained model over HTTP with Ray Serve: POST /predict, GET /healthz, GET /model.

python jobs/serve.py --model RUN_OR_MODEL_OR_URI [--local] [--serve.port 8000 --serve.num_replicas 2 ...]
Listens on serve.host (127.0.0.1 unless told otherwise), prints the URL, then one line per --report-every
seconds (requests, p50/p99 latency, errors, batch sizes); Ctrl-C stops it and removes the application. Without
--config, the model's own config is used (overrides still apply), also with --local.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray, started_here

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder, run folder or URI")
    p.add_argument("--report-every", type=float, default=60.0, metavar="S", help="seconds between lines (60)")
    args, overrides = cli.parse(p, local_config=None)  # --local: the model's own config
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.saved_model import SavedModel
    from resnet_ray.serve import serve_until_interrupted

    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    init_ray(local=args.local, num_cpus=args.num_cpus)
    printed = lambda line: print(line, flush=True)  # noqa: E731
    serve_until_interrupted(cfg, args.model, args.report_every, printed, whole_serve=started_here())
    return 0


if __name__ == "__main__":
    cli.run(main)
