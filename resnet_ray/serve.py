"""Online prediction with Ray Serve: one exported model behind HTTP, the batch job's decoding and Predictor.

Routes (under ``serve.route_prefix``):

- ``POST /predict``: one image, as the raw body with an ``image/*`` content type or as the one file part of a
  ``multipart/form-data`` body (field ``file``). Answers JSON: ``pred`` / ``class`` (top-1), ``top_classes`` /
  ``top_indices`` / ``top_probs`` (the ``serve.top_k`` most probable, or ``?top_k=N`` fewer), ``model_sha256`` and
  ``timing`` (milliseconds in the replica: decode, batch queue, inference, total; and the batch size it was in).
- ``GET /healthz``: ``{"status": "ok", "model_sha256", "replica"}``.
- ``GET /model``: the model card (classes, input size, the stored size and resize policy, dataset, metrics).

Each replica loads the model once (``SavedModel.verified``, then the ``Predictor``, which loads it with
``weights_only=True`` after its SHA-256 check) and decodes every image exactly as ``jobs/predict.py`` does:
:func:`resnet_ray.images.decode` under the resize policy of ``model.json``. Images of concurrent requests are
batched by ``@serve.batch`` (``serve.max_batch_size``, ``serve.batch_wait_timeout_s``).

Bad input gets a 4xx JSON ``{"error": code, "detail": why, "status"}`` and never takes a replica down: an empty
body (400), a body over ``serve.max_image_bytes`` (413, refused from its Content-Length or while it is read, before
any decoding), a wrong content type (415), bytes that are not an image or a truncated image (422), more than
``serve.max_image_pixels`` pixels (413: a decompression bomb, refused from the image header before decoding). No
request content is written anywhere or logged. With ``serve.api_key_env`` set, every request needs the key
(``Authorization: Bearer KEY`` or ``X-API-Key: KEY``), else 401; replicas hold only the key's SHA-256.

Queues are bounded: a replica holds at most ``serve.max_ongoing_requests``; past ``serve.max_queued_requests``
waiting at a proxy, Serve answers 503 with ``Retry-After: serve.retry_after_s`` at once.

Every replica pushes its counts and latencies to a small ``ServeStats`` deployment every few seconds; the job
(jobs/serve.py) prints one line per interval from it. ``app_builder`` is the import path for Ray's own
``serve run`` / ``serve deploy`` (configs/serve.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as _missing:  # the serve extra is optional for the library, required here
    raise ImportError(f"resnet_ray.serve needs Ray Serve ({_missing}): pip install -e '.[serve]'") from None

from resnet_ray import storage
from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import from_dict, replace, serve_args, to_dict
from resnet_ray.images import ResizeSpec
from resnet_ray.saved_model import SavedModel
from resnet_ray.serve_config import ServeConfig
from resnet_ray.serve_http import RequestError, api_key_sha256, authorized, decode_request_image, image_bytes, read_body
from resnet_ray.serve_stats import Window, report_line, summarize

log = logging.getLogger(__name__)

APP_NAME = "resnet_ray"
STATS_PUSH_S = 2.0  # how often a replica hands its counts to ServeStats
LATENCIES_KEPT = 100_000  # of the requests between two report lines: the latest, for p50 / p99


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class ServeStats:
    """Sums the windows that the replicas push until ``take`` hands them over (the job's report lines). Bounded
    when nobody takes them (``serve run`` / ``serve deploy``): counts are summed, and of the latencies only the
    latest :data:`LATENCIES_KEPT` are kept."""

    def __init__(self):
        self.total = Window.empty()

    def add(self, part: dict) -> None:
        self.total.statuses.update(part["statuses"])
        self.total.batches.update(part["batches"])
        self.total.latencies = (self.total.latencies + part["latencies"])[-LATENCIES_KEPT:]

    def take(self) -> dict:
        part = self.total.take()
        return summarize([part] if part else [])


# ---------------------------------------------------------------------------
# the model's replica


def model_card(saved: SavedModel, spec: ResizeSpec, k: int, temperature: float = 1.0, tta: str = "none") -> dict:
    """What GET /model answers: what the model is, what it expects, how it did (no weights, no config)."""
    info = saved.info
    return {
        "arch": info["arch"],
        "num_classes": saved.num_classes,
        "classes": saved.classes,
        "image_size": info["image_size"],  # the network's input, after the resize on the device
        "stored_size": spec.size,  # every image is first brought to this size by the resize policy
        "resize": spec.record(),
        "mean": info["mean"],
        "std": info["std"],
        "dataset": info.get("dataset"),
        "epoch": info.get("epoch"),
        "metrics": info.get("metrics"),
        "model_sha256": saved.sha256,
        "top_k": k,
        "temperature": temperature,  # the probabilities are softmax(logits / temperature)
        "tta": tta,
    }


@serve.deployment(
    name="Classifier",
    graceful_shutdown_wait_loop_s=0.5,  # an idle replica stops at once on Ctrl-C
    graceful_shutdown_timeout_s=10.0,
    max_constructor_retry_count=3,  # a replica that cannot load the model fails the deployment, not forever
)
class Classifier:
    """One replica: the model loaded once, requests decoded on threads, images batched into the Predictor."""

    def __init__(
        self,
        model: str,
        serve_cfg: dict,
        resize: dict,
        sha: str,
        key_sha: Optional[str],
        tta: str = "none",
        stats=None,
    ):
        from resnet_ray.predictor import Predictor

        self.cfg = from_dict({"serve": serve_cfg}).serve  # a Ray dict is transport only
        saved = SavedModel.verified(model)
        threads = max(1, int(self.cfg.cpus_per_replica)) if self.cfg.cpus_per_replica >= 1 else None
        k = min(self.cfg.top_k, saved.num_classes)
        # the prediction job's Predictor: the model's temperature, eval.tta of its config
        self.predictor = Predictor(saved.folder, threads=threads, k=k, probabilities=True, tta=tta)
        self.spec = ResizeSpec.from_record(resize, resize["size"])
        self.sha, self.key_sha = sha, key_sha
        self.card = model_card(saved, self.spec, self.predictor.k, self.predictor.temperature, tta)
        self.classes = self.card["classes"]
        self.predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.window = Window.empty()
        self.stats = stats
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (a unit test)
            self.replica = str(os.getpid())
        if stats is not None:  # the constructor runs on the replica's event loop
            self._pusher = asyncio.get_running_loop().create_task(self._push_stats())

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PUSH_S)
            part = self.window.take()
            if part:
                try:
                    await self.stats.add.remote(part)
                except Exception as exc:  # statistics must never hurt serving
                    log.warning("could not hand statistics to ServeStats: %s", exc)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[np.ndarray, float]]) -> list[dict]:
        """[(image (S, S, 3) uint8, time enqueued)] -> one answer per image; the forward pass runs on a thread,
        so the replica keeps reading and decoding requests meanwhile."""
        start = time.perf_counter()
        images = np.stack([image for image, _ in items])
        out = await asyncio.to_thread(self.predictor, {"image": images})
        inference_ms = (time.perf_counter() - start) * 1000
        self.window.batches[len(items)] += 1
        return [
            {
                "pred": int(out["pred"][i]),
                "top_indices": out["top5"][i].tolist(),
                "top_probs": out["top_probs"][i].tolist(),
                "queue_ms": (start - enqueued) * 1000,
                "inference_ms": inference_ms,
                "batch_size": len(items),
            }
            for i, (_, enqueued) in enumerate(items)
        ]

    async def __call__(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            response = await self._route(request, start)
        except RequestError as err:
            response = err.response()
        except Exception:  # a bug of ours, never the client's bytes: logged here, a plain 500 there
            log.exception("request failed")
            response = RequestError(500, "internal_error", "the replica failed on this request").response()
        if request.scope["path"].rstrip("/").endswith("/predict"):
            self.window.latencies.append((time.perf_counter() - start) * 1000)
        self.window.statuses[response.status_code] += 1
        return response

    async def _route(self, request: Request, start: float) -> JSONResponse:
        if not authorized(request.headers, self.key_sha):
            raise RequestError(
                401, "unauthorized", "missing or wrong API key", headers={"WWW-Authenticate": 'Bearer realm="resnet"'}
            )
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        route = path[len(root) :] if root and path.startswith(root) else path
        route = "/" + route.strip("/")
        methods = {"/predict": "POST", "/healthz": "GET", "/model": "GET"}
        if route not in methods:
            raise RequestError(404, "not_found", f"no route {route}; routes: POST /predict, GET /healthz, GET /model")
        if request.method != methods[route]:
            raise RequestError(
                405, "method_not_allowed", f"{route} takes {methods[route]}", headers={"Allow": methods[route]}
            )
        if route == "/healthz":
            return JSONResponse({"status": "ok", "model_sha256": self.sha, "replica": self.replica})
        if route == "/model":
            return JSONResponse(self.card)
        return await self._predict(request, start)

    def _top_k(self, request: Request) -> int:
        value = request.query_params.get("top_k")
        if value is None:
            return self.predictor.k
        if not value.isdigit() or not 1 <= int(value) <= self.predictor.k:
            raise RequestError(
                400, "bad_request", f"top_k must be an integer in [1, {self.predictor.k}], got {value!r}"
            )
        return int(value)

    async def _predict(self, request: Request, start: float) -> JSONResponse:
        k = self._top_k(request)
        body = await read_body(request, self.cfg.max_image_bytes)
        blob = image_bytes(request.headers.get("content-type"), body)
        image = await asyncio.to_thread(decode_request_image, blob, self.spec, self.cfg.max_image_pixels)
        del body, blob  # nothing of the request is kept beyond its answer
        decoded = time.perf_counter()
        answer = await self.predict_batch((image, decoded))
        indices = answer["top_indices"][:k]
        return JSONResponse(
            {
                "pred": answer["pred"],
                "class": self.classes[answer["pred"]],
                "top_classes": [self.classes[i] for i in indices],
                "top_indices": indices,
                "top_probs": answer["top_probs"][:k],
                "model_sha256": self.sha,
                "timing": {
                    "decode_ms": (decoded - start) * 1000,
                    "queue_ms": answer["queue_ms"],
                    "inference_ms": answer["inference_ms"],
                    "total_ms": (time.perf_counter() - start) * 1000,
                    "batch_size": answer["batch_size"],
                },
            }
        )


# ---------------------------------------------------------------------------
# the application: built from a Config (the job) or from args (serve run / serve deploy)


def deployment_options(cfg: ServeConfig) -> dict:
    """The Classifier deployment's options from serve.*: replicas (fixed or autoscaling), resources, queue bounds."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    return options


def build_app(cfg: Config, model: str):
    """The Serve application for ``model`` (a run folder, ``model/`` folder or URI), its weights verified here
    first (a bad model fails now, in one line, not in every replica)."""
    saved = SavedModel.verified(model)
    key = api_key_sha256(cfg.serve)
    serve_cfg = to_dict(cfg)["serve"]
    return Classifier.options(**deployment_options(cfg.serve)).bind(
        storage.normalize(saved.folder),
        serve_cfg,
        saved.resize(cfg).record(),
        saved.sha256,
        key,
        cfg.eval.tta,
        ServeStats.bind(),
    )


def app_builder(args: dict):
    """Application builder for Ray's CLI: ``serve run resnet_ray.serve:app_builder model=RUN serve.top_k=3`` or
    ``import_path: resnet_ray.serve:app_builder`` with ``args: {model: RUN, serve: {...}}`` in a Serve config file.

    The config is the model's own with the other args as overrides (like jobs/serve.py without --config). Serve's
    ``http_options`` decide where it listens (serve.host / serve.port are the job's)."""
    args = dict(args or {})
    model = args.pop("model", None)
    if not model:
        raise ConfigError("args.model: the run folder, model/ folder or URI to serve is required")
    cfg = replace(SavedModel.read(str(model)).config(), serve_args(args, parse_strings=True))
    return build_app(cfg, str(model))


# ---------------------------------------------------------------------------
# the job: start, report, stop


def url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/predict"


def start(cfg: Config, model: str, name: str = APP_NAME) -> str:
    """Deploy the application on the connected Ray cluster (Serve started on serve.host:serve.port); returns
    the URL of /predict once every replica is up."""
    return deploy(build_app(cfg, model), cfg.serve, name)


def deploy(app, cfg: ServeConfig, name: str = APP_NAME) -> str:
    """Run a built application (``build_app``) under ``name``; the URL of its /predict once it is up."""
    from ray.serve.api import _run

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    running = _running_http(cfg)
    _run(app, name=name, route_prefix=cfg.route_prefix, _blocking=False)  # serve.run would wait without a word
    wait_until_running(name, cfg.start_timeout_s)
    return url(running)


def wait_until_running(name: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Wait for the application's replicas, logging a line a minute of what it waits for; StallError after
    timeout_s (serve.start_timeout_s), DeployError with Serve's message when the deployment failed."""
    from resnet_ray import watchdog

    start = last_line = time.monotonic()
    while True:
        app = serve.status().applications.get(name)
        state = app.status.value if app else "NOT_STARTED"  # ApplicationStatus, a str Enum
        if state == "RUNNING":
            return
        message = (app.message if app else "") or state
        if state == "DEPLOY_FAILED":
            raise watchdog.DeployError(f"serving {name}: the deployment failed: {message}")
        now = time.monotonic()
        if now - start > timeout_s:
            raise watchdog.StallError(
                f"serving {name}: not running after {timeout_s:g} s (serve.start_timeout_s): {message}; "
                f"{watchdog.diagnose()}"
            )
        if now - last_line >= watchdog.REPORT_EVERY_S:
            last_line = now
            log.warning("waiting %.0f s for %s's replicas: %s; %s", now - start, name, message, watchdog.diagnose())
        time.sleep(poll_s)


def _running_http(cfg: ServeConfig) -> ServeConfig:
    """serve.* with the host and port that Serve listens on: an instance already running on the cluster keeps
    its own (Serve applies HTTP options only when it starts)."""
    import dataclasses

    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # a Serve without these internals: trust the config
        return cfg
    if (host, port) != (cfg.host, cfg.port):
        log.warning(
            "Serve already runs on this cluster at %s:%s; serve.host / serve.port (%s:%s) do not apply",
            host,
            port,
            cfg.host,
            cfg.port,
        )
        return dataclasses.replace(cfg, host=host, port=port)
    return cfg


def take_stats(name: str = APP_NAME, timeout_s: float = 30.0) -> dict:
    """The statistics the replicas pushed since the last call."""
    return serve.get_deployment_handle("ServeStats", app_name=name).take.remote().result(timeout_s=timeout_s)


def stop(name: str = APP_NAME, whole_serve: bool = False, timeout_s: float = 30.0) -> None:
    """Delete the application (and with ``whole_serve`` Serve itself: controller and proxies), waiting at most
    timeout_s: a Serve controller killed by the same Ctrl-C (a local instance's processes share the terminal's
    process group) would have Serve retry its shutdown forever."""
    done = threading.Event()

    def run() -> None:
        try:
            if whole_serve:
                serve.shutdown()
            else:
                serve.delete(name)
        except Exception as exc:  # the cluster is already gone: nothing is left to stop
            log.warning("stopping the application: %s", exc)
        finally:
            done.set()

    threading.Thread(target=run, name="serve stop", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("stopping the application: Serve did not answer within %g s; going on without it", timeout_s)


def serve_until_interrupted(
    cfg: Config,
    model: str,
    every_s: float = 60.0,
    on_line: Callable[[str], None] = print,
    whole_serve: bool = False,
    name: str = APP_NAME,
) -> None:
    """Start the application, print its URL, then one line every ``every_s`` seconds until Ctrl-C (or SIGTERM,
    e.g. `ray job stop`); then delete it (``whole_serve``: Serve too, for a local instance of this job's own)."""
    if not every_s > 0:
        raise ConfigError(f"--report-every must be > 0 seconds, got {every_s}")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's "started" / "ready" lines: this prints its own
    app = build_app(cfg, model)  # a bad model or a missing API key fails here, before Serve starts
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: the same clean stop
    try:
        address = deploy(app, cfg.serve, name)
        on_line(f"serving {model} at {address} (Ctrl-C stops)")
        last = time.monotonic()
        while True:
            time.sleep(max(0.0, last + every_s - time.monotonic()))
            now = time.monotonic()
            try:
                line = report_line(take_stats(name), now - last)
            except Exception as exc:  # the figures are a report: serving goes on without them
                line = f"no statistics this time ({type(exc).__name__}: {exc})"
            on_line(line)
            last = now
    except KeyboardInterrupt:
        on_line("stopping")
    finally:
        stop(name, whole_serve)
        signal.signal(signal.SIGTERM, previous)
