"""What a Ray workload asks for, checked against what the cluster has, before it starts.

Pure functions over resource dicts (one ``{"CPU": 8.0, "GPU": 1.0, ...}`` per alive node, as ``ray.nodes()``
reports them), so that every rule is unit-tested without Ray. A request that can never fit raises
ResourceError with the numbers; where a smaller request does the job (fewer evaluation actors, fewer
concurrent trials), the job sizes itself down with a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

READ_CPUS = 1.0  # Ray Data's read tasks take one logical CPU each: an actor pool must leave one free
TRIAL_DRIVER_CPUS = 1.0  # each Tune trial's driver process (resnet_ray.tune), besides its Train workers
EPS = 1e-9


class ResourceError(ValueError):
    """A workload asks for more than the cluster has."""


def alive_nodes() -> list[dict]:
    """The resource totals of every alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def pending_nodes() -> Optional[int]:
    """Nodes that Ray's autoscaler is launching or starting; None on a cluster without an autoscaler (started by
    hand, a local instance), where no node comes by itself. Reads what `ray status` reads (Ray is pinned): the
    v1 autoscaler's report in the GCS key-value store, or the v2 autoscaler's cluster status."""
    import json

    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(raw).get("autoscaler_report") if raw else None
    if report is not None:
        return len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())
    if not ray._config.enable_autoscaler_v2():
        return None
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    return len(status.pending_nodes) + sum(r.count for r in status.pending_launches)


def count(n: int, noun: str) -> str:
    """'1 worker', '2 workers'"""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def describe_pending(pending: Optional[int]) -> str:
    if pending is None:
        return "no autoscaler (no node comes by itself)"
    if pending == 0:
        return "no node pending"
    return f"{count(pending, 'node')} pending (the autoscaler is launching them)"


def describe(nodes: list[dict]) -> str:
    """'1 node: 2 CPU' / '3 nodes: 8 CPU + 1 GPU, ...' for error messages."""

    def one(res: dict) -> str:
        shown = [f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU") if res.get(k, 0) or k == "CPU"]
        return " + ".join(shown)

    return f"{count(len(nodes), 'node')}: " + ", ".join(one(n) for n in nodes)


def _needed(request: dict) -> dict:
    return {k: v for k, v in request.items() if v > 0}


def fit_count(request: dict, node: dict) -> int:
    """How many copies of request (e.g. one worker's {"CPU": 1, "GPU": 1}) fit on one node."""
    needed = _needed(request)
    if not needed:
        return 10**9
    return min(int(node.get(k, 0.0) / v + EPS) for k, v in needed.items())


def total(nodes: list[dict], key: str) -> float:
    return sum(n.get(key, 0.0) for n in nodes)


def check_training(num_workers: int, per_worker: dict, nodes: list[dict], streaming_reads: bool) -> None:
    """Raise ResourceError unless num_workers x per_worker fit on the nodes (each worker on one node).

    ``streaming_reads`` (data.cache off): Ray Data reads while the workers hold their CPUs, so one CPU of
    the cluster must stay free for them.
    """
    fits = sum(fit_count(per_worker, n) for n in nodes)
    if fits < num_workers:
        raise ResourceError(
            f"scaling: {num_workers} workers x {_fmt(per_worker)} do not fit; at most {fits} "
            f"fit on this cluster ({describe(nodes)}); lower scaling.num_workers or the "
            "per-worker resources"
        )
    cpus = num_workers * per_worker.get("CPU", 0.0)
    if streaming_reads and total(nodes, "CPU") - cpus < READ_CPUS - EPS:
        raise ResourceError(
            f"scaling: {num_workers} workers x {per_worker.get('CPU', 0.0):g} CPU take every CPU "
            f"({describe(nodes)}), and with data.cache false Ray Data reads during training "
            f"need {READ_CPUS:g} more; lower scaling.cpus_per_worker or set data.cache true"
        )


@dataclass(frozen=True)
class ActorPool:
    """The evaluation / prediction actor pool the cluster can hold."""

    actors: int
    threads: int  # torch intra-op threads per actor


def size_actor_pool(
    num_actors: int, cpus_per_actor: float, gpus_per_actor: float, nodes: list[dict], field: str = "eval"
) -> ActorPool:
    """Fit num_actors actors on the nodes while leaving READ_CPUS for Ray Data's reads; fewer with a warning.

    CPU actors run (cluster CPUs / actors) intra-op threads, at least one per CPU they hold: the CPU kept
    for the reads idles once the split is read, and one many-threaded actor beats several single-threaded
    ones (each loads the model and pays its own start-up).
    """
    per_actor = {"CPU": cpus_per_actor, "GPU": gpus_per_actor}
    cpus = total(nodes, "CPU")
    fits = sum(fit_count(per_actor, n) for n in nodes)
    if cpus_per_actor > 0:
        fits = min(fits, int((cpus - READ_CPUS) / cpus_per_actor + EPS))
    if fits < 1:
        raise ResourceError(
            f"{field}: one actor needs {_fmt(per_actor)} and Ray Data's reads {READ_CPUS:g} CPU "
            f"besides; the cluster has {describe(nodes)}; lower {field}.cpus_per_actor "
            f"/ {field}.gpus_per_actor"
        )
    actors = min(num_actors, fits)
    if actors < num_actors:
        log.warning(
            "%s.num_actors: %d actors x %s plus %g CPU for Ray Data's reads do not fit on %s; using %d",
            field,
            num_actors,
            _fmt(per_actor),
            READ_CPUS,
            describe(nodes),
            actors,
        )
    threads = max(1, math.ceil(cpus_per_actor))
    if gpus_per_actor == 0:
        threads = max(threads, int(cpus // actors))
    return ActorPool(actors, threads)


def trial_concurrency(
    max_concurrent: int, num_workers: int, per_worker: dict, nodes: list[dict], streaming_reads: bool
) -> int:
    """How many Tune trials can run at once: each holds TRIAL_DRIVER_CPUS plus its Train workers.

    Raises ResourceError when not even one trial fits; lowers max_concurrent with a warning when fewer fit.
    """
    check_training(num_workers, per_worker, nodes, streaming_reads)
    per_trial_cpu = TRIAL_DRIVER_CPUS + num_workers * per_worker.get("CPU", 0.0)
    spare = total(nodes, "CPU") - (READ_CPUS if streaming_reads else 0.0)
    fits = int(spare / per_trial_cpu + EPS)
    if per_worker.get("GPU", 0.0) > 0:
        fits = min(fits, int(total(nodes, "GPU") / (num_workers * per_worker["GPU"]) + EPS))
    if fits < 1:
        raise ResourceError(
            f"tune: one trial needs {per_trial_cpu:g} CPU ({TRIAL_DRIVER_CPUS:g} for its driver + "
            f"{num_workers} workers x {_fmt(per_worker)}); the cluster has {describe(nodes)}"
        )
    if fits < max_concurrent:
        log.warning(
            "tune.max_concurrent_trials: %d trials x %g CPU (%g driver + %d workers x %s) do not fit "
            "on %s; running %d at a time",
            max_concurrent,
            per_trial_cpu,
            TRIAL_DRIVER_CPUS,
            num_workers,
            _fmt(per_worker),
            describe(nodes),
            fits,
        )
    return min(max_concurrent, fits)


def local_search_cpus(
    cores: float, max_concurrent: int, num_workers: int, per_worker: dict, streaming_reads: bool
) -> tuple[float, str]:
    """(logical CPUs, the line that says why) for a search's local Ray instance on a machine of ``cores``.

    The cores hold the trials' workers (and Ray Data's reads when they stream); each trial's driver, idle while
    its workers train, gets TRIAL_DRIVER_CPUS on top, so that a recipe whose one worker takes every core (the
    degradation grid's) runs as shipped. As many trials as the cores' workers allow, at most max_concurrent.
    """
    per_trial = num_workers * per_worker.get("CPU", 0.0)
    spare = cores - (READ_CPUS if streaming_reads else 0.0)
    trials = max(1, min(max_concurrent, int(spare / per_trial + EPS) if per_trial else max_concurrent))
    cpus = cores + trials * TRIAL_DRIVER_CPUS
    line = (
        f"local mode: {cpus:g} logical CPUs, this machine's {cores:g} cores for {trials} trial(s) at a time of "
        f"{num_workers} worker(s) x {_fmt(per_worker)}, plus {TRIAL_DRIVER_CPUS:g} for each trial's driver "
        "(idle while its workers train); --num-cpus sets another count"
    )
    return cpus, line


def workers_text(num_workers: int, per_worker: dict) -> str:
    """'2 workers x {CPU: 2}'"""
    return f"{count(num_workers, 'worker')} x {_fmt(per_worker)}"


def _fmt(request: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in request.items() if v > 0 or k == "CPU") + "}"


def release_train_reservations(run_id: Optional[str] = None) -> int:
    """Cancel the Ray Data autoscaling coordinator's requests of Train runs (only run ``run_id``'s when given);
    returns how many were cancelled.

    Every Train run registers its workers' resources there (requester ``train-<run id>``) and withdraws them when
    its controller shuts down. One that dies without (a trial Tune stopped, a controller the watchdog killed)
    leaves them reserved for 180 s: from every later Ray Data job of the cluster, and from an elastic run, which
    sizes itself from what the coordinator reserves it (the usual ``--resume`` of a run stopped for want of
    capacity waited minutes for workers that fit). Without ``run_id``, call it when no Train run of this driver is
    left: a run still alive elsewhere renews its request within 20 s.
    """
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        stale = (
            [f"train-{run_id}"]
            if run_id
            else ray.get(
                coordinator.__ray_call__.remote(
                    lambda actor: [r for r in actor._ongoing_reqs if str(r).startswith("train-")]
                ),
                timeout=10,
            )
        )
        ray.get([coordinator.cancel_request.remote(r) for r in stale], timeout=10)
    except ValueError:  # no coordinator: nothing reserved
        return 0
    except Exception as exc:  # Ray internals (version pinned): a failure here must not fail the job
        log.warning("could not release the Train runs' Ray Data reservations (they expire in 180 s): %s", exc)
        return 0
    if stale:
        log.debug("released the Ray Data reservations of %s", ", ".join(stale))
    return len(stale)
