"""Online prediction: the Serve application over HTTP on 127.0.0.1 at concurrency 1, 8 and 32, vs the same images
through the in-process Predictor.

python benchmarks/serve.py [--requests 256] [--arch resnet18] [--image-size 32] [--size 32] [--photos 64]
python benchmarks/serve.py --requests 48 --photos 16    # a smoke run

A random model (speed does not depend on the weights; benchmarks/predict.py's make_model) is served by one replica
with --replica-cpus CPUs (its torch threads) on a local Ray instance; --photos generated JPEG photos (200-500 px,
benchmarks/prepare.py) are sent --requests times at each concurrency (a bounded load: a fixed number of requests,
threads with keep-alive sessions, the client on the same machine). Reported per level: throughput, p50 / p99 latency
seen by the client, the batches the replica ran by size (from the answers' timing.batch_size). Then the same photos
through resnet_ray.images.decode and the Predictor in this process (--threads threads, batches of --batch-size),
and the ratio of serving throughput at concurrency 32 to it.
"""

import argparse
import glob
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _common import ROOT  # noqa: F401 (puts the repository on sys.path)
from predict import make_model
from prepare import make_photos

LEVELS = (1, 8, 32)


def load(url: str, blobs: list, requests_n: int, concurrency: int) -> dict:
    """``requests_n`` POSTs of the photos in turn from ``concurrency`` threads; client-side figures."""
    import requests

    local = threading.local()
    latencies, sizes, failures = [], Counter(), Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        start = time.perf_counter()
        response = session.post(url, data=blobs[i % len(blobs)], headers={"Content-Type": "image/jpeg"}, timeout=120)
        ms = (time.perf_counter() - start) * 1000
        with lock:
            if response.status_code == 200:
                latencies.append(ms)
                sizes[response.json()["timing"]["batch_size"]] += 1
            else:
                failures[response.status_code] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests_n)))
    seconds = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    return {"rps": len(latencies) / seconds, "p50": p50, "p99": p99, "sizes": sizes, "failures": failures}


def in_process(model_dir: str, blobs: list, size: int, n: int, batch_size: int, threads: int) -> float:
    """Images/s of decode + Predictor in this process over ``n`` images (the photos in turn)."""
    from resnet_ray.images import ResizeSpec, decode
    from resnet_ray.predictor import Predictor

    predictor = Predictor(model_dir, threads=threads, probabilities=True)
    spec = ResizeSpec(size)
    predictor({"image": np.stack([decode(blobs[0], spec)])})  # warm-up
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batch = [blobs[j % len(blobs)] for j in range(i, min(n, i + batch_size))]
        predictor({"image": np.stack([decode(b, spec) for b in batch])})
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    p.add_argument("--photos", type=int, default=64, help="distinct photos sent in turn")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=32, help="model.image_size")
    p.add_argument("--size", type=int, default=32, help="the stored size (data.image_size of the training data)")
    p.add_argument("--max-batch-size", type=int, default=16, help="serve.max_batch_size")
    p.add_argument("--replica-cpus", type=float, default=float(os.cpu_count()), help="serve.cpus_per_replica")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the in-process Predictor")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the in-process Predictor")
    args = p.parse_args()

    import logging

    from resnet_ray import serve as rs
    from resnet_ray.config_files import replace
    from resnet_ray.runtime import _free_port, init_ray

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        photos = os.path.join(tmp, "photos")
        make_photos(photos, args.photos, 10, 200, 500)
        blobs = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(photos, "*", "*.jpg")))]
        cfg, model_dir = make_model(tmp, args.arch, args.image_size, args.size, 10)
        cfg = replace(
            cfg,
            {
                "serve.port": _free_port(),
                "serve.cpus_per_replica": args.replica_cpus,
                "serve.max_batch_size": args.max_batch_size,
                "serve.max_ongoing_requests": max(32, args.max_batch_size),
                "serve.max_queued_requests": 256,  # a bounded load: nothing here should be refused
            },
        )
        init_ray(local=True, num_cpus=max(args.replica_cpus, 1))
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        started = time.perf_counter()
        url = rs.start(cfg, model_dir, name="bench")
        print(
            f"{args.arch} at {args.image_size} px from {args.size} px; {len(blobs)} JPEG photos of 200-500 px; "
            f"1 replica x {args.replica_cpus:g} CPUs, max batch {args.max_batch_size}; {os.cpu_count()} cores "
            f"(client, proxy and replica share them); started in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        try:
            load(url, blobs, min(16, args.requests), 8)  # warm-up: connections, threads, the first batches
            results = {}
            for level in LEVELS:
                r = results[level] = load(url, blobs, args.requests, level)
                batches = {size: round(n / size) for size, n in sorted(r["sizes"].items())}  # n answers of size
                mean = sum(r["sizes"].values()) / max(1, sum(batches.values()))
                print(
                    f"concurrency {level:>2}: {r['rps']:7.1f} req/s   p50 {r['p50']:7.1f} ms   p99 {r['p99']:7.1f} ms"
                    f"   batches by size {batches} (mean {mean:.1f} images)"
                    + (f"   failed {dict(r['failures'])}" if r["failures"] else ""),
                    flush=True,
                )
        finally:
            rs.stop("bench", whole_serve=True)
        direct = in_process(model_dir, blobs, args.size, args.requests, args.batch_size, args.threads)
        print(
            f"in-process Predictor (decode + predict, batches of {args.batch_size}, {args.threads} threads): "
            f"{direct:7.1f} img/s",
            flush=True,
        )
        print(f"ratio serving at concurrency 32 / in-process Predictor: {results[32]['rps'] / direct:.2f}x")


if __name__ == "__main__":
    main()
