"""The temperature fit's record: fitted on enough validation rows, else T = 1 with the reason."""

import numpy as np

from resnet_ray.calibration import MIN_ROWS, fit_record
from resnet_ray.console import calibration_line


def over_confident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(0, 1, (n, 10))
    logits[np.arange(n), labels] += 2.0
    return 4.0 * logits, labels  # sharpened four times: over-confident, so the fitted T is well above 1


def test_enough_rows_fit_a_temperature_that_lowers_nll_and_ece():
    record = fit_record(*over_confident(2000), ece_bins=15, tta="none")
    assert record["fitted"] and record["rows"] == 2000 and record["temperature"] > 1.5
    assert record["nll_after"] < record["nll_before"] and record["ece_after"] < record["ece_before"]


def test_too_few_validation_rows_keep_t_1_and_say_why():
    record = fit_record(*over_confident(MIN_ROWS - 1), ece_bins=15, tta="none")
    assert not record["fitted"] and record["temperature"] == 1.0
    assert calibration_line(record) == (
        f"temperature 1 (not fitted: only {MIN_ROWS - 1} val rows; a fit needs at least {MIN_ROWS})"
    )
