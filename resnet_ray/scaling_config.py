"""The ``scaling`` section of the config: how many Ray Train workers (a count, or ``[min, max]`` for an elastic
run) and what each one holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from resnet_ray.config_checks import check, positive


@dataclass(frozen=True)
class ScalingConfig:
    """How many Ray Train workers and what each one holds.

    ``num_workers`` is a count, or ``[min, max]`` for an elastic run (spot nodes): it starts once ``min`` workers
    fit, grows towards ``max`` as nodes join (checked every ``resize_interval_s``) and shrinks as nodes leave,
    each resize a restart from the latest checkpoint. Batch and learning rate follow the world size by
    :func:`resnet_ray.elastic.batch_at`."""

    num_workers: Union[int, tuple] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    resize_interval_s: float = 60.0  # elastic runs: how often Ray Train looks for room to grow

    def __post_init__(self):
        workers = self.num_workers
        if isinstance(workers, (list, tuple)):
            check(
                len(workers) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in workers),
                "scaling.num_workers",
                f"expected a count or [min, max], got {list(workers)}",
            )
            check(1 <= workers[0] <= workers[1], "scaling.num_workers", f"needs 1 <= min <= max, got {list(workers)}")
            object.__setattr__(self, "num_workers", workers[0] if workers[0] == workers[1] else tuple(workers))
        else:
            check(
                isinstance(workers, int) and not isinstance(workers, bool),
                "scaling.num_workers",
                f"expected a count or [min, max], got {workers!r}",
            )
            check(workers >= 1, "scaling.num_workers", f"must be >= 1, got {workers}")
        positive(self.cpus_per_worker, "scaling.cpus_per_worker", allow_zero=True)
        positive(self.gpus_per_worker, "scaling.gpus_per_worker")
        positive(self.resize_interval_s, "scaling.resize_interval_s")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def resources_per_worker(self) -> dict:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources
