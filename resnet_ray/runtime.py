"""Starting or joining Ray, the same way for every job, within a bounded time."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0  # how long a cluster address may take to answer before the job gives up
NUM_CPUS_ENV = "RESNET_RAY_NUM_CPUS"  # logical CPUs of the local instance (default: the machine's cores)
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients (also inside workers) look
# Ray's own INFO lines and its workers' output stay in the session's log files (logs/ under the Ray session
# folder, e.g. /tmp/ray/session_latest/logs) instead of the job's output; the driver reports progress itself
QUIET = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}
_started_here: Optional[str] = None  # the GCS address of the local instance this process started


def started_here() -> bool:
    """Whether this process is connected to a local Ray instance that it started (``start_local``): the whole
    instance is this machine, which the job's own process shares with any actor it would start."""
    import ray

    return ray.is_initialized() and _started_here == ray.get_runtime_context().gcs_address


class RayConnectError(RuntimeError):
    """The cluster address given or found does not answer: the job stops instead of retrying forever."""


def marker_file() -> str:
    """The file where `ray start` records the address that a plain ``ray.init()`` joins."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def cluster_address() -> tuple[Optional[str], str]:
    """(address, where it came from) the way ``ray.init()`` finds it: RAY_ADDRESS, else the marker file.

    The address is None (with source "") when neither names a cluster, and "local" when RAY_ADDRESS asks for
    a fresh local instance.
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env, "RAY_ADDRESS"
    path = marker_file()
    if os.path.isfile(path):
        with open(path) as f:
            found = f.read().strip()
        if found:
            return found, f"the `ray start` marker file {path}"
    return None, ""


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    if not parts.hostname or not parts.port:
        raise RayConnectError(f"Ray address {address!r} is not host:port")
    return parts.hostname, parts.port


def _advice(source: str) -> str:
    if source == "RAY_ADDRESS":
        return "point RAY_ADDRESS at a running cluster's head (host:port), unset it, or run with --local"
    return (
        f"the cluster that wrote it is gone: run `ray stop` or delete {marker_file()}, start the cluster "
        "again with `ray start --head`, or run with --local"
    )


def probe(address: str, source: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayConnectError unless something accepts connections at address within timeout_s.

    A dead cluster would otherwise make ``ray.init()`` retry its GCS for many minutes. A refused connection
    (nothing listens there) fails at once; an unanswered one is retried until timeout_s.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            if isinstance(exc, ConnectionRefusedError) or time.monotonic() >= deadline:
                raise RayConnectError(
                    f"cannot reach the Ray cluster at {address} (from {source}): "
                    f"{exc.strerror or exc}; {_advice(source)}"
                ) from None
            time.sleep(0.5)


def local_cpus(num_cpus: Optional[float] = None) -> float:
    """Logical CPUs of a local instance: the argument, else $RESNET_RAY_NUM_CPUS, else the machine's cores."""
    from resnet_ray.resources import ResourceError

    if num_cpus is None and os.environ.get(NUM_CPUS_ENV):
        try:
            num_cpus = float(os.environ[NUM_CPUS_ENV])
        except ValueError:
            raise ResourceError(f"{NUM_CPUS_ENV}={os.environ[NUM_CPUS_ENV]!r} is not a number") from None
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    if cpus < 1:
        raise ResourceError(f"--num-cpus: a local Ray instance needs at least 1 CPU, got {cpus:g}")
    return cpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what a local instance sets in this process's environment (Ray Train passes these on to its controller)
LOCAL_ENV = {
    # one node that no cloud drains: Ray Train's preemption watcher (one more actor process per run) has nothing to
    # watch. Not for a cluster: a process that starts one (a test) keeps it out of the clusters it starts
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # the Train controller polls its workers every 2 s by default, so a finished run waits up to 2 s more
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def start_local(num_cpus: Optional[float] = None) -> None:
    """A fresh single-node Ray instance with the dashboard on 127.0.0.1 (whoever reaches it runs code).

    Its dashboard address goes into $RAY_API_SERVER_ADDRESS before Ray starts, so that every Ray process
    (inherited environment) finds this instance's State API. Without it, Ray Train's placement-group cleaner
    looks for a cluster through the `ray start` marker file or the GCS processes on the machine, and fails
    when that file is stale or several Ray instances run side by side: then the placement groups of trials
    that ASHA stopped are never freed.
    """
    import ray

    cpus = local_cpus(num_cpus)
    for name, value in LOCAL_ENV.items():
        os.environ.setdefault(name, value)
    # Ray 2.60 turns token authentication on for a new local instance and says so on every start: keep it on,
    # without the line (setting RAY_AUTH_MODE here would come too late for the RayConfig Ray has already read)
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        for attempt in (1, 2):
            port = _free_port()
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
            try:
                context = ray.init(
                    address="local",
                    num_cpus=cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    **QUIET,
                )
                global _started_here
                _started_here = context.address_info["gcs_address"]
                return
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node is slow to start
                if "timed out during startup" not in str(exc):
                    raise
                ray.shutdown()  # stop what did start before trying again
                if attempt == 2:
                    raise RayConnectError(
                        "the local Ray instance did not start within Ray's 30 s, twice (its "
                        "raylet or dashboard agent was too slow: is the machine busy?); "
                        "try again when it is less loaded"
                    ) from None
                log.warning(
                    "the local Ray instance did not start within Ray's 30 s (a busy machine?); starting it again"
                )
    finally:
        notice.setLevel(level)


def check_cluster(local: bool = False, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """The cluster address a job joins, probed (RayConnectError if it does not answer); None: start one.

    Cheap (no torch, no Ray start): the jobs call it first, so that a dead address fails in seconds.
    """
    address, source = cluster_address()
    if (local and source != "RAY_ADDRESS") or address in (None, "local"):
        return None
    probe(address, source, connect_timeout_s)
    return address


def init_ray(
    local: bool = False, num_cpus: Optional[float] = None, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Join the cluster (``RAY_ADDRESS`` / a running ``ray start``) or start a local instance.

    ``local`` (or RAY_ADDRESS=local, or no cluster found) starts a fresh instance with ``num_cpus`` logical
    CPUs (default: $RESNET_RAY_NUM_CPUS or the machine's cores, so that jobs schedule as on a real node).
    Inside ``ray job submit`` RAY_ADDRESS names the cluster, and ``local`` is ignored. A cluster address that
    does not answer within ``connect_timeout_s`` raises RayConnectError naming the address and its source.
    """
    import ray

    if ray.is_initialized():
        return
    address = check_cluster(local, connect_timeout_s)
    if address is None:
        start_local(num_cpus)
    else:
        try:
            ray.init(address=address, **QUIET)
        except Exception as exc:
            if "AuthenticationError" not in f"{exc!r} {exc.__cause__!r} {exc.__context__!r}":
                raise
            raise RayConnectError(
                f"the Ray cluster at {address} refused this process's credentials: it uses token authentication "
                "(what `ray start` turns on in Ray 2.60); run the job with RAY_AUTH_MODE=token and the cluster's "
                "token in ~/.ray/auth_token or $RAY_AUTH_TOKEN, or submit it with `ray job submit`"
            ) from None
    log.debug("Ray resources: %s", ray.cluster_resources())
