"""MLflow (the optional extra): a real 2-worker run logs its hyperparameters and every epoch through Ray's
setup_mlflow on rank 0. Skipped without mlflow (the unit tests cover the error when it is set but missing)."""

import json
import os

import pytest
from conftest import tiny_config

from resnet_ray.run_folder import read_history
from resnet_ray.tracking import EPOCH_TAGS, MLFLOW_RUN_FILE, hyperparameters
from resnet_ray.train import fit

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")


def test_a_run_logs_its_hyperparameters_and_every_epoch_to_mlflow(ray_session, data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"  # MLFLOW_ALLOW_FILE_STORE: tests/conftest.py
    cfg = tiny_config(data_root, str(tmp_path / "runs"), **{"train.name": "tracked", "train.mlflow_tracking_uri": uri})
    result = fit(cfg)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == {key: str(value) for key, value in hyperparameters(cfg).items()}
    history = read_history(result.run_dir)
    assert [h["epoch"] for h in history] == [1, 2]
    for key in EPOCH_TAGS:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(h["epoch"], h[key]) for h in history], key
    stored = json.load(open(os.path.join(result.run_dir, MLFLOW_RUN_FILE)))
    assert stored == {"tracking_uri": uri, "run_id": run.info.run_id}  # what a restart or a resume continues
