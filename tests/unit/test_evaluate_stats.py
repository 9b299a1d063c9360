import numpy as np
import pytest

from resnet_ray import calibration, metrics
from resnet_ray.evaluate import batch_statistics
from resnet_ray.run_folder import default_output


def test_batch_statistics_top5_and_calibration():
    rng = np.random.default_rng(0)
    n, classes = 300, 100
    labels = rng.integers(0, classes, n)
    top5 = np.stack([rng.permutation(classes)[:5] for _ in range(n)])
    top5[:50, 0] = labels[:50]  # some right answers
    batch = {"label": labels, "pred": top5[:, 0], "top5": top5, "confidence": rng.random(n)}
    stats = batch_statistics(batch, classes, 15)
    assert set(stats) == {"cm", "top5", "calibration", "rows"}
    assert stats["cm"].shape == (1, classes, classes) and stats["cm"].sum() == n
    assert stats["top5"][0] == (top5 == labels[:, None]).any(1).sum()
    assert stats["calibration"][0][:, 0].sum() == n and stats["rows"][0] == n
    # the superclass matrix of the report is derived from the summed fine one: equal to one counted directly
    mapping = np.arange(classes) // 5
    np.testing.assert_array_equal(
        metrics.coarse_confusion_matrix(stats["cm"][0], mapping, 20),
        metrics.confusion_matrix(mapping[labels], mapping[top5[:, 0]], 20),
    )


@pytest.mark.parametrize(
    "model, expected",
    [
        ("/runs/r1/model", "/runs/r1/eval-test"),
        ("/runs/r1", "/runs/r1/eval-test"),
        ("s3://b/runs/r1/model", "s3://b/runs/r1/eval-test"),
    ],
)
def test_default_output_sits_beside_the_run(model, expected):
    assert default_output(model, "eval-test") == expected


def test_cpu_evaluations_run_in_the_job_process_only_on_its_own_local_instance_or_below_the_row_limit(monkeypatch):
    import resnet_ray.evaluate as ev
    from resnet_ray.config import EvalConfig

    for local, cfg, rows, expected in [
        (True, EvalConfig(), 10**6, True),  # default: every row, on its own instance
        (False, EvalConfig(), 10, False),  # default on a cluster: actors
        (True, EvalConfig(gpus_per_actor=1.0), 10, False),  # GPUs: always actors
        (True, EvalConfig(in_process_rows=0), 10, False),  # 0: always actors
        (False, EvalConfig(in_process_rows=100), 100, True),  # a limit applies everywhere
        (False, EvalConfig(in_process_rows=100), 101, False),
    ]:
        monkeypatch.setattr(ev, "started_here", lambda local=local: local)
        assert ev.in_process(cfg, rows) is expected, (local, cfg, rows)


def test_the_job_process_predicts_with_the_cpus_its_local_instance_declares(monkeypatch):
    """--num-cpus / RESNET_RAY_NUM_CPUS bound the in-process evaluation's threads, not only the actors'."""
    import ray

    import resnet_ray.evaluate as ev
    import resnet_ray.predictor
    from resnet_ray.config_files import load_config

    seen = []

    class Recorder:
        def __init__(self, model_path, threads):
            seen.append(threads)

        def __call__(self, batch):
            return batch

    monkeypatch.setattr(resnet_ray.predictor, "Predictor", Recorder)
    monkeypatch.setattr(ev, "read_split", lambda *a: iter([{"label": np.arange(3), "row_id": np.arange(3)}]))
    monkeypatch.setattr(ev.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    for local, expected in ((True, 3), (False, 8)):
        monkeypatch.setattr(ev, "started_here", lambda local=local: local)
        batches = list(ev.predict_here(load_config(None, {"eval.batch_size": 2}), "model", "test", "prepared"))
        assert [len(b["label"]) for b in batches] == [2, 1] and seen[-1] == expected


def test_batch_statistics_with_scores_count_nll_and_the_bins_before_the_temperature():
    rng = np.random.default_rng(1)
    n, classes, t = 200, 6, 2.0
    logits = rng.normal(0, 3, (n, classes))
    labels = rng.integers(0, classes, n)
    calibrated = np.exp(calibration.log_softmax(logits, t))
    batch = {
        "label": labels,
        "pred": logits.argmax(1),
        "top5": np.argsort(-logits, 1)[:, :5],
        "confidence": calibrated.max(1),
        "logits": logits.astype(np.float32),
    }
    stats = batch_statistics(batch, classes, 15, temperature=t)
    assert set(stats) == {"cm", "top5", "calibration", "rows", "calibration_raw", "nll", "nll_raw"}
    assert stats["nll"][0] == pytest.approx(calibration.negative_log_likelihood(logits, labels, t), rel=1e-5)
    assert stats["nll_raw"][0] == pytest.approx(calibration.negative_log_likelihood(logits, labels), rel=1e-5)
    raw = np.exp(calibration.log_softmax(logits)).max(1)
    correct = batch["pred"] == labels
    np.testing.assert_allclose(stats["calibration_raw"][0], calibration.calibration_counts(raw, correct, 15), rtol=1e-5)
    np.testing.assert_allclose(stats["calibration"][0], calibration.calibration_counts(calibrated.max(1), correct, 15))
