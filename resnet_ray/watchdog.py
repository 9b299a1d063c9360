"""Progress watchdogs: a Ray Data stream or a Ray Train run that stops making progress fails with a diagnosis.

Without them a job whose actors, workers or read tasks can never be scheduled waits forever. Progress is a
prediction batch arriving (``watched``) or a ``ray.train.report`` reaching the Train controller
(``watch_fit``); after ``timeout_s`` without any, StallError says what is pending and what is free. While they
wait, both log a line a minute saying for what. A training run whose workers no longer fit on the cluster (a
node lost for good) and for which no node is pending stops sooner, with CapacityError (``CapacityWatch``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Optional

log = logging.getLogger(__name__)

STATE_API_TIMEOUT_S = 5
REPORT_EVERY_S = 60.0  # a waiting job logs what it waits for at least this often
_END = object()
# Train controller states in which the run waits for its worker group (Ray Train V2's state classes)
WAITING_STATES = frozenset(
    ("not started", "InitializingState", "SchedulingState", "ReschedulingState", "RestartingState", "ResizingState")
)


class StallError(RuntimeError):
    """A Ray stage made no progress within its stall timeout."""


class CapacityError(RuntimeError):
    """A run's workers no longer fit on the cluster and no node is coming that would make room."""


class DeployError(RuntimeError):
    """A Serve application failed to deploy (Serve's DEPLOY_FAILED)."""


def _free(free: dict, total: dict) -> str:
    """'0/4 CPU, 12.8/15.0 GiB memory, ...': free of total, for the resources the cluster has."""

    def one(key: str) -> str:
        if "memory" in key:
            return f"{free.get(key, 0) / 2**30:.1f}/{total[key] / 2**30:.1f} GiB {key}"
        return f"{free.get(key, 0):g}/{total[key]:g} {key}"

    return ", ".join(one(k) for k in ("CPU", "GPU", "memory", "object_store_memory") if k in total)


def _pending() -> list[str]:
    """Pending placement groups, actors and tasks from Ray's State API (skipped quietly if unreachable)."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    options = {"timeout": STATE_API_TIMEOUT_S, "limit": 20, "detail": True, "raise_on_missing_output": False}
    pgs = list_placement_groups(filters=[("state", "=", "PENDING")], **options)
    actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], **options)
    tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], **options)
    lines = [f"placement group waiting for {pg.bundles}" for pg in pgs[:5]]
    lines += [f"actor {a.class_name} waiting for {a.required_resources}" for a in actors[:5]]
    lines += [f"task {t.name} waiting for {t.required_resources}" for t in tasks[:5]]
    return lines


def diagnose() -> str:
    """One line: free / total resources of the cluster and what waits to be scheduled."""
    import ray

    if not ray.is_initialized():
        return "Ray is not running in this process"
    text = f"free {_free(ray.available_resources(), ray.cluster_resources())}"
    try:
        pending = _pending()
    except Exception as exc:  # the diagnosis must not hide the stall behind another error
        return f"{text}; pending work unknown (State API: {type(exc).__name__}: {exc})"
    return f"{text}; pending: {'; '.join(pending) if pending else 'nothing'}"


def _stalled(what: str, timeout_s: float, setting: str, extra: str = "") -> StallError:
    return StallError(f"{what} made no progress for {timeout_s:g} s ({setting}){extra}; {diagnose()}")


def watched(items: Iterable, timeout_s: float, what: str, setting: str) -> Iterator:
    """Yield items of a (blocking) iterable; raise StallError when the next one takes over timeout_s.

    The iterable is consumed by a daemon thread a few items ahead; its errors are raised here. After a
    stall (or when the consumer stops early) that thread closes the iterable as soon as it gets control
    back, which shuts a Ray Data execution down.
    """
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def offer(item) -> bool:
        """Hand item to the consumer; False once it has gone."""
        while not stop.is_set():
            try:
                q.put(item, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        it = iter(items)
        try:
            for item in it:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer
            offer(exc)
        finally:
            getattr(it, "close", lambda: None)()

    threading.Thread(target=produce, name=f"watched {what}", daemon=True).start()
    try:
        while True:
            item = _next(q, timeout_s, what, setting)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _next(q: queue.Queue, timeout_s: float, what: str, setting: str):
    """The next item of ``q``; a line every REPORT_EVERY_S while it waits, StallError after timeout_s."""
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise _stalled(what, timeout_s, setting)
        try:
            return q.get(timeout=min(REPORT_EVERY_S, timeout_s - waited))
        except queue.Empty:
            waited = time.monotonic() - start
            if waited < timeout_s:
                log.warning(
                    "%s: waiting %.0f s for the next batch (%s at %g s); %s",
                    what,
                    waited,
                    setting,
                    timeout_s,
                    diagnose(),
                )


class CapacityWatch:
    """Whether a run that waits for its worker group should go on waiting, from what the cluster has.

    Waiting is bounded by ``timeout_s`` while the alive nodes cannot hold the workers (``fit_count`` per node,
    as Ray places them) and no node is pending, by ``pending_timeout_s`` while the autoscaler launches nodes,
    and not at all here while they fit (the stall timeout still applies)."""

    def __init__(self, num_workers: int, per_worker: dict, timeout_s: float, pending_timeout_s: float):
        self.num_workers, self.per_worker = num_workers, per_worker
        self.timeout_s, self.pending_timeout_s = timeout_s, pending_timeout_s
        self.short_since: Optional[float] = None  # since when the workers have not fit

    def check(self, now: float, nodes: list[dict], pending: Optional[int]) -> Optional[CapacityError]:
        """None: wait on; else the error that stops the run."""
        from resnet_ray.resources import fit_count

        if sum(fit_count(self.per_worker, n) for n in nodes) >= self.num_workers:
            self.short_since = None
            return None
        if self.short_since is None:
            self.short_since = now
        limit, setting = (
            (self.pending_timeout_s, "train.pending_node_timeout_s")
            if pending
            else (self.timeout_s, "train.capacity_timeout_s")
        )
        if now - self.short_since < limit:
            return None
        return CapacityError(
            f"{self.cluster_line(nodes, pending)}; stopped after waiting {now - self.short_since:.0f} s ({setting})"
        )

    def cluster_line(self, nodes: list[dict], pending: Optional[int]) -> str:
        """'training needs 2 workers x {CPU: 2}; the cluster has 2 nodes: 0 CPU, 2 CPU (1 of them fit now); no node
        pending'"""
        from resnet_ray.resources import describe, describe_pending, fit_count, workers_text

        fits = sum(fit_count(self.per_worker, n) for n in nodes)
        return (
            f"training needs {workers_text(self.num_workers, self.per_worker)}; the cluster has {describe(nodes)} "
            f"({min(fits, self.num_workers)} of them fit{'' if fits >= self.num_workers else ' now'}); "
            f"{describe_pending(pending)}"
        )


def _heartbeat_class():
    # Ray Train V2's internal controller-side hooks (Ray is pinned): the public UserCallback has no hook for
    # "controller started", which is where a stall while scheduling the workers has to be measured from.
    from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

    class Heartbeat(ControllerCallback, ReportCallback):
        """Runs in the Train controller (on the driver's node): records its pid, state and last report."""

        def __init__(self, path: str):
            self.path = path
            self.state = {"pid": None, "reports": 0, "controller": "not started"}
            self.schedulings = 0

        def _write(self, progress: bool = True, **values):
            """Record values (``progress``: also the time of the latest progress)."""
            self.state.update(values, **({"t": time.time()} if progress else {}))
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.state, f)
            os.replace(tmp, self.path)

        def after_controller_start(self, train_run_context):
            import ray

            self._write(
                pid=os.getpid(),
                actor_id=ray.get_runtime_context().get_actor_id(),
                run_id=train_run_context.run_id,
                controller="started",
            )

        def after_controller_state_update(self, previous_state, current_state):
            name = type(current_state).__name__
            self.schedulings += name == "SchedulingState"
            # the controller re-enters PreemptingState every loop iteration while a preemption goes on: told once
            repeated = name == type(previous_state).__name__
            event = None if repeated else _controller_event(current_state, self.schedulings)
            events = [*self.state.get("events", []), event] if event else self.state.get("events", [])
            self._write(progress=False, controller=name, events=events)

        def after_report(self, training_report, metrics):
            self._write(reports=self.state["reports"] + 1)

    return Heartbeat


def _controller_event(state, schedulings: int) -> Optional[str]:
    """What a user is told when the Train controller enters ``state``: restarts, resizes and preemptions of
    the worker group (None for the states of a run that goes as planned)."""
    from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

    from resnet_ray.resources import count

    name = type(state).__name__
    if name == "PreemptingState":
        return (
            "a node of the run is being preempted (a spot reclaim notice): the workers checkpoint their epoch, "
            "then the run restarts without it"
        )
    if name == "RestartingState":
        error = state.training_failed_error
        if _is_preemption_failure(error):
            return "restarting from the latest checkpoint after a preemption (train.max_preemptions)"
        # Ray's message holds each failed rank's traceback: its last line is the error itself
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[-1][:200] if lines else type(error).__name__
        return f"restarting from the latest checkpoint after a failure (train.max_failures): {cause}"
    if name == "ResizingState":
        workers = count(state.scaling_decision.num_workers, "worker")
        return f"the cluster has room for {workers} now: resizing the run (it restarts from its checkpoint)"
    if name == "SchedulingState" and schedulings > 1:
        workers = state.scaling_decision.num_workers
        return f"starting {count(workers, 'worker')} from the latest checkpoint"
    return None


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def watch_fit(
    trainer,
    timeout_s: float,
    setting: str = "train.stall_timeout_s",
    capacity: Optional[CapacityWatch] = None,
):
    """``trainer.fit()``, failing with StallError when no report reaches the controller for timeout_s, and with
    CapacityError when ``capacity`` says that the workers the run waits for cannot come. While the run waits
    for its workers, a line a minute says for what.

    A stopped run's controller is killed, so that fit() returns and the error names what was pending; so is the
    controller of a job a person stops (Ctrl-C, SIGTERM). Its workers go with it; so do its placement groups
    (``_remove_placement_groups``): Ray Train's cleaner only knows a group once its workers have started, and Ray
    keeps a dead actor's group until its job ends; and its reservations with Ray's autoscaling coordinator
    (``resources.release_train_reservations``).
    """
    # Ray Train's own Ctrl-C handler aborts the controller, then exits 0 or 1 in silence: without it, Ctrl-C
    # raises KeyboardInterrupt here and the job says what was kept (cli.run); its Ray processes stop with it
    trainer._register_sigint_handler = lambda controller: None
    folder = tempfile.mkdtemp(prefix="resnet-ray-heartbeat-")
    path = os.path.join(folder, "heartbeat.json")
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), _heartbeat_class()(path)]
    done, stall = threading.Event(), []
    fit_in_main = threading.current_thread() is threading.main_thread()

    def failure(beat: dict, now: float, waiting: dict) -> Optional[Exception]:
        """The error that stops the run now, if any; logs the waiting line when one is due."""
        state = beat.get("controller", "not started")
        if now - beat.get("t", waiting["start"]) > timeout_s:
            return _stalled(
                "training", timeout_s, setting, f" after {beat.get('reports', 0)} reports, controller {state}"
            )
        if capacity is None:
            return None
        if state not in WAITING_STATES:
            waiting["since"] = capacity.short_since = None
            return None
        from resnet_ray.resources import alive_nodes, pending_nodes

        nodes, pending = alive_nodes(), pending_nodes()
        waiting["since"] = waiting["since"] or now
        error = capacity.check(now, nodes, pending)
        if error is None and now - waiting["since"] >= REPORT_EVERY_S and now - waiting["line"] >= REPORT_EVERY_S:
            waiting["line"] = now
            log.warning(
                "waiting %.0f s for the worker group (controller %s): %s",
                now - waiting["since"],
                state,
                capacity.cluster_line(nodes, pending),
            )
        return error

    told = [0]  # controller events logged so far

    def tell(beat: dict) -> None:
        events = beat.get("events", [])
        for event in events[told[0] :]:
            log.warning("%s", event)
        told[0] = len(events)

    def watch():
        waiting = {"start": time.time(), "since": None, "line": 0.0}
        while not done.wait(min(5.0, timeout_s / 4)):
            beat = _read(path)
            tell(beat)
            error = failure(beat, time.time(), waiting)
            if error is not None:
                stall.append(error)
                log.error("%s; stopping the run", error)
                _stop_run(beat, fit_in_main)
                return

    watcher = threading.Thread(target=watch, name="training watchdog", daemon=True)
    watcher.start()
    interrupted = False
    try:
        result = trainer.fit()
    except BaseException as exc:
        if stall:
            raise stall[0] from None
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        raise
    finally:
        done.set()
        watcher.join()
        beat = _read(path)
        tell(beat)
        if interrupted:
            # a person stopped the job (Ctrl-C, SIGTERM): its controller would train on until this driver's exit,
            # and its reservations outlive it by 180 s (a --resume meanwhile would wait for them)
            _stop_run(beat, fit_in_main=False)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    if stall:
        raise stall[0]
    return result


def _stop_run(beat: dict, fit_in_main: bool) -> None:
    """Kill the run's controller (its workers go with it), then free what it held: its placement groups and what it
    asked Ray's autoscaling coordinator for."""
    _stop(beat.get("pid"), fit_in_main)
    _remove_placement_groups(beat.get("actor_id"))
    if beat.get("run_id"):
        from resnet_ray.resources import release_train_reservations

        release_train_reservations(beat["run_id"])


def _remove_placement_groups(actor_id: Optional[str]) -> None:
    """Remove the placement groups that the (killed) actor created and Ray has not removed yet.

    A group still waiting for resources when its creator died would otherwise be created later and hold
    them, unused, for as long as the job runs: a Tune search's later trials or this driver's evaluation
    would wait for CPUs that never come free. Reads Ray's GCS table (Ray is pinned): the public State API
    does not say which actor created a group."""
    if not actor_id:
        return
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup

    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = PlacementGroupTableData.FromString(raw)
        if pg.creator_actor_id.hex() == actor_id and pg.state != PlacementGroupTableData.REMOVED:
            log.info("removing placement group %s of the stopped run", pg.placement_group_id.hex())
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))


def _stop(pid: Optional[int], fit_in_main: bool) -> None:
    """Kill the Train controller (same node as this driver); interrupt fit() if no controller started."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    if fit_in_main:
        import _thread

        _thread.interrupt_main()
