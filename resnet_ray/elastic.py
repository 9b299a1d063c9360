"""Elastic runs (``scaling.num_workers: [min, max]``): the batch and learning rate at each world size.

The rule, checked when the run starts (``train._check_batches``) and applied by every worker after each
(re)start:

- the run's global batch is ``G = train.batch_size x max`` (as planned, on all workers);
- at ``w`` workers each worker takes ``b = min(train.max_batch_size, G // w)``: the global batch stays G while
  the per-worker batch can absorb it (``train.max_batch_size``, default ``train.batch_size``: no headroom);
- otherwise the global batch is ``b x w`` and the learning rate follows it by the linear batch rule:
  ``lr x (b x w) / G`` (Goyal et al. 2017), whether or not ``optim.scale_lr`` scales the planned lr.

A resize is a restart from the latest checkpoint (Ray Train): the steps per epoch and the schedule's position
are recomputed there from the completed epochs (``WorkerSession.restore``).
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_ray.config import Config
from resnet_ray.config_files import replace
from resnet_ray.optim import peak_lr
from resnet_ray.resources import count


@dataclass(frozen=True)
class WorldBatch:
    workers: int
    per_worker: int  # each worker's batch
    lr: float  # peak learning rate at this size

    @property
    def global_batch(self) -> int:
        return self.per_worker * self.workers


def batch_at(cfg: Config, workers: int) -> WorldBatch:
    """The per-worker batch and peak learning rate of ``cfg``'s run on ``workers`` workers."""
    planned = cfg.global_batch_size
    most = cfg.train.max_batch_size or cfg.train.batch_size
    per_worker = min(most, planned // workers)
    return WorldBatch(workers, per_worker, peak_lr(cfg.optim, planned) * per_worker * workers / planned)


def at_world_size(cfg: Config, workers: int) -> Config:
    """The config a worker of an elastic run trains with on ``workers`` workers (``cfg`` itself when not elastic):
    its per-worker batch, and a learning rate whose peak is ``batch_at``'s."""
    if not cfg.scaling.elastic:
        return cfg
    size = batch_at(cfg, workers)
    # with optim.scale_lr the optimizer scales the lr by the global batch it sees; without, it is scaled here
    lr = cfg.optim.lr if cfg.optim.scale_lr else cfg.optim.lr * size.global_batch / cfg.global_batch_size
    return replace(cfg, {"scaling.num_workers": workers, "train.batch_size": size.per_worker, "optim.lr": lr})


def describe(cfg: Config) -> str:
    """One line: the batch and lr at each world size of an elastic run, as the run starts."""
    sizes = [batch_at(cfg, w) for w in range(cfg.scaling.max_workers, cfg.scaling.min_workers - 1, -1)]
    return "elastic run, " + "; ".join(
        f"{count(s.workers, 'worker')}: batch {s.per_worker} each, global {s.global_batch}, lr {s.lr:.4g}"
        for s in sizes
    )
