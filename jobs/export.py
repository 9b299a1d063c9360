"""Export a trained model as one ONNX or TorchScript file that takes uint8 pixels, verified before it is kept.

python jobs/export.py --model RUN_OR_MODEL_OR_URI --format onnx|torchscript --output DIR [--verify-rows 256]
The graph takes uint8 (N, S, S, 3) RGB at the model's stored size and does the resize and normalization itself.
It is checked against the PyTorch Predictor on images of the run's test split (the dataset of the run's config:
--data.root to find it elsewhere) and written only when top-1 is identical and every probability within 1e-4.
No Ray is needed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder, run folder or URI")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="the graph's format")
    p.add_argument("--output", required=True, help="export folder (local): the graph file and model.json")
    p.add_argument("--verify-rows", type=int, default=256, metavar="N", help="test images to verify on (256)")
    args, overrides = cli.parse(p, local_config=None)  # the model's own config locates its test split
    cli.setup_logging()
    from resnet_ray.export import export
    from resnet_ray.saved_model import SavedModel

    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    record = export(cfg, args.model, args.format, args.output, rows=args.verify_rows)
    checked = record["verified"]
    print(
        f"{args.format} export in {args.output}: top-1 identical on {checked['images']} test images, probabilities "
        f"within {checked['max_abs_diff']:.1e} of PyTorch"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
