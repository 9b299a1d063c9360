"""resnet_ray.metrics against sklearn and hand-computed values."""

import math

import numpy as np
import pytest
from sklearn.metrics import classification_report as sk_report
from sklearn.metrics import confusion_matrix as sk_cm

from resnet_ray import calibration as C
from resnet_ray import metrics as M

TOL = 1e-9


def _names(c):
    return [f"class_{i}" for i in range(c)]


def _close(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= TOL


def assert_matches_sklearn(y, p, c, zero_division):
    cm = M.confusion_matrix(y, p, c)
    np.testing.assert_array_equal(cm, sk_cm(y, p, labels=list(range(c))))
    names = _names(c)
    ours = M.classification_report(cm, names, zero_division=zero_division)
    ref = sk_report(y, p, labels=list(range(c)), target_names=names, output_dict=True, zero_division=zero_division)
    assert ours["total_support"] == cm.sum() == len(y)
    assert ours["num_classes"] == c
    assert [r["index"] for r in ours["per_class"]] == list(range(c))
    for row in ours["per_class"]:
        r = ref[row["class"]]
        for ours_key, ref_key in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert _close(row[ours_key], r[ref_key]), (row, r, ours_key)
    for key in ("macro avg", "weighted avg"):
        for ours_key, ref_key in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert _close(ours[key][ours_key], ref[key][ref_key]), (key, ours_key, ours[key], ref[key])
    if "accuracy" in ref:
        assert _close(ours["accuracy"], ref["accuracy"])
        for k in ("precision", "recall", "f1"):
            assert _close(ours["micro avg"][k], ref["accuracy"])
    else:
        for k, rk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert _close(ours["micro avg"][k], ref["micro avg"][rk])
    assert _close(ours["accuracy"], float(np.mean(np.asarray(y) == np.asarray(p))))


@pytest.mark.parametrize("zero_division", [0, 1, 0.0, 1.0])
@pytest.mark.parametrize("c,n", [(10, 500), (100, 3000), (100, 150)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matches_sklearn(seed, c, n, zero_division):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    # mostly-correct predictions with noise, so scores are non-trivial
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n))
    assert_matches_sklearn(y, p, c, zero_division)


def _adversarial_sets():
    rng = np.random.default_rng(42)
    y10 = rng.integers(0, 10, 200)
    cases = {
        "all_labels_one_class": (np.full(50, 3), rng.integers(0, 10, 50), 10),
        "all_preds_one_class": (y10, np.full(200, 7), 10),
        "labels_and_preds_same_single_class": (np.full(20, 2), np.full(20, 2), 10),
        "disjoint_single_classes": (np.full(20, 2), np.full(20, 5), 10),
        "class_never_predicted": (y10, np.where(y10 == 4, 5, y10), 10),
        "class_zero_support": (np.where(y10 == 6, 0, y10), y10, 10),
        "perfect": (y10, y10.copy(), 10),
        "all_wrong": (y10, (y10 + 1) % 10, 10),
        "single_sample": (np.array([1]), np.array([1]), 10),
        "binary_values_in_10_classes": (np.array([0, 1, 1, 0, 1]), np.array([1, 1, 0, 0, 1]), 10),
        "100_classes_sparse": (rng.integers(0, 100, 60), rng.integers(0, 100, 60), 100),
        "100_classes_half_missing": (rng.integers(0, 50, 400), rng.integers(25, 75, 400), 100),
    }
    return cases


@pytest.mark.parametrize("zero_division", [0, 1])
@pytest.mark.parametrize("case", sorted(_adversarial_sets()))
def test_adversarial_matches_sklearn(case, zero_division):
    y, p, c = _adversarial_sets()[case]
    assert_matches_sklearn(y, p, c, zero_division)


def test_nan_zero_division_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 100)
    p = np.where(y == 1, 2, y)  # class 1 never predicted
    y = np.where(y == 3, 0, y)  # class 3 has no support but is predicted
    assert_matches_sklearn(y, p, 6, np.nan)  # class 5 neither true nor predicted


def test_zero_division_conventions_explicit():
    # class 0: tp=2; class 1: never predicted (tp=0, fn=1); class 2: never anything.
    cm = np.array([[2, 0, 0], [1, 0, 0], [0, 0, 0]])
    r0 = M.classification_report(cm, ["a", "b", "c"], zero_division=0)
    r1 = M.classification_report(cm, ["a", "b", "c"], zero_division=1)
    b0, c0 = r0["per_class"][1], r0["per_class"][2]
    b1, c1 = r1["per_class"][1], r1["per_class"][2]
    assert (b0["precision"], b0["recall"], b0["f1"]) == (0.0, 0.0, 0.0)
    # precision is 0/0 -> 1, recall 0/1 -> 0, F1 = 2tp/(2tp+fp+fn) = 0 (defined)
    assert (b1["precision"], b1["recall"], b1["f1"]) == (1.0, 0.0, 0.0)
    assert (c0["precision"], c0["recall"], c0["f1"]) == (0.0, 0.0, 0.0)
    assert (c1["precision"], c1["recall"], c1["f1"]) == (1.0, 1.0, 1.0)
    assert r1["total_support"] == 3 and c1["support"] == 0


def test_report_is_plain_python():
    cm = M.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    r = M.classification_report(cm, ["a", "b", "c"])
    assert type(r["total_support"]) is int and type(r["accuracy"]) is float
    assert all(type(row["support"]) is int and type(row["f1"]) is float for row in r["per_class"])
    assert set(r) >= {"per_class", "macro avg", "weighted avg", "micro avg", "accuracy", "total_support"}
    with pytest.raises(ValueError, match="class_names"):
        M.classification_report(cm, ["a", "b"])


def test_batched_confusion_sums_to_whole():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 100, 5000)
    p = rng.integers(0, 100, 5000)
    whole = M.confusion_matrix(y, p, 100)
    assert whole.dtype == np.int64 and whole.shape == (100, 100)
    splits = np.array_split(np.arange(5000), 13)
    summed = sum(M.confusion_matrix(y[s], p[s], 100) for s in splits)
    np.testing.assert_array_equal(summed, whole)
    # an empty batch contributes zeros
    assert M.confusion_matrix([], [], 100).sum() == 0


def test_confusion_orientation():
    cm = M.confusion_matrix([0, 0, 1], [1, 1, 1], 3)
    assert cm[0, 1] == 2 and cm[1, 1] == 1 and cm.sum() == 3


@pytest.mark.parametrize(
    "labels,preds,needle",
    [([0, 1, 10], [0, 1, 2], "10"), ([0, 1, 2], [0, -3, 2], "-3"), ([0, 1, 2], [0, 1, 12], "12")],
)
def test_out_of_range_raises_naming_value(labels, preds, needle):
    with pytest.raises(ValueError, match=rf"= {needle} is outside"):
        M.confusion_matrix(labels, preds, 10)


def test_length_mismatch_and_non_integer():
    with pytest.raises(ValueError, match="lengths"):
        M.confusion_matrix([0, 1], [0], 3)
    with pytest.raises(ValueError, match="1.5"):
        M.confusion_matrix([0, 1.5], [0, 1], 3)


def test_coarse_matches_direct_mapping():
    rng = np.random.default_rng(11)
    fine_to_coarse = rng.permutation(np.repeat(np.arange(20), 5))  # 100 -> 20, 5 each
    y = rng.integers(0, 100, 4000)
    p = np.where(rng.random(4000) < 0.5, y, rng.integers(0, 100, 4000))
    fine = M.confusion_matrix(y, p, 100)
    coarse = M.coarse_confusion_matrix(fine, fine_to_coarse, 20)
    direct = M.confusion_matrix(fine_to_coarse[y], fine_to_coarse[p], 20)
    np.testing.assert_array_equal(coarse, direct)
    assert coarse.dtype == np.int64 and coarse.sum() == 4000
    with pytest.raises(ValueError, match="entries"):
        M.coarse_confusion_matrix(fine, fine_to_coarse[:50], 20)
    with pytest.raises(ValueError, match="= 20 is outside"):
        M.coarse_confusion_matrix(fine, np.where(fine_to_coarse == 0, 20, fine_to_coarse), 20)


def test_ece_hand_computed():
    # 4 bins: [0,.25], (.25,.5], (.5,.75], (.75,1]
    conf = np.array([0.1, 0.3, 0.4, 0.6, 0.7, 0.9, 1.0, 0.5])
    correct = np.array([0, 1, 0, 1, 1, 1, 0, 1])
    counts = C.calibration_counts(conf, correct, n_bins=4)
    np.testing.assert_allclose(counts[:, 0], [1, 3, 2, 2])  # 0.5 lands in (.25,.5]
    # bin0: |0 - .1| = .1 ; bin1: |2 - 1.2| = .8 ; bin2: |2 - 1.3| = .7 ; bin3: |1 - 1.9| = .9
    expected = (0.1 + 0.8 + 0.7 + 0.9) / 8
    assert abs(C.expected_calibration_error(counts) - expected) < 1e-12
    # additive across batches
    split = C.calibration_counts(conf[:3], correct[:3], 4) + C.calibration_counts(conf[3:], correct[3:], 4)
    np.testing.assert_allclose(split, counts)
    assert abs(C.expected_calibration_error(split) - expected) < 1e-12


def test_ece_default_bins_matches_loop_reference():
    rng = np.random.default_rng(5)
    conf = rng.random(2000)
    correct = rng.random(2000) < conf
    edges = np.linspace(0, 1, 16)
    ref = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ref += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert abs(C.expected_calibration_error(C.calibration_counts(conf, correct)) - ref) < 1e-12


def test_ece_edge_cases():
    assert math.isnan(C.expected_calibration_error(np.zeros((15, 3))))
    perfect = C.calibration_counts([1.0, 1.0], [1, 1])
    assert C.expected_calibration_error(perfect) == 0.0
    assert C.calibration_counts([0.0], [0], 15)[0, 0] == 1  # 0 lands in the first bin
    with pytest.raises(ValueError, match="1.5"):
        C.calibration_counts([0.2, 1.5], [1, 0])
    with pytest.raises(ValueError):
        C.expected_calibration_error(np.zeros((15, 2)))


def test_most_confused_pairs_known_matrix():
    cm = np.array(
        [
            [5, 3, 1],
            [0, 4, 3],
            [2, 0, 9],
        ]
    )
    pairs = M.most_confused_pairs(cm, ["a", "b", "c"], k=10)
    assert [(d["true"], d["predicted"], d["count"]) for d in pairs] == [
        ("a", "b", 3),
        ("b", "c", 3),
        ("c", "a", 2),
        ("a", "c", 1),
    ]
    assert pairs[0]["fraction"] == pytest.approx(3 / 9)
    assert pairs[1]["fraction"] == pytest.approx(3 / 7)
    assert (pairs[2]["true_index"], pairs[2]["predicted_index"]) == (2, 0)
    assert len(M.most_confused_pairs(cm, ["a", "b", "c"], k=2)) == 2
    assert M.most_confused_pairs(np.eye(3, dtype=int), ["a", "b", "c"]) == []


# --------------------------------------------------------------------------
# confidence intervals
# --------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (50, 100), (9512, 10000), (1, 10000)])
def test_wilson_matches_scipy(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = M.wilson_interval(k, n)
    assert float(low) == pytest.approx(ref.low, abs=1e-12)
    assert float(high) == pytest.approx(ref.high, abs=1e-12)
    ref90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert float(M.wilson_interval(k, n, 0.9)[0]) == pytest.approx(ref90.low, abs=1e-12)


def test_wilson_vectorised_and_undefined_without_trials():
    low, high = M.wilson_interval([3, 0, 5], [10, 0, 5])
    assert low[0] == pytest.approx(0.1077912, abs=1e-6) and high[0] == pytest.approx(0.6032219, abs=1e-6)
    assert math.isnan(low[1]) and math.isnan(high[1])
    assert high[2] == 1.0 and low[2] < 1.0
    with pytest.raises(ValueError, match="successes"):
        M.wilson_interval(4, 3)
    with pytest.raises(ValueError, match="confidence"):
        M.wilson_interval(1, 3, confidence=95)


def test_report_intervals_use_wilson_on_the_right_counts():
    from scipy.stats import binomtest

    cm = np.array([[8, 2, 0], [1, 6, 3], [0, 0, 0]])  # class c: no support, predicted 3 times
    r = M.classification_report(cm, ["a", "b", "c"])
    a, b, c = r["per_class"]
    ref = binomtest(8, 9).proportion_ci(method="wilson")  # precision of a: tp=8 of 9 predicted a
    assert a["precision_ci"] == pytest.approx([ref.low, ref.high], abs=1e-12)
    ref = binomtest(6, 10).proportion_ci(method="wilson")  # recall of b: tp=6 of 10 true b
    assert b["recall_ci"] == pytest.approx([ref.low, ref.high], abs=1e-12)
    ref = binomtest(14, 20).proportion_ci(method="wilson")
    assert r["accuracy_ci"] == pytest.approx([ref.low, ref.high], abs=1e-12)
    assert all(math.isnan(v) for v in c["recall_ci"])  # no true c: recall has no interval
    assert c["precision_ci"][0] == 0.0 and c["precision_ci"][1] == pytest.approx(
        binomtest(0, 3).proportion_ci(method="wilson").high, abs=1e-12
    )
    lo, hi = r["macro avg"]["f1_ci"]
    assert lo <= r["macro avg"]["f1"] <= hi
    assert r["intervals"]["confidence"] == 0.95 and r["intervals"]["resamples"] == 1000
    assert "f1_ci" not in M.classification_report(cm, ["a", "b", "c"], n_resamples=0)["macro avg"]


def _noisy_cm(c, n, seed=0, right=0.7):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return M.confusion_matrix(y, np.where(rng.random(n) < right, y, rng.integers(0, c, n)), c)


def test_bootstrap_macro_f1_seeded_contains_estimate_and_narrows():
    small = _noisy_cm(100, 2_000)
    first = M.bootstrap_macro_f1(small, seed=3)
    assert first == M.bootstrap_macro_f1(small, seed=3)  # same seed, same interval
    assert first != M.bootstrap_macro_f1(small, seed=4)
    point = M.classification_report(small, _names(100), n_resamples=0)["macro avg"]["f1"]
    assert first[0] < point < first[1]
    big = small * 25  # same proportions, 25x the rows: the interval is about 5x narrower
    low, high = M.bootstrap_macro_f1(big, seed=3)
    assert low < point < high
    assert (high - low) < 0.3 * (first[1] - first[0])


def test_bootstrap_matches_resampling_rows():
    """Multinomial draws over the cells behave like resampling the rows themselves."""
    rng = np.random.default_rng(11)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.random(400) < 0.75, y, rng.integers(0, 5, 400))
    scores = []
    for _ in range(2000):
        i = rng.integers(0, 400, 400)
        scores.append(
            M.classification_report(M.confusion_matrix(y[i], p[i], 5), _names(5), n_resamples=0)["macro avg"]["f1"]
        )
    ref = np.percentile(scores, [2.5, 97.5])
    low, high = M.bootstrap_macro_f1(M.confusion_matrix(y, p, 5), n_resamples=4000)
    assert low == pytest.approx(ref[0], abs=0.01) and high == pytest.approx(ref[1], abs=0.01)


def test_bootstrap_edge_cases():
    assert M.bootstrap_macro_f1(np.diag([5, 5, 5])) == (1.0, 1.0)  # perfect: every resample is perfect
    assert all(math.isnan(v) for v in M.bootstrap_macro_f1(np.zeros((3, 3), dtype=int)))
    with pytest.raises(ValueError, match="n_resamples"):
        M.bootstrap_macro_f1(np.eye(3, dtype=int), n_resamples=0)


def test_calibration_bins():
    counts = C.calibration_counts([0.1, 0.3, 0.4, 0.9], [0, 1, 0, 1], n_bins=4)
    bins = C.calibration_bins(counts)
    assert [(b["low"], b["high"], b["count"]) for b in bins] == [
        (0.0, 0.25, 1),
        (0.25, 0.5, 2),
        (0.5, 0.75, 0),
        (0.75, 1.0, 1),
    ]
    assert bins[1]["confidence"] == pytest.approx(0.35) and bins[1]["accuracy"] == 0.5
    assert math.isnan(bins[2]["accuracy"]) and bins[3]["accuracy"] == 1.0


def test_row_coverage_refuses_duplicates_strays_and_missing_rows():
    class Refused(RuntimeError):
        pass

    coverage = M.RowCoverage(5, Refused, "row", "split")
    coverage.add(np.array([0, 1]))
    coverage.add(np.array([], dtype=np.int64))  # an empty batch is no row
    for ids in ([1], [5], [-1], [2, 2]):
        with pytest.raises(Refused, match="^a row was predicted twice or a row id is outside the split$"):
            coverage.add(np.array(ids))
    with pytest.raises(Refused, match="^3 of 5 rows were never predicted$"):
        coverage.finish()
    coverage.add(np.array([2, 3, 4]))
    coverage.finish()  # every row once
    with pytest.raises(Refused, match="^an input row was predicted twice"):
        M.RowCoverage(1, Refused, "input row", "input").add(np.array([0, 0]))


# --------------------------------------------------------------------------
# NLL and temperature scaling (Guo et al. 2017)
# --------------------------------------------------------------------------
def _overconfident(n=20000, c=10, temperature=2.5, seed=0):
    """Logits whose labels are drawn from softmax(true logits): the observed ones are ``temperature`` times too
    sharp, so the temperature that calibrates them is known."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 2.0, (n, c))
    p = np.exp(C.log_softmax(true))
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return true * temperature, labels


def _ece(logits, labels, t):
    logp = C.log_softmax(logits, t)
    return C.expected_calibration_error(C.calibration_counts(np.exp(logp.max(1)), logp.argmax(1) == labels, 15))


@pytest.mark.parametrize("temperature", [2.5, 0.6])
def test_fit_temperature_recovers_a_known_temperature_and_lowers_nll_and_ece(temperature):
    logits, labels = _overconfident(temperature=temperature)
    fitted = C.fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.05)
    assert C.negative_log_likelihood(logits, labels, fitted) < C.negative_log_likelihood(logits, labels)
    assert _ece(logits, labels, fitted) < _ece(logits, labels, 1.0) / 3
    # top-1 (and the whole ranking) is the same at any temperature
    np.testing.assert_array_equal(C.log_softmax(logits, fitted).argsort(1), C.log_softmax(logits).argsort(1))


def test_nll_matches_sklearn_log_loss_and_adds_over_batches():
    from sklearn.metrics import log_loss

    logits, labels = _overconfident(n=500, c=5, temperature=1.0, seed=3)
    expected = log_loss(labels, np.exp(C.log_softmax(logits, 1.3)), labels=range(5), normalize=False)
    assert C.negative_log_likelihood(logits, labels, 1.3) == pytest.approx(expected, rel=1e-9)
    parts = C.negative_log_likelihood(logits[:200], labels[:200], 1.3) + C.negative_log_likelihood(
        logits[200:], labels[200:], 1.3
    )
    assert parts == pytest.approx(expected, rel=1e-12)
    assert C.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    with pytest.raises(ValueError, match="outside the valid class range"):
        C.negative_log_likelihood(logits, labels + 5)
