"""Temperature scaling of an exported model (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One temperature T > 0 divides the model's scores before the softmax; it is fitted on the validation split's scores
(collected by the evaluation's inference, ``evaluate.collect_logits``) by minimising their NLL
(``metrics.fit_temperature``), and stored in the model's ``model.json`` (``temperature``, with the fit's figures
under ``calibration``). The Predictor then gives calibrated probabilities by default (evaluation, prediction,
serving); top-1 never changes. A model without a temperature (exported before, or a refit on train+val, which has
no validation split to fit on) has T = 1. The training job calls :func:`calibrate` at the end of a run,
``jobs/calibrate.py`` for an existing model.
"""

from __future__ import annotations

import numpy as np

from resnet_ray import metrics
from resnet_ray.checkpoint import MODEL_INFO, CheckpointError
from resnet_ray.config import Config
from resnet_ray.saved_model import SavedModel

SPLIT = "val"  # the split a temperature is fitted on: never test, which only evaluation touches
NO_VALIDATION = "a refit on train+val has no validation split to fit it on"
# fewer validation rows than this fit noise, not calibration (Guo et al. fit on 5,000): T stays 1, and says why
MIN_ROWS = 100


def fit_record(logits: np.ndarray, labels: np.ndarray, ece_bins: int, tta: str) -> dict:
    """Fit T on (logits, labels) and measure NLL and ECE on them before (T = 1) and after: model.json's
    ``calibration`` record. With fewer than MIN_ROWS rows nothing is fitted: T = 1 and the record says why."""
    n = len(labels)
    if n < MIN_ROWS:
        reason = f"only {n} {SPLIT} rows; a fit needs at least {MIN_ROWS}"
        return {"fitted": False, "temperature": 1.0, "reason": reason, "split": SPLIT, "rows": int(n), "tta": tta}
    temperature = metrics.fit_temperature(logits, labels)
    record = {"fitted": True, "temperature": temperature, "split": SPLIT, "rows": int(n), "tta": tta}
    for when, t in (("before", 1.0), ("after", temperature)):
        logp = metrics.log_softmax(logits, t)
        confidence = np.exp(logp.max(axis=1))
        counts = metrics.calibration_counts(confidence, logp.argmax(axis=1) == labels, ece_bins)
        record[f"nll_{when}"] = metrics.negative_log_likelihood(logits, labels, t) / max(n, 1)
        record[f"ece_{when}"] = metrics.expected_calibration_error(counts)
    return record


def calibrate(cfg: Config, model_path: str) -> dict:
    """Fit the temperature of the exported model at ``model_path`` on the validation split of ``cfg.data`` (with
    eval.tta) and store it in its model.json; the record (see :func:`fit_record`).

    A refit on train+val (``cfg.train.refit_on_val``) has no validation split: T = 1 is stored, and the record
    says why (``fitted`` false, ``reason``).
    """
    from resnet_ray.evaluate import collect_logits  # the evaluation's inference (Ray Data, torch)

    saved = SavedModel.read(model_path)
    if not saved.exported:
        raise CheckpointError(
            f"{model_path}: a temperature is stored in an exported model's {MODEL_INFO}; this is a training "
            "checkpoint: give the run folder or its model/ folder"
        )
    if cfg.train.refit_on_val:
        record = {"fitted": False, "temperature": 1.0, "reason": NO_VALIDATION}
    else:
        logits, labels = collect_logits(cfg, saved.folder, SPLIT)
        record = fit_record(logits, labels, cfg.eval.ece_bins, cfg.eval.tta)
    saved.store_calibration(record)
    return {**record, "model": saved.folder}
