"""Starting or joining Ray, the same way for every job."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(local: bool = False, num_cpus: int | None = None) -> None:
    """Join the cluster (``RAY_ADDRESS`` / a running ``ray start``) or start a local one.

    Local mode (unless RAY_ADDRESS names a cluster, as in a submitted job) reserves more logical CPUs than
    the machine has cores: Ray Train workers would otherwise
    take every CPU and Ray Data's read tasks would wait forever. The dashboard only listens on 127.0.0.1
    (whoever reaches the job API runs code on the cluster).
    """
    import ray

    if ray.is_initialized():
        return
    if local and not os.environ.get("RAY_ADDRESS"):  # inside `ray job submit` the cluster is given
        cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 configure_logging=True, logging_level=logging.WARNING)
    else:
        ray.init()
    log.info("Ray resources: %s", ray.cluster_resources())
