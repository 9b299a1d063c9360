"""Prepare a data source into the canonical Parquet dataset.  python jobs/prepare.py --config CFG [--data.* ...]

An image folder is prepared in parallel shard tasks: on the Ray cluster when there is one to join (RAY_ADDRESS,
as inside `ray job submit`, or a running `ray start`; never with --local), else on this machine's cores.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    args, overrides = cli.parse(cli.parser(__doc__))
    cli.setup_logging()
    address = check_cluster(args.local)  # a dead cluster address fails here, in seconds
    from resnet_ray.console import progress_bar
    from resnet_ray.data.layout import duplicates_summary
    from resnet_ray.data.prepare import ensure_prepared

    cfg = cli.config_from(args, overrides)
    if address is not None:
        init_ray()
    with progress_bar(f"preparing {cfg.data.dataset_name}") as (start, advance):
        prepared, meta = ensure_prepared(cfg.data, on_start=start, on_rows=advance)
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    duplicates = duplicates_summary(meta.get("duplicates"))
    print(f"{meta['name']}: {len(meta['classes'])} classes; {counts}; {duplicates} -> {prepared}")
    return 0


if __name__ == "__main__":
    cli.run(main)
