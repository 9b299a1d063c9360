"""The Predictor shared by evaluation, prediction and serving: the model's temperature never changes top-1 or the
ranking, a model without one has T = 1, and flip test-time augmentation equals plain prediction where the image
or the model is mirror-symmetric. No Ray."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from resnet_ray import checkpoint as ckpt
from resnet_ray.checkpoint import CheckpointError
from resnet_ray.config import Config, ModelConfig
from resnet_ray.config_files import to_dict
from resnet_ray.model import build_model
from resnet_ray.predictor import Predictor
from resnet_ray.saved_model import SavedModel

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4


def export(folder, temperature=None) -> str:
    """A resnet18 (4 classes, 32 px) as an exported model folder; model.json with ``temperature`` if given."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", weights="none"), C).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(folder, ckpt.MODEL))
    info = {
        "arch": "resnet18",
        "num_classes": C,
        "classes": list("abcd"),
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "config": to_dict(Config()),
        "sha256": hashlib.sha256(open(os.path.join(folder, ckpt.MODEL), "rb").read()).hexdigest(),
    }
    if temperature is not None:
        info["temperature"] = temperature
    with open(os.path.join(folder, ckpt.MODEL_INFO), "w") as f:
        json.dump(info, f)
    return str(folder)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def test_the_temperature_changes_the_probabilities_never_top1_or_the_ranking(tmp_path, images):
    folder = export(tmp_path / "m", temperature=2.5)
    calibrated = Predictor(folder, k=C, probabilities=True, logits=True)({"image": images, "row_id": np.arange(16)})
    raw = Predictor(folder, k=C, probabilities=True, calibrated=False)({"image": images})
    assert calibrated["row_id"].tolist() == list(range(16))  # passed through
    np.testing.assert_array_equal(calibrated["pred"], raw["pred"])
    np.testing.assert_array_equal(calibrated["top5"], raw["top5"])
    logits = torch.as_tensor(calibrated["logits"], dtype=torch.float64)
    np.testing.assert_allclose(calibrated["top_probs"][:, 0], (logits / 2.5).softmax(1).max(1).values, rtol=1e-5)
    np.testing.assert_allclose(raw["top_probs"][:, 0], logits.softmax(1).max(1).values, rtol=1e-5)
    assert (calibrated["confidence"] < raw["confidence"]).all()  # T > 1 softens


def test_a_model_json_without_temperature_means_t_1(tmp_path, images):
    folder = export(tmp_path / "old")
    predictor = Predictor(folder, k=C, probabilities=True)
    assert predictor.temperature == predictor.model_temperature == 1.0
    raw = Predictor(folder, k=C, probabilities=True, calibrated=False)({"image": images})
    np.testing.assert_array_equal(predictor({"image": images})["top_probs"], raw["top_probs"])
    bad = export(tmp_path / "bad", temperature=-1)
    with pytest.raises(CheckpointError, match="temperature must be a number > 0"):
        Predictor(bad)


def test_flip_tta_equals_plain_prediction_on_mirror_symmetric_images(tmp_path, images):
    symmetric = np.concatenate([images[:, :, :16], images[:, :, :16][:, :, ::-1]], axis=2)
    assert (symmetric == symmetric[:, :, ::-1]).all()
    folder = export(tmp_path / "m", temperature=1.7)
    plain = Predictor(folder, k=C, probabilities=True)({"image": symmetric})
    tta = Predictor(folder, k=C, probabilities=True, tta="flip")({"image": symmetric})
    np.testing.assert_array_equal(plain["pred"], tta["pred"])
    np.testing.assert_allclose(plain["top_probs"], tta["top_probs"], atol=1e-5)


class MirrorInvariant(nn.Module):
    """A conv with a left-right symmetric kernel, then a global average: its output ignores horizontal flips."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.fc = nn.Linear(8, C)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_flip_tta_equals_plain_prediction_with_a_mirror_invariant_model(tmp_path, images, monkeypatch):
    folder = export(tmp_path / "m")
    torch.manual_seed(1)
    model = MirrorInvariant().eval()
    monkeypatch.setattr(SavedModel, "load", lambda self: model)
    plain = Predictor(folder, k=C, probabilities=True, logits=True)({"image": images})
    tta = Predictor(folder, k=C, probabilities=True, logits=True, tta="flip")({"image": images})
    np.testing.assert_array_equal(plain["top5"], tta["top5"])
    np.testing.assert_allclose(plain["top_probs"], tta["top_probs"], atol=1e-6)


def test_flip_tta_is_the_mean_softmax_of_the_image_and_its_mirror(tmp_path, images):
    folder = export(tmp_path / "m")
    plain = Predictor(folder, k=C, logits=True)
    tta = Predictor(folder, k=C, probabilities=True, logits=True, tta="flip")({"image": images})
    mirrored = plain({"image": np.ascontiguousarray(images[:, :, ::-1])})["logits"]
    straight = plain({"image": images})["logits"]
    mean = (torch.as_tensor(straight).softmax(1) + torch.as_tensor(mirrored).softmax(1)) / 2
    np.testing.assert_allclose(np.exp(tta["logits"]), mean.numpy(), atol=1e-5)
    assert not np.allclose(straight, mirrored)  # the model is not symmetric: the test means something
    with pytest.raises(ValueError, match="eval.tta"):
        Predictor(folder, tta="rotate")
