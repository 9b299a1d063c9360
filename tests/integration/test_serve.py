"""The Serve application over HTTP on 127.0.0.1 (one app on the session's Ray for the module), and jobs/serve.py
as a subprocess: answers equal jobs/predict.py's for the same files; every bad input gets its 4xx and the replica
keeps serving; concurrent requests are batched; a full queue answers 503 with Retry-After; the API key is enforced;
Ctrl-C stops the job and leaves no process behind."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from conftest import foreground_job
from PIL import Image

from resnet_ray.config_files import replace
from resnet_ray.data.load import read_split
from resnet_ray.data.prepare import dataset_dir
from resnet_ray.runtime import _free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY_ENV, KEY = "RESNET_RAY_TEST_SERVE_KEY", "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 256 * 1024
N = 10


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height: a decompression bomb as far as the header goes."""
    blob = encode(np.zeros((4, 4, 3), np.uint8))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return blob[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + blob[33:]


@pytest.fixture(scope="module")
def service(tiny_run):
    """(base URL, the model's config) of the tiny run's model served on the session's Ray: small batches and
    queues so that the tests can fill them, a small body bound, and an API key."""
    from ray import serve

    from resnet_ray import serve as rs

    cfg, result = tiny_run
    port = _free_port()
    overrides = {
        "serve.port": port,
        "serve.max_batch_size": 8,
        "serve.batch_wait_timeout_s": 0.05,
        "serve.max_ongoing_requests": 8,
        # a burst's requests count as queued at the proxy until each is assigned a replica: room for one of 8
        "serve.max_queued_requests": 8,
        "serve.max_image_bytes": MAX_BYTES,
        "serve.api_key_env": KEY_ENV,
    }
    serve_cfg = replace(cfg, overrides)
    os.environ[KEY_ENV] = KEY  # read by build_app here; the replicas get only its SHA-256
    try:
        url = rs.start(serve_cfg, result.run_dir, name="test_serve")
    finally:
        del os.environ[KEY_ENV]
    assert url == f"http://127.0.0.1:{port}/predict"
    yield f"http://127.0.0.1:{port}", serve_cfg, result
    serve.shutdown()


def post(url: str, body: bytes, ctype: str | None = "image/png", headers: dict = AUTH, **kwargs) -> requests.Response:
    return requests.post(
        f"{url}/predict",
        data=body,
        headers={**headers, **({"Content-Type": ctype} if ctype else {})},
        timeout=60,
        **kwargs,
    )


@pytest.fixture(scope="module")
def image_files(service, tmp_path_factory):
    """A folder of image files: the first N test images as PNG, and photos of other sizes and formats."""
    _, cfg, _ = service
    rows = next(read_split(cfg.data, "test", dataset_dir(cfg.data)))["image"][:N]
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("serve-images")
    for i, image in enumerate(rows):
        (folder / f"test-{i:02d}.png").write_bytes(encode(image))
    (folder / "wide.jpg").write_bytes(encode(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8), "JPEG"))
    (folder / "gray.png").write_bytes(encode(rng.integers(0, 256, (50, 40), dtype=np.uint8)))
    return folder


def test_answers_equal_the_prediction_jobs_for_the_same_files(service, image_files, tmp_path):
    from resnet_ray.predict import predict

    url, cfg, result = service
    out = predict(cfg, result.run_dir, str(image_files), output=str(tmp_path / "p.parquet"))
    table = pq.read_table(out["output"]).to_pylist()
    assert len(table) == N + 2
    info = json.load(open(os.path.join(result.model_dir, "model.json")))
    for row in table:
        with open(row["path"], "rb") as f:
            body = f.read()
        ctype = "image/jpeg" if row["path"].endswith(".jpg") else "image/png"
        answer = post(url, body, ctype).json()
        assert answer["pred"] == row["pred"] and answer["class"] == row["class"], row["path"]
        assert answer["top_classes"] == row["top_classes"]
        assert np.allclose(answer["top_probs"], row["top_probs"], atol=1e-5, rtol=0), row["path"]
        assert answer["model_sha256"] == row["model_sha256"] == info["sha256"]
        timing = answer["timing"]
        assert timing["total_ms"] >= timing["inference_ms"] > 0 and timing["batch_size"] >= 1
    # a multipart upload of a file is the same request
    name = table[0]["path"]
    with open(name, "rb") as f:
        multi = requests.post(f"{url}/predict", files={"file": ("x.png", f, "image/png")}, headers=AUTH, timeout=60)
    assert (
        multi.status_code == 200 and multi.json()["top_probs"] == post(url, open(name, "rb").read()).json()["top_probs"]
    )
    assert len(post(url, open(name, "rb").read(), params={"top_k": 2}).json()["top_probs"]) == 2


def test_the_model_card_and_health(service):
    url, cfg, result = service
    info = json.load(open(os.path.join(result.model_dir, "model.json")))
    card = requests.get(f"{url}/model", headers=AUTH, timeout=30).json()
    assert card["classes"] == info["classes"] and card["model_sha256"] == info["sha256"]
    assert card["resize"]["policy"] == info["resize"]["policy"] and card["stored_size"] == 32
    assert card["image_size"] == info["image_size"] and card["metrics"] == info["metrics"]
    assert card["dataset"] == info["dataset"]
    health = requests.get(f"{url}/healthz", headers=AUTH, timeout=30).json()
    assert health["status"] == "ok" and health["model_sha256"] == info["sha256"]


def test_every_bad_input_gets_its_4xx_and_the_replica_keeps_serving(service, image_files):
    url, _, _ = service
    good = (image_files / "test-00.png").read_bytes()
    replica = requests.get(f"{url}/healthz", headers=AUTH, timeout=30).json()["replica"]

    def chunked(n):  # no Content-Length: the bound applies while the body is read
        for _ in range(n):
            yield b"\0" * 65536

    cases = {
        "empty": (post(url, b""), 400, "empty_body"),
        "not an image": (post(url, b"just some text, no image at all " * 10), 422, "not_an_image"),
        "truncated": (post(url, good[: len(good) // 2]), 422, "corrupt_image"),
        "bomb": (post(url, png_claiming(8000, 8000)), 413, "image_too_large"),  # over serve.max_image_pixels
        "huge bomb": (post(url, png_claiming(20000, 20000)), 413, "image_too_large"),  # and over Pillow's limit
        "too large": (post(url, b"\x89PNG" + b"\0" * MAX_BYTES), 413, "body_too_large"),
        "too large, chunked": (post(url, chunked(8)), 413, "body_too_large"),
        "content type": (post(url, good, "text/plain"), 415, "unsupported_media_type"),
        "no content type": (post(url, good, None), 415, "unsupported_media_type"),
        "multipart without file": (
            requests.post(f"{url}/predict", files={"other": (None, "x")}, headers=AUTH, timeout=30),
            400,
            "bad_multipart",
        ),
    }
    for what, (response, status, code) in cases.items():
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()
        assert error["error"] == code and error["status"] == status and error["detail"], (what, error)
    assert "serve.max_image_bytes=262144" in cases["too large"][0].json()["detail"]
    assert "8000x8000 = 64000000 pixels is over serve.max_image_pixels=" in cases["bomb"][0].json()["detail"]
    assert "serve.max_image_pixels=" in cases["huge bomb"][0].json()["detail"]
    assert post(url, good).status_code == 200
    assert requests.get(f"{url}/healthz", headers=AUTH, timeout=30).json()["replica"] == replica  # the same one
    assert requests.get(f"{url}/nowhere", headers=AUTH, timeout=30).status_code == 404
    assert requests.get(f"{url}/predict", headers=AUTH, timeout=30).status_code == 405


def test_the_api_key_is_enforced(service, image_files):
    url, _, _ = service
    good = (image_files / "test-00.png").read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
        for response in (
            post(url, good, headers=headers),
            requests.get(f"{url}/healthz", headers=headers, timeout=30),
            requests.get(f"{url}/model", headers=headers, timeout=30),
        ):
            assert response.status_code == 401 and response.json()["error"] == "unauthorized", headers
    assert post(url, good, headers={"X-API-Key": KEY}).status_code == 200


def _burst(url: str, body: bytes, n: int) -> list[requests.Response]:
    """n requests sent at once (threads released together by a barrier)."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return post(url, body)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_requests_are_batched_and_a_full_queue_answers_503(service, image_files):
    url, _, _ = service
    good = (image_files / "test-01.png").read_bytes()
    answers = _burst(url, good, 8)  # as many as the replica holds: none waits at the proxy
    assert [r.status_code for r in answers] == [200] * 8
    sizes = [r.json()["timing"]["batch_size"] for r in answers]
    assert max(sizes) > 1, sizes
    assert len({json.dumps(r.json()["top_probs"]) for r in answers}) == 1  # batch-mates answer alike

    flood = _burst(url, good, 48)  # 8 in the replica + 8 queued at the proxy: the rest are refused at once
    codes = [r.status_code for r in flood]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 8, codes
    refused = next(r for r in flood if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert post(url, good).status_code == 200  # and it serves on


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_job_serves_reports_and_stops_on_ctrl_c_leaving_no_process(tiny_run, tmp_path):
    _, result = tiny_run
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with foreground_job(
        [
            sys.executable,
            os.path.join(ROOT, "jobs", "serve.py"),
            "--local",
            "--num-cpus",
            "2",
            "--model",
            result.run_dir,
            "--serve.port",
            str(port),
            "--report-every",
            "2",
        ],  # fmt: skip
        env=env,
        cwd=str(tmp_path),
    ) as (job, lines):
        deadline = time.monotonic() + 240
        while not any("serving" in line for line in lines):
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        assert f"at http://127.0.0.1:{port}/predict (Ctrl-C stops)" in "".join(lines)
        assert requests.post(f"http://127.0.0.1:{port}/predict", data=b"", timeout=60).status_code == 400
        while not any("requests in" in line and "1 errors (1 x 400)" in line for line in lines):  # its report
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        processes = _descendants(job.pid)
        assert processes, "the job started no Ray processes?"
        os.killpg(job.pid, signal.SIGINT)
        assert job.wait(timeout=120) == 0, "".join(lines)
    text = "".join(lines)
    assert "stopping" in text and "Traceback" not in text, text
    deadline = time.monotonic() + 30  # processes reaped by their parent a moment after it exits
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in processes if _alive(p)], "processes of the job remain"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
