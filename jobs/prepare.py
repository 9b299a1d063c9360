"""Prepare a data source into the canonical Parquet dataset.  python jobs/prepare.py --config CFG [--data.* ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.data.prepare import ensure_prepared

    args, overrides = cli.parse(cli.parser(__doc__))
    cli.setup_logging()
    cfg = cli.config_from(args, overrides)
    prepared, meta = ensure_prepared(cfg.data)
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    print(f"{meta['name']}: {len(meta['classes'])} classes; {counts} -> {prepared}")
    return 0


if __name__ == "__main__":
    cli.run(main)
