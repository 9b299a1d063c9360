"""jobs/export.py's logic without Ray: ONNX and TorchScript exports of a small model reproduce the Predictor on the
run's test split (the embedded digits), with a dynamic batch axis; a tampered export is refused; an export that
fails its check leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from resnet_ray import export as ex
from resnet_ray.checkpoint import export_model, save_training_state
from resnet_ray.config_files import load_config, to_dict
from resnet_ray.images import ResizeSpec
from resnet_ray.model import build_model
from resnet_ray.predictor import Predictor

ROWS = 48


@pytest.fixture(scope="module")
def small_model(digits_prepared, tmp_path_factory):
    """(config, exported model folder) of a randomly initialized CIFAR ResNet-20 whose config names the session's
    prepared digits (its test split is what the export verifies on)."""
    data_cfg, _, meta = digits_prepared
    cfg = load_config(
        None,
        {"data.root": data_cfg.root, "model.arch": "resnet20", "model.weights": "none", "model.image_size": 40},
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, len(meta["classes"]))
    folder = tmp_path_factory.mktemp("small-model")
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    info = {
        "arch": "resnet20",
        "num_classes": len(meta["classes"]),
        "classes": meta["classes"],
        "coarse_classes": None,
        "fine_to_coarse": None,
        "image_size": 40,  # != the stored 32 px: the graph resizes inside
        "mean": meta["mean"],
        "std": meta["std"],
        "dataset": meta["name"],
        "epoch": 0,
        "metrics": {},
        "config": to_dict(cfg),
        "resize": ResizeSpec(32).record(),
    }
    save_training_state(str(ckpt), {"model": model.state_dict()}, info)
    return cfg, export_model(str(ckpt), str(folder / "model"))


@pytest.fixture(scope="module")
def exports(small_model, tmp_path_factory):
    cfg, model = small_model
    out = tmp_path_factory.mktemp("exports")
    return {fmt: (str(out / fmt), ex.export(cfg, model, fmt, str(out / fmt), rows=ROWS)) for fmt in ex.FORMATS}


@pytest.mark.parametrize("fmt", sorted(ex.FORMATS))
def test_the_export_takes_pixels_and_reproduces_the_predictor(small_model, exports, fmt):
    cfg, model = small_model
    folder, record = exports[fmt]
    assert sorted(os.listdir(folder)) == sorted([ex.FORMATS[fmt], "model.json"])  # no temporary file left
    assert record["verified"]["images"] == ROWS and record["verified"]["top1_disagreements"] == 0
    info = json.load(open(os.path.join(folder, "model.json")))
    source = json.load(open(os.path.join(model, "model.json")))
    assert info["source_sha256"] == source["sha256"] != info["sha256"]
    assert info["export"]["input"] == {"name": "pixels", "dtype": "uint8", "shape": ["batch", 32, 32, 3],
                                       "layout": "NHWC RGB"}  # fmt: skip
    assert info["classes"] == source["classes"] and info["resize"] == source["resize"]

    images = ex.split_images(cfg, 32, ROWS)
    predictor = Predictor(model, amp=False, k=10, probabilities=True)
    expected = ex.reference_probabilities(predictor, images, 16)
    loaded = ex.load_export(folder)
    for batch in (1, 3, ROWS):  # the batch axis is dynamic
        got = np.concatenate([loaded.run(images[s : s + batch]) for s in range(0, ROWS, batch)])
        assert got.shape == (ROWS, 10) and got.dtype == np.float32
        assert np.array_equal(got.argmax(1), expected.argmax(1))
        assert np.abs(got - expected).max() <= 1e-4


def test_a_tampered_export_is_refused(exports, tmp_path):
    for fmt, (folder, _) in exports.items():
        changed = tmp_path / f"{fmt}-bytes"
        shutil.copytree(folder, changed)
        graph = changed / ex.FORMATS[fmt]
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, deep inside the weights
        graph.write_bytes(bytes(data))
        with pytest.raises(ex.ExportError, match=f"{ex.FORMATS[fmt]}: its SHA-256 differs from model.json"):
            ex.load_export(str(changed))
        relabelled = tmp_path / f"{fmt}-json"
        shutil.copytree(folder, relabelled)
        info = json.loads((relabelled / "model.json").read_text())
        info["sha256"] = "0" * 64
        (relabelled / "model.json").write_text(json.dumps(info))
        with pytest.raises(ex.ExportError, match="refusing to load"):
            ex.load_export(str(relabelled))
    with pytest.raises(ex.ExportError, match="not an export's model.json"):
        ex.load_export(str(tmp_path))


def test_an_export_that_fails_its_check_writes_nothing(small_model, tmp_path, monkeypatch):
    cfg, model = small_model
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / "out"
    with pytest.raises(ex.ExportError, match="does not reproduce PyTorch on 8 test images.*nothing was written"):
        ex.export(cfg, model, "torchscript", str(out), rows=8)
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder


def test_an_output_folder_that_is_not_an_export_is_not_replaced(small_model, tmp_path):
    cfg, model = small_model
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ex.ExportError, match="exists and is not an earlier export; refusing to replace it"):
        ex.export(cfg, model, "onnx", str(tmp_path), rows=8)
    with pytest.raises(ex.ExportError, match="--format tflite: one of onnx, torchscript"):
        ex.export(cfg, model, "tflite", str(tmp_path / "x"))
    assert os.listdir(tmp_path) == ["notes.txt"]
