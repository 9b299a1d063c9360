"""The driver's live display of a training run: one log line per finished epoch and, on a terminal, a bar of
the current epoch's steps fed by rank 0 through a tiny actor."""

from __future__ import annotations

import logging
import threading
import time

from resnet_ray.console import new_progress
from resnet_ray.run_folder import read_history

log = logging.getLogger(__name__)


def counted(batches, report, every_s: float = 0.5):
    """``batches``, calling ``report(steps so far)`` after a step at most every ``every_s`` seconds and after the
    last one (a counter and a clock: no host-device synchronization)."""
    last, step = time.monotonic(), 0
    for step, batch in enumerate(batches, 1):
        yield batch
        if time.monotonic() - last >= every_s:
            report(step)
            last = time.monotonic()
    report(step)


def step_progress_actor():
    """A tiny actor (no CPU) that holds rank 0's (epoch, step, steps), for the driver's live progress bar."""
    import ray

    @ray.remote(num_cpus=0)
    class StepProgress:
        def __init__(self):
            self.state = (0, 0, 0)

        def update(self, epoch: int, step: int, steps: int) -> None:
            self.state = (epoch, step, steps)

        def get(self) -> tuple:
            return self.state

    return StepProgress.remote()


class EpochLog:
    """While a run trains: one log line on the driver per finished epoch (losses, top-1/top-5, learning rate,
    img/s, ETA), read from the history.jsonl that rank 0 writes after every epoch (a local path or a URI); and,
    given ``progress`` (a :func:`step_progress_actor`) and a terminal ``console``, a live bar of the current
    epoch's steps below those lines."""

    def __init__(self, run_dir: str, epochs: int, interval_s: float = 2.0, progress=None, console=None):
        self.run_dir, self.epochs, self.interval_s = run_dir, epochs, interval_s
        self.shown = 0  # the last epoch logged
        self.progress, self.bar, self.task, self.bar_epoch = progress, None, None, 0
        self.lock = threading.Lock()
        if progress is not None and console is not None and console.is_terminal:
            self.bar = new_progress(console, "steps", transient=True)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="epoch-log", daemon=True)

    def __enter__(self) -> EpochLog:
        if self.bar:
            self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.poll()
        if self.bar:
            self.bar.stop()

    def _watch(self) -> None:
        tick = 0.5 if self.bar else self.interval_s
        last_poll = time.monotonic()
        while not self.stopped.wait(tick):
            if self.bar:
                self.poll_steps()
            if time.monotonic() - last_poll >= self.interval_s:
                self.poll()
                last_poll = time.monotonic()

    def poll_steps(self) -> None:
        """Move the live bar to rank 0's current step (an unanswered actor leaves it as it is)."""
        import ray

        with self.lock:  # the watcher thread and a final call: one read-and-draw at a time, in order
            try:
                epoch, step, steps = ray.get(self.progress.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - the bar is decoration: a slow or lost actor must not stop the run
                return
            if epoch and epoch >= self.bar_epoch:
                self._draw(epoch, step, steps)

    def _draw(self, epoch: int, step: int, steps: int) -> None:
        description = f"epoch {epoch}/{self.epochs}"
        if self.task is None:
            self.task = self.bar.add_task(description, total=steps)
        elif epoch != self.bar_epoch:
            self.bar.reset(self.task, total=steps, description=description)
        self.bar_epoch = epoch
        self.bar.update(self.task, completed=step)

    def poll(self) -> None:
        """Log the epochs finished since the last call (after a restart the history may start over)."""
        try:
            rows = read_history(self.run_dir)
        except (OSError, ValueError):  # not written yet, or caught mid-replace on a store without atomic moves
            return
        for row in rows:
            if row["epoch"] > self.shown:
                self.shown = row["epoch"]
                per_epoch = row["epoch_s"] + row["val_s"] + row.get("report_s", 0.0)
                eta = time.strftime("%H:%M:%S", time.gmtime(per_epoch * (self.epochs - row["epoch"])))
                val = (
                    f" | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f}"
                    if "val_top1" in row
                    else ""
                )
                log.info(
                    "epoch %d/%d  train loss %.4f acc %.4f%s | lr %.2e | %.0f img/s | ETA %s",
                    row["epoch"],
                    self.epochs,
                    row["train_loss"],
                    row["train_acc"],
                    val,
                    row["lr"],
                    row["images_per_s"],
                    eta,
                )
