"""Predict the classes of unlabeled images with a trained model (Ray Data batch inference).

python jobs/predict.py --model RUN_OR_MODEL --input PATH_OR_URI [--output OUT.parquet] [--top-k 5]
--input: a folder or glob of image files, or a Parquet file or folder with an image column, local or URI.
Images are resized like the model's training data (model.json); probabilities are calibrated by the model's
temperature (model.json; --no-calibration: the raw softmax; top-1 is the same either way); --eval.tta flip
averages each image with its mirror. Without --config, the model's own config is used (overrides still apply:
--eval.num_actors 4, --data.on_bad_image skip, ...), also with --local.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job submit --working-dir .

from resnet_ray import cli  # noqa: E402


def main() -> int:
    from resnet_ray.runtime import check_cluster, init_ray

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="exported model folder, checkpoint folder or run folder")
    p.add_argument("--input", required=True, help="folder, glob or file of images, or Parquet file/folder")
    p.add_argument("--output", help="predictions Parquet file (default: <run>/predict-<input name>.parquet)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image, most probable first (default 5)")
    p.add_argument("--image-column", help="image column of a Parquet input (default: data.image_column)")
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="raw softmax probabilities instead of the calibrated ones (the model's temperature, model.json)",
    )
    args, overrides = cli.parse(p, local_config=None)  # --local: the model's own config
    cli.setup_logging()
    check_cluster(args.local)  # a dead cluster address fails here, in seconds, before torch is imported
    from resnet_ray.console import progress_bar
    from resnet_ray.predict import predict
    from resnet_ray.saved_model import SavedModel

    cfg = cli.config_from(args, overrides) if args.config else SavedModel.read(args.model).config(overrides)
    init_ray(local=args.local, num_cpus=args.num_cpus)
    with progress_bar("predicting") as (start, advance):
        result = predict(
            cfg,
            args.model,
            args.input,
            output=args.output,
            k=args.top_k,
            image_column=args.image_column,
            calibrated=not args.no_calibration,
            on_start=start,
            on_rows=advance,
        )
    skipped = f", {len(result['skipped'])} skipped (unreadable)" if result["skipped"] else ""
    probabilities = f"calibrated (T = {result['temperature']:.4g})" if result["calibrated"] else "raw (T = 1)"
    print(
        f"{result['rows']} images{skipped} in {result['seconds']:.1f} s ({result['images_per_s']:.3g} img/s); "
        f"{probabilities} probabilities, eval.tta {result['tta']}; predictions in {result['output']}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
