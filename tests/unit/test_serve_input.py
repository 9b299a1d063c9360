"""resnet_ray.serve without a Serve instance: requests -> one image (content types, multipart, size and pixel
bounds, bad bytes), the API key, the statistics line, the deployment options and configs/serve.yaml."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from resnet_ray import serve as rs
from resnet_ray import serve_http, serve_stats
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import load_config, serve_args
from resnet_ray.images import ResizeSpec, decode
from resnet_ray.serve_config import ServeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = ResizeSpec(32)


def png(h=20, w=30, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and whose data is a tiny, valid-looking stream)."""
    blob = png(4, 4)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return blob[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + blob[33:]


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary="XyZ-boundary") -> tuple[str, bytes]:
    """(content type, body) of multipart/form-data with parts (name, filename, content type, content)."""
    body = b""
    for name, filename, ctype, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        body += b"\r\n" + content + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def status_of(call, *args) -> tuple[int, str]:
    with pytest.raises(serve_http.RequestError) as err:
        call(*args)
    return err.value.status, err.value.code


def test_a_raw_image_body_and_a_multipart_file_give_the_same_bytes():
    blob = png() + b"\r\n\r\nx--XyZ-boundary\r\n"  # line breaks and the boundary (not after one) inside
    assert serve_http.image_bytes("image/png", blob) == blob
    ctype, body = multipart([("note", None, None, b"hello"), ("file", "a.png", "image/png", blob)])
    assert serve_http.image_bytes(ctype, body) == blob
    ctype, body = multipart([("upload", "a.png", "application/octet-stream", blob)])  # the only file part
    assert serve_http.image_bytes(ctype, body) == blob
    assert serve_http.image_bytes('multipart/form-data; boundary="XyZ-boundary"', body) == blob


@pytest.mark.parametrize(
    "ctype, body, status, code",
    [
        ("image/png", b"", 400, "empty_body"),
        (None, b"", 400, "empty_body"),
        ("text/plain", b"abc", 415, "unsupported_media_type"),
        (None, b"abc", 415, "unsupported_media_type"),
        ("application/json", b"{}", 415, "unsupported_media_type"),
        ("multipart/form-data", b"--x\r\n\r\nabc\r\n--x--", 400, "bad_multipart"),  # no boundary
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--x--",
            400,
            "bad_multipart",
        ),  # no file part
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
            400,
            "bad_multipart",
        ),  # never closed
    ],
)
def test_bad_requests_get_their_4xx(ctype, body, status, code):
    assert status_of(serve_http.image_bytes, ctype, body) == (status, code)


def test_multipart_edge_cases():
    ctype, body = multipart([("file", "a.txt", "text/plain", b"abc")])
    assert status_of(serve_http.image_bytes, ctype, body) == (415, "unsupported_media_type")
    ctype, body = multipart([("a", "a.png", "image/png", png()), ("b", "b.png", "image/png", png())])
    assert status_of(serve_http.image_bytes, ctype, body) == (400, "bad_multipart")  # one image per request
    ctype, body = multipart([("file", "a.png", "image/png", b"")])
    assert status_of(serve_http.image_bytes, ctype, body) == (400, "empty_body")


def test_decoding_is_the_batch_jobs_and_bad_bytes_get_422_or_413():
    blob = png(40, 50)
    assert np.array_equal(serve_http.decode_request_image(blob, SPEC, 10**6), decode(blob, SPEC))
    decode_request = serve_http.decode_request_image
    assert status_of(decode_request, b"not an image at all", SPEC, 10**6) == (422, "not_an_image")
    assert status_of(decode_request, blob[:120], SPEC, 10**6) == (422, "corrupt_image")  # truncated
    assert status_of(decode_request, png_claiming(5000, 5000), SPEC, 10**6) == (413, "image_too_large")
    # past Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS) Pillow refuses it itself: the same answer
    assert status_of(decode_request, png_claiming(60000, 60000), SPEC, 10**12) == (413, "image_too_large")


class FakeRequest:
    """What read_body uses of a Starlette request: headers and an async byte stream."""

    def __init__(self, chunks: list[bytes], length: str | None = None):
        self.headers = {} if length is None else {"content-length": length}
        self.chunks, self.read = chunks, 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_the_body_bound_is_applied_before_and_while_reading():
    import asyncio

    ok = FakeRequest([b"ab", b"cd"], "4")
    assert asyncio.run(serve_http.read_body(ok, 4)) == b"abcd"
    declared = FakeRequest([b"x" * 10], "10")
    with pytest.raises(serve_http.RequestError, match="serve.max_image_bytes=4") as err:
        asyncio.run(serve_http.read_body(declared, 4))
    assert err.value.status == 413 and declared.read == 0  # refused from Content-Length: nothing read
    chunked = FakeRequest([b"xxx", b"xxx", b"xxx"])  # no Content-Length (chunked transfer)
    with pytest.raises(serve_http.RequestError, match="more than 6 bytes"):
        asyncio.run(serve_http.read_body(chunked, 4))
    assert chunked.read == 2  # stopped at the chunk that passed the limit
    assert status_of(lambda: asyncio.run(serve_http.read_body(FakeRequest([], "x1"), 4))) == (400, "bad_request")


def test_the_api_key():
    cfg = ServeConfig(api_key_env="MY_KEY")
    with pytest.raises(ConfigError, match="serve.api_key_env: the environment variable MY_KEY is not set"):
        serve_http.api_key_sha256(cfg, {})
    sha = serve_http.api_key_sha256(cfg, {"MY_KEY": "s3cret"})
    assert sha == serve_http.key_sha256("s3cret") and "s3cret" not in sha
    assert serve_http.authorized({"authorization": "Bearer s3cret"}, sha)
    assert serve_http.authorized({"x-api-key": "s3cret"}, sha)
    assert not serve_http.authorized({}, sha) and not serve_http.authorized({"authorization": "Bearer wrong"}, sha)
    assert not serve_http.authorized({"authorization": "Basic s3cret"}, sha)
    assert serve_http.authorized({}, None) and serve_http.api_key_sha256(ServeConfig(), {}) is None
    with pytest.raises(ConfigError, match="serve.api_key_env: must name an environment variable"):
        ServeConfig(api_key_env="not a name")


def test_statistics_and_the_report_line():
    window = serve_stats.Window.empty()
    assert window.take() is None
    window.latencies += [10.0, 20.0, 30.0]
    window.statuses.update({200: 3, 422: 1, 401: 1})
    window.batches.update({1: 1, 2: 1})
    part = window.take()
    assert window.take() is None  # taken once
    stats = serve_stats.summarize([part, {"latencies": [40.0], "statuses": {"200": 1}, "batches": {"1": 1}}])
    assert stats["requests"] == 6 and stats["errors"] == 2 and stats["batches"] == {1: 2, 2: 1}
    assert stats["p50_ms"] == pytest.approx(25.0)
    line = serve_stats.report_line(stats, 60.0)
    assert line.startswith("6 requests in 60 s (0.1/s), p50 25.0 ms, p99 39.")
    assert "2 errors (1 x 401, 1 x 422), batches of 1-2 (mean 1.3)" in line
    assert serve_stats.report_line(serve_stats.summarize([]), 60.0) == "0 requests in 60 s (0/s), 0 errors"
    health_only = serve_stats.summarize([{"latencies": [], "statuses": {"200": 2}, "batches": {}}])
    assert (
        serve_stats.report_line(health_only, 10.0) == "2 requests in 10 s (0.2/s), 0 errors"
    )  # no /predict: no latency


def test_the_statistics_deployment_sums_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(rs, "LATENCIES_KEPT", 3)
    stats = rs.ServeStats.func_or_class()
    for i in range(4):
        stats.add({"latencies": [float(i), float(i)], "statuses": {200: 2}, "batches": {2: 1}})
    taken = stats.take()
    assert taken["requests"] == 8 and taken["batches"] == {2: 4} and taken["p50_ms"] == 3.0  # the latest 3: 2, 3, 3
    assert stats.take()["requests"] == 0


def test_deployment_options_fixed_and_autoscaling():
    fixed = rs.deployment_options(ServeConfig(num_replicas=2, gpus_per_replica=0.5, max_queued_requests=5))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_queued_requests"] == 5 and fixed["backpressure_config"]["retry_after_s"] == 1.0
    auto = rs.deployment_options(ServeConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=8))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"serve.num_replicas": 2, "serve.max_replicas": 3}, "serve.num_replicas: a fixed count and autoscaling"),
        (
            {"serve.max_replicas": 2, "serve.min_replicas": 3},
            "serve.min_replicas: must be in [0, serve.max_replicas=2]",
        ),
        ({"serve.max_batch_size": 64}, "serve.max_ongoing_requests: must be >= serve.max_batch_size=64"),
        ({"serve.max_queued_requests": -1}, "serve.max_queued_requests: must be >= 1 (the queue is bounded"),
        ({"serve.port": 0}, "serve.port: must be in [1, 65535]"),
        ({"serve.route_prefix": "api"}, "serve.route_prefix: must start with /"),
        ({"serve.max_image_bytes": 0}, "serve.max_image_bytes: must be >= 1"),
    ],
)
def test_serve_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, overrides)


def test_the_shipped_serve_yaml_is_a_ray_serve_config_and_a_config_of_ours():
    from ray.serve.schema import ServeDeploySchema

    path = os.path.join(ROOT, "configs", "serve.yaml")
    with open(path) as f:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(f))
    assert schema.http_options.host == "127.0.0.1"  # never Serve's 0.0.0.0 default
    (app,) = schema.applications
    assert app.import_path == "resnet_ray.serve:app_builder" and app.args["model"]
    cfg = load_config(path)
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.port == schema.http_options.port
    assert cfg.serve.max_batch_size == app.args["serve"]["max_batch_size"]


def test_app_builder_args_from_the_command_line_are_typed_like_overrides():
    args = {"model": "runs/a", "serve": {"port": 8001}, "serve.top_k": "3", "serve.api_key_env": "KEY"}
    assert serve_args(args, parse_strings=True) == {"serve.port": 8001, "serve.top_k": 3, "serve.api_key_env": "KEY"}
    assert serve_args(args)["serve.top_k"] == "3"  # a Serve config file's values are typed by its YAML already
    with pytest.raises(ConfigError, match="args.model"):
        rs.app_builder({"serve.top_k": "3"})
