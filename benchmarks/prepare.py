"""Prepare throughput and the driver's peak memory on a folder of JPEG photos of mixed sizes, next to a plain
single-process PIL loop over the same files.

python benchmarks/prepare.py [--images 20000] [--min-px 200 --max-px 500] [--size 64] [--runs 3] [--ray]
python benchmarks/prepare.py --images 200 --runs 1                      # a smoke run

The script generates the photos itself (10 class folders; smooth random content, JPEG quality 90, so that files
are photo-sized), then per run, each in a fresh Python process:
(a) resnet_ray.data.prepare.prepare of the folder (the streamed image-folder path: shard tasks on local threads,
    or with --ray on a local Ray instance with this machine's cores, Ray's start not timed), and the process's
    peak RSS (the driver's: Ray's workers are other processes);
(b) open, EXIF transpose, RGB, centre crop + resize to --size, into one array: the same decode with Pillow in a
    loop, no Parquet, no splits.
Runs are interleaved; the script prints per-run figures, medians and the ratio a/b.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from _common import ROOT, summary

CHILD_PREPARE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from resnet_ray.config import DataConfig
from resnet_ray.data.prepare import prepare
if {ray}:
    from resnet_ray.runtime import init_ray
    init_ray(local=True)
cfg = DataConfig(source="imagefolder", path={path!r}, root={out!r}, image_size={size})
start = time.perf_counter()
prepare(cfg)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CHILD_PIL = r"""
import glob, json, os, sys, time
import numpy as np
from PIL import Image, ImageOps
files = sorted(glob.glob(os.path.join({path!r}, "*", "*.jpg")))
out = np.empty((len(files), {size}, {size}, 3), np.uint8)
start = time.perf_counter()
for i, f in enumerate(files):
    with Image.open(f) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        out[i] = np.asarray(ImageOps.fit(im, ({size}, {size}), Image.Resampling.BICUBIC))
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def _photo(args):
    """One JPEG photo of a random size: upscaled 6x6 colour noise plus fine noise (compresses like a photo)."""
    import numpy as np
    from PIL import Image

    path, seed, min_px, max_px = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def make_photos(folder: str, n: int, classes: int, min_px: int, max_px: int) -> int:
    jobs = []
    for i in range(n):
        class_dir = os.path.join(folder, f"class{i % classes:02d}")
        os.makedirs(class_dir, exist_ok=True)
        jobs.append((os.path.join(class_dir, f"{i:06d}.jpg"), i, min_px, max_px))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_photo, jobs, chunksize=64))
    return sum(os.path.getsize(j[0]) for j in jobs)


def child(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    )
    if out.returncode:
        sys.exit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--min-px", type=int, default=200)
    p.add_argument("--max-px", type=int, default=500)
    p.add_argument("--size", type=int, default=64, help="data.image_size: the stored size")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ray", action="store_true", help="prepare connected to a local Ray instance (Ray tasks)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        photos = os.path.join(tmp, "photos")
        size = make_photos(photos, args.images, args.classes, args.min_px, args.max_px)
        print(
            f"{args.images} JPEG photos of {args.min_px}-{args.max_px} px, {size / 2**20:.0f} MiB, "
            f"{args.classes} classes; stored size {args.size}; {os.cpu_count()} cores; "
            f"prepare on {'Ray tasks' if args.ray else 'local threads'}",
            flush=True,
        )
        prepared, plain, rss, ratios = [], [], [], []
        for run in range(args.runs):
            a = child(
                CHILD_PREPARE.format(
                    root=ROOT, ray=args.ray, path=photos, out=os.path.join(tmp, f"root{run}"), size=args.size
                )
            )
            b = child(CHILD_PIL.format(path=photos, size=args.size))
            prepared.append(args.images / a["seconds"])
            plain.append(args.images / b["seconds"])
            rss.append(a["peak_rss_mib"])
            ratios.append(prepared[-1] / plain[-1])
            print(
                f"run {run + 1}: prepare {prepared[-1]:.0f} img/s (driver peak RSS {rss[-1]:.0f} MiB), "
                f"PIL loop {plain[-1]:.0f} img/s",
                flush=True,
            )
        summary("(a) prepare (streamed image folder)", prepared)
        summary("(b) single-process PIL loop", plain)
        summary("driver peak RSS of (a)", rss, unit="MiB")
        summary("ratio a/b", ratios, unit="x")


if __name__ == "__main__":
    main()
