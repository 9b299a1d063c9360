"""The ``serve`` section of the config (Ray Serve: where it listens, replicas, batching, bounds, an API key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from resnet_ray.config_checks import check, positive


@dataclass(frozen=True)
class ServeConfig:
    """Online prediction with Ray Serve (jobs/serve.py, resnet_ray/serve.py): where it listens, the replicas,
    dynamic batching, the bounds on queues and request bodies, and an optional API key."""

    host: str = "127.0.0.1"  # the HTTP proxy's address; 0.0.0.0 serves every interface (anyone who reaches it)
    port: int = 8000
    route_prefix: str = "/"  # the application's routes: <prefix>predict, <prefix>healthz, <prefix>model
    num_replicas: Optional[int] = None  # a fixed replica count; null: 1, or autoscaling when max_replicas is set
    min_replicas: int = 1  # autoscaling (with max_replicas): the fewest replicas kept
    max_replicas: Optional[int] = None  # set: autoscale between min_replicas and max_replicas
    target_ongoing_requests: float = 16.0  # autoscaling: requests in flight per replica it aims at
    cpus_per_replica: float = 1.0  # also the replica's torch threads (at least 1)
    gpus_per_replica: float = 0.0
    max_batch_size: int = 16  # dynamic batching (@serve.batch): images per forward pass at most
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill after its first image
    max_ongoing_requests: int = 32  # per replica (at least max_batch_size, or batches never fill)
    max_queued_requests: int = 64  # per proxy, beyond those in the replicas: then 503 with Retry-After
    retry_after_s: float = 1.0  # the Retry-After of that 503
    max_image_bytes: int = 10 * 2**20  # request bodies above this get 413, before anything is decoded
    max_image_pixels: int = 40_000_000  # width x height above this gets 413 (a decompression bomb), before decoding
    top_k: int = 5  # classes per answer at most (a request may ask for fewer: ?top_k=N)
    api_key_env: Optional[str] = None  # name of an environment variable holding the key; set: 401 without it
    start_timeout_s: float = 900.0  # the replicas not all running after this long (unschedulable, failing): fail

    def __post_init__(self):
        check(bool(self.host.strip()), "serve.host", "must not be empty (127.0.0.1: this machine only)")
        check(1 <= self.port <= 65535, "serve.port", f"must be in [1, 65535], got {self.port}")
        check(self.route_prefix.startswith("/"), "serve.route_prefix", f"must start with /, got {self.route_prefix!r}")
        if self.num_replicas is not None:
            check(self.num_replicas >= 1, "serve.num_replicas", f"must be >= 1, got {self.num_replicas}")
            check(
                self.max_replicas is None,
                "serve.num_replicas",
                "a fixed count and autoscaling (serve.max_replicas) exclude each other; set one of them",
            )
        if self.max_replicas is not None:
            check(self.max_replicas >= 1, "serve.max_replicas", f"must be >= 1, got {self.max_replicas}")
            check(
                0 <= self.min_replicas <= self.max_replicas,
                "serve.min_replicas",
                f"must be in [0, serve.max_replicas={self.max_replicas}], got {self.min_replicas}",
            )
        positive(self.target_ongoing_requests, "serve.target_ongoing_requests")
        positive(self.start_timeout_s, "serve.start_timeout_s")
        positive(self.cpus_per_replica, "serve.cpus_per_replica", allow_zero=True)
        positive(self.gpus_per_replica, "serve.gpus_per_replica", allow_zero=True)
        check(self.max_batch_size >= 1, "serve.max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        positive(self.batch_wait_timeout_s, "serve.batch_wait_timeout_s", allow_zero=True)
        check(
            self.max_ongoing_requests >= self.max_batch_size,
            "serve.max_ongoing_requests",
            f"must be >= serve.max_batch_size={self.max_batch_size} (a replica batches only the requests it holds), "
            f"got {self.max_ongoing_requests}",
        )
        check(
            self.max_queued_requests >= 1,
            "serve.max_queued_requests",
            f"must be >= 1 (the queue is bounded on purpose), got {self.max_queued_requests}",
        )
        positive(self.retry_after_s, "serve.retry_after_s", allow_zero=True)
        check(self.max_image_bytes >= 1, "serve.max_image_bytes", f"must be >= 1, got {self.max_image_bytes}")
        check(self.max_image_pixels >= 1, "serve.max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")
        check(self.top_k >= 1, "serve.top_k", f"must be >= 1, got {self.top_k}")
        if self.api_key_env is not None:
            check(
                self.api_key_env.isidentifier() and self.api_key_env.isascii(),
                "serve.api_key_env",
                f"must name an environment variable (letters, digits, _), got {self.api_key_env!r}",
            )

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None
