"""One frozen configuration tree shared by every job: a dataclass per section, each validated when it is built.

``config_files.load_config(yaml_path, overrides)`` merges a YAML file and dotted overrides
(``["--optim.lr", "0.01"]`` or ``{"optim.lr": 0.01}``) into the defaults below; errors name the field
(``config_checks.ConfigError``). The model.arch registry is ``architectures.py``, the scaling section
``scaling_config.py``, the serve section ``serve_config.py``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from resnet_ray.architectures import ARCH_SWITCHES, ARCHS, BLOCKS, INITS, NORMS, SHORTCUTS, TORCHVISION_ARCHS
from resnet_ray.config_checks import check, choice, positive
from resnet_ray.scaling_config import ScalingConfig
from resnet_ray.serve_config import ServeConfig

SOURCES = ("digits", "cifar10", "cifar100", "parquet", "imagefolder")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")  # optim.schedule
AUGMENTS = ("crop", "rrc", "none")
AUTO_AUGMENTS = ("none", "trivialaugment")
SPLITS = ("train", "val", "test")
SEARCH_TYPES = ("loguniform", "uniform", "choice", "randint", "grid")
SCHEDULERS = ("asha", "none")  # tune.scheduler: none runs every trial to tune.max_epochs
RESIZE_POLICIES = ("center_crop", "stretch", "pad")  # resnet_ray.data.images
TTA_MODES = ("none", "flip")  # eval.tta: flip = the mean softmax over the image and its mirror (predictor.py)
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how splits are carved."""

    source: str = "digits"  # one of SOURCES
    path: Optional[str] = None  # archive / extracted folder / parquet folder / image folder
    root: str = "~/.cache/resnet_ray/datasets"  # prepared datasets live here (local path or URI)
    name: Optional[str] = None  # prepared dataset name; defaults to the source name
    image_column: str = "image"  # parquet source: encoded image column (bytes or {bytes, path})
    label_column: str = "label"  # parquet source: integer label column
    coarse_label_column: Optional[str] = None  # parquet source: optional superclass column
    classes: tuple = ()  # parquet source: class names when no classes.json sits beside the files
    md5: Optional[str] = None  # cifar archives: expected MD5 (defaults to the official one)
    download: bool = True  # cifar: download the official archive when no local copy is given
    image_size: int = 32  # stored image size: every source image becomes image_size x image_size RGB
    resize: str = "center_crop"  # center_crop | stretch | pad: how images of other sizes get there (data/images.py)
    on_bad_image: str = "error"  # error (stop, naming the file) | skip (leave it out, listed in metadata.json)
    val_fraction: float = 0.1  # stratified validation split carved from train
    test_fraction: float = 0.2  # carved from train only when the source has no test split
    seed: int = 0  # seed of the carving
    limit: Optional[int] = None  # rows per split when loading (smoke runs)
    shuffle: bool = True  # reshuffle the training split every epoch
    cache: bool = True  # keep decoded splits in Ray's object store across epochs (off for data larger than it)

    def __post_init__(self):
        choice(self.source, "data.source", SOURCES)
        if self.source in ("parquet", "imagefolder"):
            check(bool(self.path), "data.path", f"is required for data.source={self.source!r}")
        check(all(isinstance(c, str) for c in self.classes), "data.classes", "must be a list of strings")
        positive(self.image_size, "data.image_size")
        choice(self.resize, "data.resize", RESIZE_POLICIES)
        choice(self.on_bad_image, "data.on_bad_image", BAD_IMAGE_POLICIES)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0.0 < value < 0.5, f"data.{name}", f"must be in (0, 0.5), got {value!r}")
        if self.limit is not None:
            positive(self.limit, "data.limit")
        if self.name is not None:
            check(
                self.name.replace("-", "").replace("_", "").isalnum(),
                "data.name",
                f"{self.name!r} may hold only letters, digits, '-' and '_'",
            )

    @property
    def dataset_name(self) -> str:
        return self.name or self.source


@dataclass(frozen=True)
class ModelConfig:
    """The network: a torchvision ImageNet ResNet or a CIFAR ResNet of He et al. (ARCH_SWITCHES), its switches,
    initial weights and input resolution.

    The switches left null take the architecture's own value (ARCH_SWITCHES), so configs and model.json files
    written before the switches existed build exactly the same model."""

    arch: str = "resnet50"  # one of ARCHS (resnet18 / resnet20 are the small options for tests)
    weights: str = "imagenet"  # imagenet (=V2 for resnet50) | imagenet_v1 | imagenet_v2 | none | path to a state_dict
    image_size: int = 224  # images are resized to this on the device (CIFAR ResNets: 32, their native size)
    channels_last: bool = True  # NHWC memory format in training (faster on GPU and on CPU)
    compile: bool = False  # torch.compile the model
    # identity (option A: zero-padded, subsampled identity; no parameters) | projection (option B: 1x1 conv + norm
    # where the shape changes) | none (a plain net); null: the arch's own (identity for resnetN, none for plainN,
    # projection for resnet164 and the torchvision nets)
    shortcut: Optional[str] = None
    block: Optional[str] = None  # basic | bottleneck (CIFAR depth 9n+2); null: the arch's own
    preact: Optional[bool] = None  # pre-activation blocks, BN-ReLU before each conv (He et al. 2016b); null: own
    norm: str = "batch"  # batch | none (no BatchNorm at all; the convs then get a bias). CIFAR archs only
    init: str = (
        "he"  # he (kaiming_normal_, fan_out, relu: the papers') | xavier (xavier_uniform_) | default (PyTorch's)
    )
    # zero the last BN gamma of every residual branch so each block starts as the identity (Goyal et al. 2017);
    # null: the arch's own (true for the torchvision nets, as before; false for the CIFAR nets, as in the papers)
    zero_init_residual: Optional[bool] = None

    def own(self, switch: str) -> Any:
        """The value of ``switch`` this model is built with: the field, or the arch's own where it is null."""
        value = getattr(self, switch)
        return ARCH_SWITCHES[self.arch][switch] if value is None else value

    def resolved(self) -> ModelConfig:
        """This config with every null switch replaced by the architecture's own."""
        return dataclasses.replace(
            self, **{name: self.own(name) for name in ("shortcut", "block", "preact", "zero_init_residual")}
        )

    @property
    def torchvision(self) -> bool:
        return self.arch in TORCHVISION_ARCHS

    def __post_init__(self):
        choice(self.arch, "model.arch", ARCHS)
        check(bool(self.weights), "model.weights", "must be imagenet, imagenet_v1, imagenet_v2, none or a file path")
        check(
            self.torchvision or self.weights not in ("imagenet", "imagenet_v1", "imagenet_v2"),
            "model.weights",
            f"imagenet weights exist only for {', '.join(TORCHVISION_ARCHS)} (torchvision); use none for {self.arch} "
            "(or a state_dict file of the same architecture)",
        )
        check(self.image_size >= 16, "model.image_size", f"must be >= 16, got {self.image_size}")
        for name, allowed in (("shortcut", SHORTCUTS), ("block", BLOCKS), ("norm", NORMS), ("init", INITS)):
            if getattr(self, name) is not None:
                choice(getattr(self, name), f"model.{name}", allowed)
        if self.torchvision:
            self._check_torchvision()
        else:
            depth, per_block = ARCH_SWITCHES[self.arch]["depth"], 6 if self.own("block") == "basic" else 9
            check(
                (depth - 2) % per_block == 0,
                "model.block",
                f"{self.own('block')} blocks stack {per_block}n+2 layers; {self.arch} has {depth} "
                f"({'resnet20, resnet56, resnet110 and resnet164 fit' if per_block == 9 else 'use resnet164'})",
            )
        if self.own("zero_init_residual"):
            check(self.norm == "batch", "model.zero_init_residual", "needs model.norm batch (there is no BN gamma)")
            check(
                self.own("shortcut") != "none",
                "model.zero_init_residual",
                "needs shortcuts: without them every block would start at zero output, a dead net",
            )

    def _check_torchvision(self) -> None:
        """Refuse the switches that torchvision's ResNet classes cannot apply, naming the field."""
        own, where = ARCH_SWITCHES[self.arch], f"torchvision {self.arch}"
        check(
            self.shortcut in (None, "projection"),
            "model.shortcut",
            f"{self.shortcut} cannot apply to {where} (it has projection shortcuts, option B); "
            "the CIFAR archs (resnet20..110, plain20..110) have identity and none",
        )
        check(
            self.block in (None, own["block"]),
            "model.block",
            f"{self.block} cannot apply to {where} (its block is {own['block']})",
        )
        check(not self.preact, "model.preact", f"cannot apply to {where} (post-activation only); try resnet164")
        check(self.norm == "batch", "model.norm", f"none cannot apply to {where} (its convs have no bias)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule: a linear warmup, then a cosine decay or steps (optim.py)."""

    name: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.01  # head learning rate at reference_batch_size
    backbone_lr_scale: float = 1.0  # backbone lr = lr * backbone_lr_scale
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0  # linear from peak / warmup steps to the peak, before either schedule
    schedule: str = "cosine"  # cosine (after the warmup, down to min_lr_ratio) | step (x gamma at each milestone)
    # step: fractions of the run's total steps at which the lr is multiplied by gamma, so that one recipe fits any
    # length (He et al. 2016a: lr/10 at 32k and 48k of 64k iterations = [0.5, 0.75])
    milestones: tuple = ()
    gamma: float = 0.1  # step: lr factor at each milestone
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    label_smoothing: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping
    reference_batch_size: int = 256  # lr is scaled by global_batch / reference_batch_size
    scale_lr: bool = True

    def __post_init__(self):
        choice(self.name, "optim.name", OPTIMIZERS)
        positive(self.lr, "optim.lr")
        positive(self.backbone_lr_scale, "optim.backbone_lr_scale", allow_zero=True)
        check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            "optim.nesterov",
            "Nesterov SGD needs optim.momentum > 0",
        )
        positive(self.weight_decay, "optim.weight_decay", allow_zero=True)
        positive(self.warmup_epochs, "optim.warmup_epochs", allow_zero=True)
        choice(self.schedule, "optim.schedule", LR_SCHEDULES)
        check(
            all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0.0 < m < 1.0 for m in self.milestones),
            "optim.milestones",
            f"must be fractions of the run's steps in (0, 1), got {list(self.milestones)}",
        )
        check(
            list(self.milestones) == sorted(set(self.milestones)),
            "optim.milestones",
            f"must increase, got {list(self.milestones)}",
        )
        if self.schedule == "step":
            check(bool(self.milestones), "optim.milestones", "the step schedule needs at least one, e.g. [0.5, 0.75]")
        else:
            check(
                not self.milestones,
                "optim.milestones",
                f"only the step schedule has milestones (optim.schedule is {self.schedule}); set []",
            )
        check(0.0 < self.gamma <= 1.0, "optim.gamma", f"must be in (0, 1], got {self.gamma}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(
            0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        )
        positive(self.grad_clip_norm, "optim.grad_clip_norm", allow_zero=True)
        positive(self.reference_batch_size, "optim.reference_batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """The training run: epochs, batches, augmentation, checkpoints, fault tolerance."""

    epochs: int = 10
    batch_size: int = 128  # per worker
    seed: int = 0
    augment: str = "crop"  # crop (pad + random crop) | rrc (random resized crop) | none
    crop_padding: int = 4
    hflip: bool = True
    auto_augment: str = "none"  # none | trivialaugment: one random operation per image, on the device
    random_erasing: float = 0.0  # probability per image of erasing a random rectangle (0 disables)
    mixup_alpha: float = 0.0  # 0 disables mixup
    cutmix_alpha: float = 0.0  # 0 disables cutmix
    freeze_backbone_epochs: int = 0  # train only the new head for the first N epochs
    ema_decay: Optional[float] = None  # weight moving average (e.g. 0.999), validated and exported instead
    refit_on_val: bool = False  # final refit: train on train+val, no validation; the last epoch is exported
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    storage_path: str = "~/resnet_ray_runs"  # local path or URI (s3://...)
    name: Optional[str] = None  # run name: the same name resumes the same run
    keep_checkpoints: int = 2  # best K by validation top-1 (among the checkpointed epochs)
    checkpoint_every: Optional[int] = None  # epochs between checkpoints; null: about ten per run; the last always
    async_checkpoint: bool = True  # upload checkpoints in the background (training goes on meanwhile)
    max_failures: int = 0  # worker-group restarts allowed after a worker's error (Ray FailureConfig)
    max_preemptions: int = -1  # restarts after a node preemption (spot), counted apart from max_failures; -1: any
    fail_at_epoch: Optional[int] = None  # debug hook: kill one worker once after this epoch
    prefetch_batches: int = 2
    # elastic runs (scaling.num_workers: [min, max]): the largest batch one worker holds when the run has fewer
    # workers than max (resnet_ray.elastic); null: train.batch_size (the global batch shrinks, the lr with it)
    max_batch_size: Optional[int] = None
    evaluate_test: bool = True  # evaluate the best model on the test split at the end
    diagnostics: bool = True  # per-stage gradient norms (every step, on the device) in the history, gradients.png
    stall_timeout_s: float = 3600.0  # no epoch report for this long (workers unscheduled, hung): fail
    # the workers no longer fit on the cluster's nodes (a node lost for good): fail after this long when no node is
    # pending, after pending_node_timeout_s while the autoscaler launches nodes
    capacity_timeout_s: float = 120.0
    pending_node_timeout_s: float = 900.0
    mlflow_tracking_uri: Optional[str] = None  # MLflow tracking server or store (needs the mlflow extra); null: off
    mlflow_experiment: Optional[str] = None  # MLflow experiment; null: the dataset's name (a search's: tune.name)

    def __post_init__(self):
        check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        choice(self.augment, "train.augment", AUGMENTS)
        choice(self.auto_augment, "train.auto_augment", AUTO_AUGMENTS)
        check(
            0.0 <= self.random_erasing <= 1.0,
            "train.random_erasing",
            f"must be a probability in [0, 1], got {self.random_erasing}",
        )
        positive(self.crop_padding, "train.crop_padding", allow_zero=True)
        positive(self.mixup_alpha, "train.mixup_alpha", allow_zero=True)
        positive(self.cutmix_alpha, "train.cutmix_alpha", allow_zero=True)
        check(
            0 <= self.freeze_backbone_epochs <= self.epochs,
            "train.freeze_backbone_epochs",
            f"must be in [0, train.epochs={self.epochs}], got {self.freeze_backbone_epochs}",
        )
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        if self.ema_decay is not None:
            check(0.0 < self.ema_decay < 1.0, "train.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        if self.checkpoint_every is not None:
            check(self.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        check(self.max_failures >= -1, "train.max_failures", f"must be >= -1 (-1 = unlimited), got {self.max_failures}")
        check(
            self.max_preemptions >= -1,
            "train.max_preemptions",
            f"must be >= -1 (-1 = unlimited), got {self.max_preemptions}",
        )
        if self.fail_at_epoch is not None:
            check(
                1 <= self.fail_at_epoch < self.epochs,
                "train.fail_at_epoch",
                f"must be in [1, train.epochs), got {self.fail_at_epoch}",
            )
        if self.max_batch_size is not None:
            check(
                self.max_batch_size >= self.batch_size,
                "train.max_batch_size",
                f"must be >= train.batch_size={self.batch_size}, got {self.max_batch_size}",
            )
        check(self.prefetch_batches >= 0, "train.prefetch_batches", "must be >= 0")
        positive(self.stall_timeout_s, "train.stall_timeout_s")
        positive(self.capacity_timeout_s, "train.capacity_timeout_s")
        positive(self.pending_node_timeout_s, "train.pending_node_timeout_s")
        if self.name is not None:
            check(bool(self.name) and "/" not in self.name, "train.name", f"{self.name!r} is not a valid run name")
        for name in ("mlflow_tracking_uri", "mlflow_experiment"):  # whether mlflow is installed: tracking.check_mlflow
            value = getattr(self, name)
            check(value is None or bool(value.strip()), f"train.{name}", "must not be empty (null turns it off)")

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether ``epoch`` ends with a checkpoint: every checkpoint_every epochs (default: about ten per run),
        and always the last epoch."""
        every = self.checkpoint_every or max(1, math.ceil(self.epochs / 10))
        return epoch % every == 0 or epoch == self.epochs


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameter search over Ray Train trials: sampled values (Optuna's TPE) stopped early by ASHA, or a grid
    (``type: grid``: every combination, ``num_samples`` times) run to the end with ``scheduler: none``."""

    num_samples: int = 8
    max_concurrent_trials: int = 2
    max_epochs: int = 10  # train.epochs of every trial
    # Train workers of every trial (default scaling.num_workers, an elastic run's max). train.epochs and
    # scaling.num_workers stay the full-length run's: best_config.yaml keeps them, with the best trial's values on top.
    trial_workers: Optional[int] = None
    grace_period: int = 1
    reduction_factor: int = 2
    scheduler: str = "asha"  # asha (early stopping) | none (every trial runs tune.max_epochs epochs)
    metric: str = "val_top1"
    mode: str = "max"
    storage_path: Optional[str] = None  # defaults to train.storage_path
    name: Optional[str] = None  # experiment name; the same name resumes
    # dotted key -> {type, low, high} | {type: choice, values} | {type: grid, values}
    search_space: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_samples", "max_concurrent_trials", "max_epochs", "grace_period"):
            check(getattr(self, name) >= 1, f"tune.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(
            self.trial_workers is None or self.trial_workers >= 1,
            "tune.trial_workers",
            f"must be >= 1, got {self.trial_workers}",
        )
        check(self.reduction_factor >= 2, "tune.reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        check(self.grace_period <= self.max_epochs, "tune.grace_period", "must be <= tune.max_epochs")
        choice(self.mode, "tune.mode", ("max", "min"))
        choice(self.scheduler, "tune.scheduler", SCHEDULERS)
        for key, spec in self.search_space.items():
            _validate_search_spec(key, spec)


@dataclass(frozen=True)
class EvalConfig:
    """Distributed evaluation (batch inference on Ray Data actors)."""

    split: str = "test"
    batch_size: int = 256
    num_actors: int = 2
    gpus_per_actor: float = 0.0  # > 0 runs one actor per GPU share
    cpus_per_actor: float = 1.0
    output: Optional[str] = None  # report folder; defaults to <run>/eval-<split> or <model>/eval-<split>
    ece_bins: int = 15
    # test-time augmentation of evaluation and prediction: none | flip (the mean of the softmax over the image and
    # its horizontal mirror, on the device; twice the inference). Recorded in the report; compare.py pairs a flip
    # evaluation with a plain one only when asked (--allow-tta)
    tta: str = "none"
    errors_shown: int = 32  # errors.png: the most confidently wrong images of the split (per_class_errors/: 8 each)
    stall_timeout_s: float = 600.0  # no prediction batch for this long (actors or reads unscheduled): fail
    # CPU evaluations (no eval.gpus_per_actor) of at most this many rows run in the job's own process, not on Ray
    # Data actors (a process start, torch and torchvision imports and a model load each: ~5 s on 2 cores).
    # null: all of them on a local Ray instance that the job started (its actors could only use this machine's
    # cores), none on a cluster. 0: always actors
    in_process_rows: Optional[int] = None

    def __post_init__(self):
        choice(self.split, "eval.split", SPLITS)
        check(
            self.in_process_rows is None or self.in_process_rows >= 0,
            "eval.in_process_rows",
            f"must be >= 0 or null, got {self.in_process_rows}",
        )
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.num_actors >= 1, "eval.num_actors", f"must be >= 1, got {self.num_actors}")
        positive(self.gpus_per_actor, "eval.gpus_per_actor", allow_zero=True)
        positive(self.cpus_per_actor, "eval.cpus_per_actor", allow_zero=True)
        check(self.ece_bins >= 1, "eval.ece_bins", f"must be >= 1, got {self.ece_bins}")
        choice(self.tta, "eval.tta", TTA_MODES)
        check(self.errors_shown >= 1, "eval.errors_shown", f"must be >= 1, got {self.errors_shown}")
        positive(self.stall_timeout_s, "eval.stall_timeout_s")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        if self.train.mixup_alpha > 0 or self.train.cutmix_alpha > 0:
            check(self.train.batch_size >= 2, "train.batch_size", "must be >= 2 with mixup/cutmix")

    @property
    def global_batch_size(self) -> int:
        """The run's global batch: train.batch_size per worker on all (scaling.num_workers' max) workers."""
        return self.train.batch_size * self.scaling.max_workers

    @property
    def trial_workers(self) -> int:
        """Train workers of every search trial: a fixed count (an elastic run's max by default)."""
        return self.tune.trial_workers or self.scaling.max_workers


def _validate_search_spec(key: str, spec: Any) -> None:
    name = f"tune.search_space.{key}"
    check(
        isinstance(spec, dict) and spec.get("type") in SEARCH_TYPES,
        name,
        f"must be a mapping with type one of {', '.join(SEARCH_TYPES)}",
    )
    parts = key.split(".")
    section = {f.name: f for f in dataclasses.fields(Config)}.get(parts[0])
    check(section is not None and len(parts) == 2, name, "must name a config field as section.field")
    fields = {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[parts[0]])}
    check(parts[1] in fields, name, f"unknown field; {parts[0]} has: {', '.join(sorted(fields))}")
    if spec["type"] in ("choice", "grid"):
        kind = spec["type"]
        check(isinstance(spec.get("values"), list) and spec["values"], name, f"{kind} needs a non-empty 'values' list")
        check(set(spec) <= {"type", "values"}, name, f"{kind} takes only 'values'")
    else:
        check(set(spec) == {"type", "low", "high"}, name, f"{spec['type']} needs exactly 'low' and 'high'")
        low, high = spec["low"], spec["high"]
        check(
            isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high,
            name,
            f"needs numeric low < high, got {low!r}, {high!r}",
        )
        if spec["type"] == "loguniform":
            check(low > 0, name, "loguniform needs low > 0")
