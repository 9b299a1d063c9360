"""Shared command-line handling for the jobs: --config/--local, dotted overrides, logging, clean errors."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Optional

from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
LOCAL_CONFIG = os.path.join(CONFIGS, "local.yaml")
LOCAL_TUNE_CONFIG = os.path.join(CONFIGS, "tune-local.yaml")


def user_errors() -> tuple:
    """Exceptions that mean bad input: reported in one line, exit status 2, no traceback."""
    from resnet_ray.checkpoint import CheckpointError
    from resnet_ray.config_checks import ConfigError
    from resnet_ray.data.layout import DataError
    from resnet_ray.model import ModelError
    from resnet_ray.resources import ResourceError

    return ConfigError, DataError, ModelError, CheckpointError, ResourceError


def ray_failures() -> tuple:
    """Exceptions that mean the cluster could not do the work (unreachable, stalled, out of room for the workers, an
    evaluation that did not cover its split exactly once, a step after a finished training): one line, exit
    status 1."""
    from resnet_ray.evaluate import EvaluationError
    from resnet_ray.predict import PredictionError
    from resnet_ray.runtime import RayConnectError
    from resnet_ray.train import AfterTrainingError
    from resnet_ray.watchdog import CapacityError, DeployError, StallError

    return (
        RayConnectError,
        StallError,
        CapacityError,
        DeployError,
        EvaluationError,
        PredictionError,
        AfterTrainingError,
    )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any config field can be overridden with --section.field VALUE, e.g. --optim.lr 0.01 --train.epochs 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--local",
        action="store_true",
        help="single-node test mode: configs/local.yaml, a local Ray instance on this machine",
    )
    p.add_argument(
        "--num-cpus",
        type=float,
        metavar="N",
        help="logical CPUs of the local Ray instance (default: $RESNET_RAY_NUM_CPUS or this machine's cores)",
    )
    return p


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, local_config: str | None = LOCAL_CONFIG
) -> tuple[argparse.Namespace, list]:
    """Known options and the remaining ``--section.field value`` overrides.

    ``--local`` without ``--config`` means ``local_config`` (None: the job finds its config elsewhere).
    """
    args, overrides = p.parse_known_args(argv)
    if args.local and not args.config:
        args.config = local_config
    return args, overrides


def config_from(args: argparse.Namespace, overrides: Sequence[str]) -> Config:
    """--config (a local path or a URI such as a search's s3://.../best_config.yaml) <- the dotted overrides."""
    from resnet_ray import storage

    if not args.config or not storage.is_uri(args.config):
        return load_config(args.config, overrides)
    if not storage.exists(args.config):
        raise ConfigError(f"config file {args.config}: not found")
    with storage.local_file(args.config, suffix=".yaml") as local:
        return load_config(local, overrides)


def setup_logging(level: int = logging.INFO) -> None:
    from rich.logging import RichHandler

    if sys.stderr.isatty():
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:  # a log file or a pipe: one plain line per record, never wrapped
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Tune's "The `on_step_begin` operation took 0.6 s, which may be a performance bottleneck" on a busy machine
    logging.getLogger("ray.tune.utils.util").setLevel(max(level, logging.ERROR))


_interrupt_hint: Optional[Callable[[], str]] = None


def on_interrupt(hint: Callable[[], str]) -> None:
    """What the job says when a person stops it (Ctrl-C, SIGTERM): ``hint()`` names what was kept and the
    command that continues it."""
    global _interrupt_hint
    _interrupt_hint = hint


def resume_command(job: str, folder: str, args: argparse.Namespace) -> str:
    """``python jobs/<job>.py --resume FOLDER`` with the options that choose the Ray instance (--local, --num-cpus)."""
    command = ["python", f"jobs/{job}.py", "--resume", folder]
    if args.local:
        command.append("--local")
    if args.num_cpus is not None:
        command += ["--num-cpus", f"{args.num_cpus:g}"]
    return shlex.join(command)


def _exit_on_sigterm(signum, frame):
    sys.exit(signum)  # what ray.init installs too: SystemExit(15) unwinds the job like Ctrl-C's KeyboardInterrupt


def _interrupted(signum: int) -> NoReturn:
    """One line (which signal, what was kept, how to continue), then exit 128 + signum (130, 143)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
    try:
        kept = _interrupt_hint() if _interrupt_hint else None
    except Exception as exc:  # the line must come out: say why it is short
        kept = f"what was kept is unknown ({type(exc).__name__}: {exc})"
    name = signal.Signals(signum).name
    print(f"interrupted by {name}" + (f": {kept}" if kept else ""), file=sys.stderr)
    finish(128 + signum)


def run(main: Callable[[], int | None]) -> None:
    """Run a job's main; bad input ends with one clear line on stderr and exit status 2, a cluster that
    cannot do the work (unreachable, stalled) with one line and exit status 1, Ctrl-C (SIGINT) or SIGTERM with
    one line saying what was kept (``on_interrupt``) and exit status 130 or 143."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        code = main() or 0
    except KeyboardInterrupt:
        _interrupted(signal.SIGINT)
    except SystemExit as exc:  # --help, argparse's usage errors: before the clauses below import their error classes
        if exc.code == signal.SIGTERM:
            _interrupted(signal.SIGTERM)
        raise
    except ray_failures() as exc:  # first: its classes import no torch, so a dead cluster fails fast
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finish(code)


def finish(code: int) -> NoReturn:
    """End a job that has done its work: Ray shut down (a local instance's processes stopped), the output and
    logs flushed, then exit without the interpreter's teardown of torch and Ray's core worker, which takes
    seconds and writes nothing. (Code that runs a job inside its own process, such as a test, replaces this.)"""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
