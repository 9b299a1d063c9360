"""Distributed evaluation: Ray Data batch inference on actors -> summed confusion matrices -> report files.

Per batch the Predictor returns calibrated probabilities (the model's temperature, model.json) and the scores they
come from; the statistics summed here are the confusion matrix, top-5 hits, the calibration bins and the NLL
before and after the temperature, and (eval.tta) the predictions may average the image and its mirror. After the
split, ``errors.png`` and ``per_class_errors/`` show the most confident mistakes, their pixels read by row id from
the prepared split (no second inference). :func:`collect_logits` gives a split's scores to the temperature fit
(resnet_ray.calibration)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_ray import calibration, console, metrics, report, storage
from resnet_ray.checkpoint import MODEL_INFO, CheckpointError
from resnet_ray.config import Config, EvalConfig
from resnet_ray.config_files import to_dict
from resnet_ray.data.layout import read_rows, split_rows
from resnet_ray.data.load import (
    IN_MEMORY_BYTES,
    load_split,
    load_split_in_memory,
    quiet_data_progress,
    read_split,
    split_nbytes,
)
from resnet_ray.data.prepare import ensure_prepared
from resnet_ray.resources import alive_nodes, size_actor_pool
from resnet_ray.run_folder import default_output
from resnet_ray.runtime import started_here
from resnet_ray.saved_model import SavedModel

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """Inference did not cover the split exactly once."""


def check_model_fits(saved: SavedModel, meta: dict, model_path: str) -> None:
    if saved.num_classes != len(meta["classes"]):
        raise CheckpointError(
            f"{model_path}: the model has {saved.num_classes} classes, dataset "
            f"{meta['name']} has {len(meta['classes'])}"
        )
    if list(saved.info.get("classes") or meta["classes"]) != list(meta["classes"]):
        raise CheckpointError(f"{model_path}: the model's class names differ from dataset {meta['name']}'s")


def batch_statistics(batch: dict, num_classes: int, ece_bins: int, temperature: float = 1.0) -> dict:
    """One row per prediction batch: its C x C confusion matrix, top-5 hits, calibration bins (of the batch's
    confidence, calibrated at ``temperature`` by the Predictor), row count; where the batch has the Predictor's
    ``logits``, also the bins before calibration (T = 1) and the summed NLL after and before."""
    labels, preds = batch["label"], batch["pred"]
    correct = preds == labels
    stats = {
        "cm": metrics.confusion_matrix(labels, preds, num_classes)[None],
        "top5": np.array([(batch["top5"] == labels[:, None]).any(1).sum()]),
        "calibration": calibration.calibration_counts(batch["confidence"], correct, ece_bins)[None],
        "rows": np.array([len(labels)]),
    }
    if "logits" in batch:
        raw = np.exp(calibration.log_softmax(batch["logits"]).max(axis=1))
        stats["calibration_raw"] = calibration.calibration_counts(raw, correct, ece_bins)[None]
        stats["nll"] = np.array([calibration.negative_log_likelihood(batch["logits"], labels, temperature)])
        stats["nll_raw"] = np.array([calibration.negative_log_likelihood(batch["logits"], labels)])
    return stats


def _predictions_table(batch: dict) -> pa.Table:
    columns = {k: v for k, v in batch.items() if k not in ("top5", "logits")}
    if "logits" in batch:
        columns["confidence_raw"] = np.exp(calibration.log_softmax(batch["logits"]).max(axis=1))
    columns["top5"] = pa.array(list(batch["top5"]), type=pa.list_(pa.int64()))
    return pa.table(columns)


def _consume(batches, path: str, expected_rows: int, stats_kwargs: dict) -> dict:
    """Sum each prediction batch's statistics and append it to predictions.parquet at path (local).

    Also checks that row ids cover 0..expected_rows-1 exactly once.
    """
    coverage = metrics.RowCoverage(expected_rows, EvaluationError, "row", "split")
    total: dict = {}
    writer = None
    try:
        for batch in batches:
            coverage.add(batch["row_id"])
            for key, value in batch_statistics(batch, **stats_kwargs).items():
                total[key] = total.get(key, 0) + value.sum(0)
            table = _predictions_table(batch)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer:
            writer.close()
    coverage.finish()
    return total


def predictor_kwargs(cfg: EvalConfig, calibrated: bool = True) -> dict:
    """The Predictor settings of an evaluation: the scores with every batch (for the NLL and the uncalibrated
    bins), eval.tta, and calibrated probabilities unless ``calibrated`` is False (the temperature fit)."""
    return {"logits": True, "tta": cfg.tta, "calibrated": calibrated}


def predict_stream(
    cfg: Config, model_path: str, split: str, prepared: str, meta: dict, what: str, options: Optional[dict] = None
):
    """Prediction batches of a split from a Ray Data actor pool sized to fit the cluster, as they arrive
    (``options``: further Predictor arguments, predictor_kwargs).

    Raises StallError when no batch arrives for eval.stall_timeout_s (actors or reads that cannot start).
    """
    from resnet_ray.predictor import Predictor, on_actor_pool

    quiet_data_progress()  # the caller shows the progress; Ray Data's lines go to its log file
    pool = size_actor_pool(cfg.eval.num_actors, cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor, alive_nodes())
    # blocks of one batch: every actor gets work even when the split is one file, and predictions arrive
    # batch by batch (an actor returns a task's small outputs as one block, at the end of the task)
    small = split_nbytes(meta, split, cfg.data.limit) <= IN_MEMORY_BYTES
    rows = (load_split_in_memory if small else load_split)(cfg.data, split, prepared)  # small: no read tasks
    rows = rows.repartition(target_num_rows_per_block=cfg.eval.batch_size)
    kwargs = {"model_path": storage.normalize(model_path), **(options or {})}
    return on_actor_pool(rows, Predictor, kwargs, cfg.eval, pool, what)


def in_process(cfg: EvalConfig, rows: int) -> bool:
    """Whether a split of ``rows`` rows is predicted in this process (see EvalConfig.in_process_rows)."""
    if cfg.gpus_per_actor > 0:
        return False
    return started_here() if cfg.in_process_rows is None else rows <= cfg.in_process_rows


def predict_here(cfg: Config, model_path: str, split: str, prepared: str, options: Optional[dict] = None):
    """Prediction batches of a split from a Predictor in this process: the rows of ``load_split``, in batches of
    eval.batch_size, on this machine's cores (at most the CPUs that a local instance of this job declares)."""
    import ray

    from resnet_ray.predictor import Predictor

    threads = os.cpu_count() or 1
    if started_here():  # --num-cpus / RESNET_RAY_NUM_CPUS
        threads = max(1, min(threads, int(ray.cluster_resources().get("CPU", threads))))
    predictor = Predictor(storage.normalize(model_path), threads=threads, **(options or {}))
    b = cfg.eval.batch_size
    for part in read_split(cfg.data, split, prepared):
        for i in range(0, len(part["label"]), b):
            yield predictor({key: value[i : i + b] for key, value in part.items()})


def _advancing(batches, advance):
    for batch in batches:
        advance(len(batch["row_id"]))
        yield batch


def prediction_batches(cfg: Config, model_path: str, split: str, prepared: str, meta: dict, rows: int, options: dict):
    """Prediction batches of ``rows`` rows of a split: in this process or on Ray Data actors (in_process)."""
    if in_process(cfg.eval, rows):
        return predict_here(cfg, model_path, split, prepared, options)
    return predict_stream(cfg, model_path, split, prepared, meta, f"evaluation of {split}", options)


def collect_logits(cfg: Config, model_path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, C) float32, labels (N,)) of every row of a prepared split, in row-id order, before any
    temperature (eval.tta as configured): the evaluation's inference, checked to cover the split exactly once."""
    saved = SavedModel.verified(model_path)
    prepared, meta = ensure_prepared(cfg.data)
    check_model_fits(saved, meta, model_path)
    expected = split_rows(meta, split, cfg.data.limit)
    coverage = metrics.RowCoverage(expected, EvaluationError, "row", "split")
    logits = np.zeros((expected, saved.num_classes), dtype=np.float32)
    labels = np.zeros(expected, dtype=np.int64)
    options = predictor_kwargs(cfg.eval, calibrated=False)
    with console.progress_bar(f"scoring {split}", console.logging_console()) as (begin, advance):
        stream = prediction_batches(cfg, model_path, split, prepared, meta, expected, options)
        begin(expected)
        for batch in _advancing(stream, advance):
            coverage.add(batch["row_id"])
            logits[batch["row_id"]], labels[batch["row_id"]] = batch["logits"], batch["label"]
    coverage.finish()
    return logits, labels


def evaluate(cfg: Config, model_path: str, split: Optional[str] = None, output: Optional[str] = None) -> dict:
    """Evaluate a model (exported folder, checkpoint or run folder) on a prepared split.

    Returns {"report": report dict, "output": folder, "seconds": wall time, "images_per_s": throughput}.
    """
    split = split or cfg.eval.split
    saved = SavedModel.verified(model_path)  # local weights checked before the actors load them
    prepared, meta = ensure_prepared(cfg.data)
    check_model_fits(saved, meta, model_path)
    expected = split_rows(meta, split, cfg.data.limit)
    output = output or cfg.eval.output or default_output(model_path, f"eval-{split}")
    classes = list(meta["classes"])

    stats_kwargs = {"num_classes": len(classes), "ece_bins": cfg.eval.ece_bins, "temperature": saved.temperature}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        predictions = os.path.join(tmp, "predictions.parquet")
        with console.progress_bar(f"evaluating {split}", console.logging_console()) as (begin, advance):
            stream = prediction_batches(cfg, model_path, split, prepared, meta, expected, predictor_kwargs(cfg.eval))
            begin(expected)
            stats = _consume(_advancing(stream, advance), predictions, expected, stats_kwargs)
        seconds = time.perf_counter() - start
        if int(stats["rows"]) != expected or int(stats["cm"].sum()) != expected:
            raise EvaluationError(f"total support {int(stats['cm'].sum())} != {expected} rows in split {split!r}")
        coarse_cm = None
        if meta.get("fine_to_coarse") is not None:
            coarse_cm = metrics.coarse_confusion_matrix(
                stats["cm"], meta["fine_to_coarse"], len(meta["coarse_classes"])
            )
        result = _report(stats, coarse_cm, saved, meta, cfg, model_path, split, expected, seconds)
        result["errors"] = report.error_selection(
            pq.read_table(predictions, columns=["row_id", "label", "pred", "confidence"]),
            classes,
            cfg.eval.errors_shown,
        )
        images = read_rows(prepared, split, report.error_rows(result["errors"]), meta["image_size"])
        report.write_outputs(
            result,
            stats["cm"],
            classes,
            tmp,
            coarse_cm=coarse_cm,
            calibration=stats["calibration"],
            calibration_before=stats["calibration_raw"],
            error_images=images,
        )
        storage.upload_dir(tmp, output)
    log.debug(
        "evaluated %s on %s/%s: accuracy %.4f over %d rows in %.1f s -> %s",
        model_path,
        meta["name"],
        split,
        result["accuracy"],
        expected,
        seconds,
        output,
    )
    return {"report": result, "output": output, "seconds": seconds, "images_per_s": expected / seconds}


def _report(
    stats: dict,
    coarse_cm: Optional[np.ndarray],
    saved: SavedModel,
    meta: dict,
    cfg: Config,
    model_path: str,
    split: str,
    expected: int,
    seconds: float,
) -> dict:
    """The report dict: per-class and averaged metrics, top-5, ECE, confused pairs (and superclass tables)."""
    classes = list(meta["classes"])
    result = metrics.classification_report(stats["cm"], classes, zero_division=0.0)
    result.update(
        {
            "model": storage.normalize(model_path),
            "model_info": {
                "arch": saved.info["arch"],
                "sha256": saved.info.get("sha256"),
                "epoch": saved.info.get("epoch"),
                "val_metrics": saved.info.get("metrics"),
            },
            "dataset": meta["name"],
            "split": split,
            "rows": expected,
            "top5_accuracy": float(stats["top5"]) / expected,
            "ece": calibration.expected_calibration_error(stats["calibration"]),
            "nll": float(stats["nll"]) / expected,
            "calibration": _calibration(stats, saved, expected),
            "tta": cfg.eval.tta,
            "confused_pairs": metrics.most_confused_pairs(stats["cm"], classes, k=10),
            "images_per_s": expected / seconds,
            "config": to_dict(cfg),
        }
    )
    if coarse_cm is not None:
        coarse = metrics.classification_report(coarse_cm, meta["coarse_classes"], zero_division=0.0)
        coarse["confused_pairs"] = metrics.most_confused_pairs(coarse_cm, meta["coarse_classes"], k=10)
        result["coarse"] = coarse
    return result


def _calibration(stats: dict, saved: SavedModel, rows: int) -> dict:
    """The report's ``calibration``: the model's temperature, where it was fitted, and NLL / ECE before (T = 1)
    and after it."""
    fitted = saved.info.get("calibration") or {}
    return {
        "temperature": saved.temperature,
        "fitted_on": fitted.get("split") if fitted.get("fitted") else None,
        "fitted_with_tta": fitted.get("tta") if fitted.get("fitted") else None,
        "before": {
            "nll": float(stats["nll_raw"]) / rows,
            "ece": calibration.expected_calibration_error(stats["calibration_raw"]),
        },
        "after": {
            "nll": float(stats["nll"]) / rows,
            "ece": calibration.expected_calibration_error(stats["calibration"]),
        },
    }


def calibrate(cfg: Config, model_path: str) -> dict:
    """Fit the temperature of the exported model at ``model_path`` on the validation split of ``cfg.data`` (with
    eval.tta) and store it in its model.json; the record (see :func:`resnet_ray.calibration.fit_record`).

    A refit on train+val (``cfg.train.refit_on_val``) has no validation split: T = 1 is stored, and the record
    says why (``fitted`` false, ``reason``).
    """
    saved = SavedModel.read(model_path)
    if not saved.exported:
        raise CheckpointError(
            f"{model_path}: a temperature is stored in an exported model's {MODEL_INFO}; this is a training "
            "checkpoint: give the run folder or its model/ folder"
        )
    if cfg.train.refit_on_val:
        record = {"fitted": False, "temperature": 1.0, "reason": calibration.NO_VALIDATION}
    else:
        logits, labels = collect_logits(cfg, saved.folder, calibration.SPLIT)
        record = calibration.fit_record(logits, labels, cfg.eval.ece_bins, cfg.eval.tta)
    saved.store_calibration(record)
    return {**record, "model": saved.folder}
